"""One Meta-Weight-Net training iteration, with the meta-gradient from any estimator by name.

Per iteration (Shu et al. 2019, Algorithm 1), on a noisy batch (x, y) and a clean meta batch:

1. meta step: VNet parameters λ get dL_meta(θ'(λ))/dλ, where the base model's training loss is
   L_train(θ, λ) = Σ_i ℓ_i(θ) v_λ(ℓ_i) / Σ_j v_λ(ℓ_j) with VNet seeing the *detached* losses, and
   θ' is a one-step virtual SGD update (``mwn_second_order``, through ``higher``) or the EvoGrad
   merge of K perturbed copies (``mwn_evograd``); then one SGD step on λ;
2. actual step: the base model takes an SGD step on the same weighted loss with the updated VNet
   (weights under no_grad).

``baseline`` skips 1 and uses the plain mean cross-entropy in 2. ``mwn_evograd_scaled`` is
``mwn_evograd`` with VNet's meta-gradient multiplied by η / η_eff, η_eff = (K − 1)σ²/(Kτ): on
average EvoGrad's hypergradient is the second-order one at virtual step η_eff (1e-5 at the paper's
K, σ, τ) instead of MWN's η (the main lr, 0.1 at first), so the unscaled one is 1e-4 of MWN's
and VNet's weight decay outweighs it.

Because VNet sees detached losses, ℓ_k(θ + ε_k) are constants for EvoGrad: its K candidate
forward passes run under ``torch.no_grad`` and only VNet (1 → 100 → 1 on B scalars) is in the
graph. The loss builder below decides that from the parameters it is given: a network graph is
built only when the estimator hands in parameters that require grad (second-order unrolling).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.distributed import average_gradients
from common.evograd import effective_inner_lr, functional_forward, perturbable_params
from common.fsdp import is_sharded, sharded_meta_backward
from common.hypergrad import ESTIMATORS, meta_backward
from common.precision import backward, optimizer_step
from label_noise_mwn.models import CifarResNet, VNet, normalize_over_batch, weighted_loss

# the method names, and the estimator each runs in the meta step (None: no meta step)
NAMED_METHODS: dict[str, str | None] = {"baseline": None, "mwn_second_order": "second_order",
                                        "mwn_evograd": "evograd", "mwn_evograd_scaled": "evograd"}
PAPER_METHODS = ("baseline", "mwn_second_order", "mwn_evograd")
# EvoGrad's VNet gradient multiplied by η / η_eff, so that its mean is MWN's second-order one
SCALED_METHODS = ("mwn_evograd_scaled",)


def method_choices() -> list[str]:
    """``baseline``, ``mwn_second_order``, ``mwn_evograd``, then every estimator in ``common.hypergrad``."""
    return list(NAMED_METHODS) + [name for name in ESTIMATORS if name not in NAMED_METHODS]


def estimator_of(method: str) -> str | None:
    """The ``common.hypergrad`` estimator behind ``method`` (None for the baseline)."""
    if method in NAMED_METHODS:
        return NAMED_METHODS[method]
    if method in ESTIMATORS:
        return method
    raise ValueError(f"unknown method {method!r}; choose from {method_choices()}")


def per_example_losses(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example [B] of ``model`` with ``params``.

    The forward pass records a graph only if some parameter requires grad: EvoGrad's candidates
    θ + ε are constants, so their passes cost one inference forward each and keep no activations.
    """
    with torch.set_grad_enabled(any(p.requires_grad for p in params.values())):
        return F.cross_entropy(functional_forward(model, params, x), y, reduction="none")


def mwn_loss_fns(model: nn.Module, vnet: VNet, x: Tensor, y: Tensor, meta_x: Tensor, meta_y: Tensor
                 ) -> tuple[Callable[[dict[str, Tensor]], Tensor], Callable[[dict[str, Tensor]], Tensor]]:
    """(train_loss_fn, val_loss_fn) over base-model parameter dicts, as ``common.hypergrad`` takes them."""
    def train_loss_fn(params: dict[str, Tensor]) -> Tensor:
        return weighted_loss(vnet, per_example_losses(model, params, x, y))

    def val_loss_fn(params: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_forward(model, params, meta_x), meta_y)

    return train_loss_fn, val_loss_fn


