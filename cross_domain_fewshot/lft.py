"""One LFT meta-iteration (Tseng et al. 2020, with EvoGrad or second-order hypergradients), evaluation.

A meta-iteration takes a pseudo-seen episode S and a pseudo-unseen episode U:

    model loss   L_S(θ, λ) + a·L_aux(θ)  on S with FWT on  -> Adam step on θ (backbone + relation
                 module + auxiliary head); L_aux is the cross-entropy of an auxiliary classifier
                 over the pretraining classes, a its scheduled weight (``aux_weight_at``)
    meta loss    L_U(θ')     on U with FWT off (model in eval mode, as in the LFT code), where θ'
                 is θ after a virtual update on L_S:
                   lft_second_order: θ' = θ − η ∇θ L_S(θ, λ)          (one unrolled step, ``higher``)
                   lft_evograd:      θ' = Σ_k w_k (θ + ε_k),  w = softmax(−L_S(θ + ε_k, λ)/τ)
                                     (``evograd_low_memory``: λ acts inside the network)
                 -> Adam step on λ = the FWT parameters θ_γ, θ_β (weight decay 1e-8)
    baseline     the model loss with FWT off, no meta step (the training script gives it no
                 auxiliary loss and episodes of all seen domains, as the authors' baseline).

Where the meta step is taken (``meta_order``), as in the authors' two files: the EvoGrad methods
take the model step first and the meta step at the updated θ (``methods/LFTNetMetaEvo.py``),
every other method takes the meta step at θ before the update (``methods/LFTNet.py``).

FWT noise (``fwt_noise``): "independent" draws fresh noise for the model step and for every
EvoGrad candidate, as the authors' layer does in every forward pass; "shared" gives every pass of
an iteration the model step's draw (common random numbers). The second-order virtual step reuses
the model step's forward pass in the authors' code, so it sees the model step's draw under both.
Every draw has its own seed from a generator of the trainer, so a seeded run is repeatable, and
both EvoGrad paths evaluate each candidate's training loss exactly once per meta step (the
low-memory path frees a candidate's graph after ∂ℓ_k/∂λ and rebuilds θ* from the seeds of ε_k,
never from the losses), so a candidate's loss is never recomputed with another draw.

Under torchrun each rank gets the whole support set of every episode and its share of the
queries (``shard_queries``): the relation scores compare every query with all support images, so
the support must be whole on every rank, and the ranks' mean query loss is the episode's.
``LFTTrainer.step`` broadcasts rank 0's BatchNorm running statistics, averages θ's gradients over
ranks and checks the ranks' mean losses; the hypergradient is the whole episode's
(``common.distributed``).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.distributed import average_gradients, broadcast_buffers, mean_over_ranks, shard
from common.evograd import functional_forward, perturbable_params
from common.hypergrad import ESTIMATORS, meta_backward
from common.precision import backward, optimizer_step
from common.runtime import check_finite
from cross_domain_fewshot.models import (SOFTPLUS_BETA, FewShotModel, episode_labels, eval_mode, feature_transform,
                                         is_fwt_param)

# The estimator names that differ from "lft_<estimator>": lft_evograd is the low-memory EvoGrad
# path (one candidate graph at a time), the plain path is kept under its own name.
ESTIMATOR_ALIASES = {"evograd_low_memory": "lft_evograd", "evograd": "lft_evograd_plain"}
METHODS: dict[str, str | None] = {"baseline": None, **{
    ESTIMATOR_ALIASES.get(name, f"lft_{name}"): name for name in ESTIMATORS}}
PAPER_METHODS = ("baseline", "lft_second_order", "lft_evograd")
EVOGRAD_ESTIMATORS = ("evograd", "evograd_low_memory")
FWT_NOISE = ("independent", "shared")
META_ORDERS = ("auto", "before", "after")
AUX_LOSSES = ("mlp", "pretrained_linear")


def resolve_meta_order(method: str, meta_order: str = "auto") -> str:
    """Where ``method`` takes its meta step: "after" the model step (at the updated θ) or "before" it.

    "auto" follows the authors' file for the method: "after" for the EvoGrad methods
    (``LFTNetMetaEvo.py``), "before" for every other one (``LFTNet.py``).
    """
    if meta_order not in META_ORDERS:
        raise ValueError(f"unknown meta order {meta_order!r}; choose from {META_ORDERS}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    if meta_order != "auto":
        return meta_order
    return "after" if METHODS[method] in EVOGRAD_ESTIMATORS else "before"


def aux_weight_at(epoch: int, epochs: int, aux_loss: str = "mlp", scale: float = 1.0) -> float:
    """Weight of the auxiliary loss in ``epoch`` (0-based) of ``epochs``.

    "mlp" (the LFT/EvoGrad code): scale · 0.9^⌊20·epoch / epochs⌋, a step decay from 1 to 0.9^19;
    "pretrained_linear": scale · (1 − epoch / epochs), linear to 0.
    """
    if aux_loss not in AUX_LOSSES:
        raise ValueError(f"unknown auxiliary loss {aux_loss!r}; choose from {AUX_LOSSES}")
    if epochs <= 0 or not 0 <= epoch < epochs:
        raise ValueError(f"need 0 <= epoch < epochs, got epoch={epoch}, epochs={epochs}")
    if aux_loss == "mlp":
        return scale * 0.9 ** (20 * epoch // epochs)
    return scale * (1 - epoch / epochs)


def shard_queries(episode: Tensor, n_shot: int) -> Tensor:
    """This rank's part of ``episode`` [n_way, n_shot + n_query, ...]: all support images, its share
    of every class's queries (the whole episode without a process group).

    Raises:
        ValueError: if there are fewer queries per class than processes.
    """
    support, queries = episode[:, :n_shot], episode[:, n_shot:]
    return torch.cat([support, shard(queries, dim=1)], dim=1)


def episode_loss(model: nn.Module, params: dict[str, Tensor] | None, episode: Tensor, n_shot: int) -> Tensor:
    """Cross-entropy of the query logits of ``episode`` [n_way, n_shot + n_query, 3, H, W]."""
    logits = model(episode, n_shot) if params is None else functional_forward(model, params, episode, n_shot)
    n_way, per_class = episode.shape[:2]
    return F.cross_entropy(logits, episode_labels(n_way, per_class - n_shot, episode.device))


class LFTTrainer:
    """Holds the optimisers of θ and λ and runs meta-iterations of one method.

    Args:
        model: the few-shot model with FWT layers.
        method: a key of ``METHODS``.
        lr: Adam learning rate of θ; also σ of EvoGrad and η of the second-order virtual step.
        fwt_lr, fwt_weight_decay: Adam settings of λ.
        n_candidates, temperature: EvoGrad's K and τ.
        generator: seeds EvoGrad's perturbations; the FWT noise seeds of the model steps come from a
            second generator seeded from it, so that every method sees the same model-step noise
            sequence, and those of EvoGrad's candidates (under "independent") from a third.
        aux_classifier: optional head over average-pooled backbone features (pretraining
            classes), trained with θ.
        fwt_noise: "independent" (a fresh draw for the model step and each EvoGrad candidate) or
            "shared" (one draw per iteration for every pass); see the module docs.
        meta_order: "auto", "before" or "after"; see ``resolve_meta_order``.
        aux_mode: "eval" (the auxiliary loss with the model in eval mode: running BatchNorm
            statistics, left unchanged) or "train" (batch statistics, running ones updated).
    """

    def __init__(self, model: FewShotModel, method: str, lr: float = 1e-3, fwt_lr: float = 1e-3,
                 fwt_weight_decay: float = 1e-8, n_candidates: int = 2, temperature: float = 0.05,
                 generator: torch.Generator | None = None, aux_classifier: nn.Module | None = None,
                 fwt_noise: str = "independent", meta_order: str = "auto", aux_mode: str = "eval") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        if fwt_noise not in FWT_NOISE:
            raise ValueError(f"unknown FWT noise {fwt_noise!r}; choose from {FWT_NOISE}")
        if aux_mode not in ("eval", "train"):
            raise ValueError(f"unknown auxiliary-loss mode {aux_mode!r}; choose eval or train")
        self.model, self.method, self.estimator = model, method, METHODS[method]
        self.meta_order = resolve_meta_order(method, meta_order)
        self.fwt_noise, self.aux_mode = fwt_noise, aux_mode
        self.aux_classifier = aux_classifier
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.fwt_generator = torch.Generator().manual_seed(self.generator.initial_seed() + 1)
        self.candidate_fwt_generator = torch.Generator().manual_seed(self.generator.initial_seed() + 2)
        model_params = [p for n, p in model.named_parameters() if not is_fwt_param(n)]
        if aux_classifier is not None:
            model_params += list(aux_classifier.parameters())
        self.fwt_params = [p for n, p in model.named_parameters() if is_fwt_param(n)]
        self.model_optim = torch.optim.Adam(model_params, lr=lr)
        self.fwt_optim = torch.optim.Adam(self.fwt_params, lr=fwt_lr, weight_decay=fwt_weight_decay)
        self.meta_options = dict(n_candidates=n_candidates, sigma=lr, temperature=temperature, noise="sign",
                                 generator=self.generator, inner_lr=lr, inner_steps=1)
        self.steps = 0

    def next_fwt_seed(self, generator: torch.Generator | None = None) -> int:
        """The seed of the next FWT draw from ``generator`` (the model steps' one by default)."""
        return int(torch.randint(0, 2**31 - 1, (), generator=self.fwt_generator if generator is None else generator))

    def aux_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the auxiliary classifier on average-pooled backbone features, FWT off."""
        mode = eval_mode(self.model) if self.aux_mode == "eval" else contextlib.nullcontext()
        with mode, feature_transform(self.model, False):
            features = self.model.backbone(images).mean(dim=(2, 3))
        return F.cross_entropy(self.aux_classifier(features), labels)

    def step(self, seen: Tensor, unseen: Tensor | None, n_shot: int, aux_batch: tuple[Tensor, Tensor] | None = None,
             aux_weight: float = 0.0) -> dict[str, float]:
        """One meta-iteration on a pseudo-seen and a pseudo-unseen episode; returns the losses.

        The baseline (no meta step) uses ``seen`` only; ``unseen`` may be None for it.
        """
        if unseen is None and self.estimator is not None:
            raise ValueError(f"{self.method} takes a meta step and needs the pseudo-unseen episode")
        model = self.model
        model.train()
        broadcast_buffers(model)  # torchrun: rank 0's running statistics on every rank, as DDP
        if self.aux_classifier is not None:
            broadcast_buffers(self.aux_classifier)
        use_fwt = self.estimator is not None
        seed = self.next_fwt_seed()
        self.model_optim.zero_grad(set_to_none=True)
        use_aux = aux_batch is not None and aux_weight > 0 and self.aux_classifier is not None
        aux_loss = torch.zeros(())
        if use_aux and self.aux_mode == "eval":  # before the episode pass updates the running statistics
            aux_loss = self.aux_loss(*aux_batch)
        with feature_transform(model, use_fwt, seed):
            model_loss = episode_loss(model, None, seen, n_shot)
        if use_aux and self.aux_mode == "train":
            aux_loss = self.aux_loss(*aux_batch)
        # torchrun: the ranks' mean losses, so every rank checks (and stops on) the same numbers
        model_mean, aux_mean = mean_over_ranks(torch.stack([model_loss.detach(), aux_loss.detach().to(model_loss)]))
        check_finite(model_mean, self.steps, "model loss")
        backward(model_loss + aux_weight * aux_loss)  # scaled under --amp fp16 (common.precision)
        average_gradients(model)  # torchrun: the whole episode's gradient on every rank, as DDP
        if self.aux_classifier is not None:
            average_gradients(self.aux_classifier)
        out = {"model_loss": model_mean.item(), "aux_loss": aux_mean.item()}
        model_step_first = use_fwt and self.meta_order == "after"
        if model_step_first:
            optimizer_step(self.model_optim)
        if use_fwt:
            out.update(self.meta_step(seen, unseen, n_shot, seed))
        if not model_step_first:
            optimizer_step(self.model_optim)
        if use_fwt:
            self.fwt_optim.step()
        self.steps += 1
        return out

    def meta_step(self, seen: Tensor, unseen: Tensor, n_shot: int, model_step_seed: int) -> dict[str, float]:
        """Hypergradient of L_U at the model's current θ into the FWT parameters' ``.grad``."""
        model = self.model
        self.fwt_optim.zero_grad(set_to_none=True)  # drop what the model loss left on λ
        params = perturbable_params(model, include=lambda n: not is_fwt_param(n))
        fresh_draws = self.fwt_noise == "independent" and self.estimator in EVOGRAD_ESTIMATORS
        train_losses: list[float] = []

        def train_loss(p: dict[str, Tensor]) -> Tensor:
            seed = self.next_fwt_seed(self.candidate_fwt_generator) if fresh_draws else model_step_seed
            with feature_transform(model, True, seed):
                loss = episode_loss(model, p, seen, n_shot)
            train_losses.append(loss.item())
            return loss

        def val_loss(p: dict[str, Tensor]) -> Tensor:
            with feature_transform(model, False), eval_mode(model):
                return episode_loss(model, p, unseen, n_shot)

        out = {"meta_loss": meta_backward(self.estimator, params, self.fwt_params, train_loss, val_loss,
                                          **self.meta_options)}
        if not math.isfinite(out["meta_loss"]):
            check_finite(torch.tensor(out["meta_loss"]), self.steps, "meta loss")
        if self.estimator in EVOGRAD_ESTIMATORS:  # how far apart the K candidates' training losses are
            out["candidate_loss_spread"] = max(train_losses) - min(train_losses)
        return out

    def state_dict(self) -> dict:
        return {"model_optim": self.model_optim.state_dict(), "fwt_optim": self.fwt_optim.state_dict(),
                "generator": self.generator.get_state(), "fwt_generator": self.fwt_generator.get_state(),
                "candidate_fwt_generator": self.candidate_fwt_generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.model_optim.load_state_dict(state["model_optim"])
        self.fwt_optim.load_state_dict(state["fwt_optim"])
        self.generator.set_state(state["generator"])
        self.fwt_generator.set_state(state["fwt_generator"])
        if "candidate_fwt_generator" in state:  # older checkpoints lack it
            self.candidate_fwt_generator.set_state(state["candidate_fwt_generator"])
        self.steps = state["steps"]


def fwt_scales(model: nn.Module) -> dict[str, float]:
    """Mean softplus(θ_γ) and softplus(θ_β) over all FWT layers (the learned noise scales)."""
    gammas = [p for n, p in model.named_parameters() if n.endswith("fwt_gamma")]
    betas = [p for n, p in model.named_parameters() if n.endswith("fwt_beta")]
    mean = lambda ps: torch.cat([F.softplus(p.detach(), beta=SOFTPLUS_BETA).flatten() for p in ps]).mean().item()  # noqa: E731
    return {"fwt_gamma_scale": mean(gammas), "fwt_beta_scale": mean(betas)}


@torch.no_grad()
def evaluate(model: FewShotModel, sample_episode, n_episodes: int, n_shot: int, progress_bar=None) -> tuple[float, float]:
    """Mean query accuracy (%) over ``n_episodes`` and its 95% confidence half-width (1.96·std/√n).

    Args:
        model: evaluated in eval mode with FWT off.
        sample_episode: ``() -> images [n_way, n_shot + n_query, 3, H, W]``.
        n_episodes: number of test episodes (1000 in the paper).
        n_shot: support images per class.
        progress_bar: optional wrapper for the episode range (e.g. ``common.runtime.progress``).
    """
    accuracies = []
    episodes = range(n_episodes) if progress_bar is None else progress_bar(range(n_episodes), desc="eval")
    with eval_mode(model), feature_transform(model, False):
        for _ in episodes:
            episode = sample_episode()
            n_way, per_class = episode.shape[:2]
            logits = model(episode, n_shot)
            labels = episode_labels(n_way, per_class - n_shot, episode.device)
            accuracies.append((logits.argmax(1) == labels).float().mean().item() * 100)
    acc = torch.tensor(accuracies)
    ci95 = 1.96 * acc.std().item() / math.sqrt(len(acc)) if len(acc) > 1 else 0.0
    return acc.mean().item(), ci95