def meta_step(method: str, model: nn.Module, vnet: VNet, vnet_optimizer: torch.optim.Optimizer,
              x: Tensor, y: Tensor, meta_x: Tensor, meta_y: Tensor, options: dict) -> float:
    """Update VNet by one SGD step on the chosen meta-gradient; returns the meta (clean) loss.

    Args:
        method: a name from ``method_choices()`` other than ``baseline``.
        model: base model (θ read from it, not changed).
        vnet: the weighting network (λ).
        vnet_optimizer: optimizer over VNet's parameters.
        x, y: noisy training batch [B, C, H, W], [B].
        meta_x, meta_y: clean meta batch.
        options: estimator options, e.g. ``inner_lr`` (the main lr now), ``n_candidates``,
            ``sigma``, ``temperature``, ``noise``, ``generator``.
    """
    vnet_optimizer.zero_grad(set_to_none=True)
    if is_sharded(model):  # --fsdp: the estimators run the model's own forward on its shards (common.fsdp)
        meta_loss = sharded_meta_backward(
            estimator_of(method), model, list(vnet.parameters()),
            lambda: weighted_loss(vnet, F.cross_entropy(model(x), y, reduction="none")),
            lambda: F.cross_entropy(model(meta_x), meta_y), **options)
    else:
        train_loss_fn, val_loss_fn = mwn_loss_fns(model, vnet, x, y, meta_x, meta_y)
        meta_loss = meta_backward(estimator_of(method), perturbable_params(model), list(vnet.parameters()),
                                  train_loss_fn, val_loss_fn, **options)
    if method in SCALED_METHODS:
        # E[EvoGrad] = one-step second-order hypergradient at η_eff = (K-1)σ²/(Kτ) (common.evograd):
        # 1e-5 at the paper's K, σ, τ, against MWN's η = 0.1; rescale to MWN's η before the step.
        scale = options["inner_lr"] / effective_inner_lr(options["n_candidates"], options["sigma"],
                                                         options["temperature"])
        for p in vnet.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    vnet_optimizer.step()
    return meta_loss


def actual_step(model: nn.Module, vnet: VNet | None, model_optimizer: torch.optim.Optimizer,
                x: Tensor, y: Tensor) -> tuple[float, Tensor, Tensor | None]:
    """One SGD step of the base model on the VNet-weighted (or, with ``vnet=None``, mean) loss.

    Returns:
        (training loss, unweighted mean loss as a detached 0-d tensor (VNet can weight a diverged
        loss to 0, so the divergence check reads this one), raw VNet weights [B] detached, or None
        for the baseline).
    """
    losses = F.cross_entropy(model(x), y, reduction="none")
    if vnet is None:
        loss, raw = losses.mean(), None
    else:
        with torch.no_grad():
            raw = vnet(losses.detach().reshape(-1, 1)).reshape(-1)
            weights = normalize_over_batch(raw)
        loss = (losses * weights).sum()
    model_optimizer.zero_grad(set_to_none=True)
    backward(loss)  # scaled under --amp fp16 (common.precision)
    if not is_sharded(model):  # FSDP2 has averaged its shards' gradients in the backward pass
        average_gradients(model)  # torchrun: the whole batch's gradient on every rank (as DDP)
    optimizer_step(model_optimizer)
    return loss.item(), losses.detach().mean(), raw


def train_iteration(method: str, model: nn.Module, vnet: VNet, model_optimizer: torch.optim.Optimizer,
                    vnet_optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, meta_x: Tensor,
                    meta_y: Tensor, options: dict) -> dict:
    """Meta step (unless baseline) then actual step; returns losses and the raw VNet weights."""
    meta_loss = None
    if estimator_of(method) is not None:
        # the last actual step's gradients are spent: freed here, not held beside the meta step's own
        model_optimizer.zero_grad(set_to_none=True)
        meta_loss = meta_step(method, model, vnet, vnet_optimizer, x, y, meta_x, meta_y, options)
    train_loss, unweighted_loss, raw = actual_step(model, None if method == "baseline" else vnet, model_optimizer, x, y)
    return {"train_loss": train_loss, "unweighted_loss": unweighted_loss, "meta_loss": meta_loss, "weights": raw}


def init_models(seed: int, num_classes: int, in_channels: int, depth: int, width: int, base_channels: int,
                vnet_hidden: int) -> tuple[CifarResNet, VNet]:
    """The classifier and VNet of a run, initialised from ``seed`` (torch's global RNG, seeded here)."""
    torch.manual_seed(seed)
    model = CifarResNet(num_classes, depth, width, in_channels, base_channels)
    return model, VNet(vnet_hidden)


def make_optimizers(model: nn.Module, vnet: VNet, lr: float, momentum: float, nesterov: bool,
                    weight_decay: float, vnet_lr: float, vnet_momentum: float, vnet_weight_decay: float
                    ) -> tuple[torch.optim.SGD, torch.optim.SGD]:
    """SGD for the base model and for VNet (MWN uses Nesterov for both)."""
    model_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay)
    vnet_opt = torch.optim.SGD(vnet.parameters(), lr=vnet_lr, momentum=vnet_momentum,
                               nesterov=nesterov and vnet_momentum > 0, weight_decay=vnet_weight_decay)
    return model_opt, vnet_opt


def lr_at(epoch: int, base_lr: float, milestones: list[int], gamma: float = 0.1) -> float:
    """Step schedule: ``base_lr · gamma^(number of milestones ≤ epoch)`` (epochs from 0)."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, prepare: Callable[[Tensor], Tensor],
             batch_size: int = 500) -> float:
    """Top-1 accuracy (%) in eval mode; ``prepare`` maps uint8 images to network inputs."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():  # no graph: evaluation only
        for start in range(0, len(images), batch_size):
            logits = model(prepare(images[start:start + batch_size]))
            correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(1, len(images))
