"""XLM-R token classifier with a representation transformation network (RTN), and the MetaXL steps.

MetaXL (Xia et al., NAACL 2021): source-language hidden states after transfer layer l are passed
through the RTN, h ← h + g ⊙ t with [t, g_logit] = W2 ReLU(W1 h), g = sigmoid(g_logit), and the rest
of the encoder and the classifier run on them. Target-language batches bypass the RTN. The main
model θ is trained on L_train(θ, φ) = L_source(θ, φ) + L_target(θ); the RTN φ is meta-learned so
that a step on L_train lowers the loss on another target batch:

    metaxl          θ' = θ − η ∇θ L_train(θ, φ),  φ ← φ − β ∇φ L_meta(θ')   (second order, all of θ)
    metaxl_evograd  EvoGrad on the classifier head only, θ_k = θ + ε_k with ε_k on the head:
                    ℓ_k = L_train(θ_k, φ), w = softmax(−ℓ/τ), φ ← φ − β ∇φ L_meta(θ + Σ_k w_k ε_k).
                    By default (``per_candidate``, as the EvoGrad code) the encoder runs again for
                    every candidate, so each ℓ_k has its own dropout mask; ``shared`` runs it once
                    and evaluates the K heads on the same features.

The layer split is a forward hook on the output of encoder layer l (l = 0: the embeddings), so
the Hugging Face model, its masks and ``torch.func.functional_call`` are used unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForTokenClassification

from common.distributed import average_gradients, is_distributed, mean_over_ranks
from common.evograd import functional_forward
from common.fsdp import frozen, is_sharded, sharded_meta_backward
from common.hypergrad import meta_backward
from common.precision import backward, optimizer_step, unscale_gradients
from common.runtime import CLIError
from metaxl.data import IGNORE_INDEX, LABELS, InputFormat, Sentence, collate, encode, word_level_tokenizer

Batch = Mapping[str, Tensor]
TINY = "tiny"


class RepresentationTransformation(nn.Module):
    """Bottleneck MLP hidden → bottleneck → hidden + 1 whose last output gates the transformation.

    ``forward(h) = h + sigmoid(z_H) · z_{:H}`` with ``z = W2 ReLU(W1 h)``; the MLP reads ``h``
    detached, as in the MetaXL code, so the RTN is fed by, but does not backpropagate into, the
    layers below it.
    """

    def __init__(self, hidden_size: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size + 1)
        for layer in (self.down, self.up):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        z = self.up(F.relu(self.down(hidden.detach())))  # [B, T, H + 1]
        return hidden + torch.sigmoid(z[..., -1:]) * z[..., :-1]


TINY_LAYERS = 4


def tiny_config(vocab_size: int, max_length: int) -> XLMRobertaConfig:
    """A small random XLM-R (``TINY_LAYERS`` layers of width 64) for offline runs and tests."""
    return XLMRobertaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=max_length + 2, type_vocab_size=1,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)


def base_config() -> XLMRobertaConfig:
    """The ``xlm-roberta-base`` architecture (vocabulary 250,002), for random-init benchmarks."""
    return XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)


def build_tagger(model: str | XLMRobertaConfig) -> XLMRobertaForTokenClassification:
    """Token classifier over ``LABELS``: from a config (random init), a hub name or a local directory.

    Eager attention is used so that the second-order method can differentiate twice.

    Raises:
        CLIError: if pretrained weights cannot be loaded (offline, wrong path).
    """
    if isinstance(model, XLMRobertaConfig):
        model.num_labels = len(LABELS)
        model._attn_implementation = "eager"
        return XLMRobertaForTokenClassification(model)
    try:
        return XLMRobertaForTokenClassification.from_pretrained(model, num_labels=len(LABELS),
                                                                attn_implementation="eager")
    except (OSError, ValueError) as err:
        where = "directory" if Path(model).exists() else "hub model"
        raise CLIError(f"cannot load XLM-R {where} {model!r} ({str(err).splitlines()[0]}); "
                       "use --model tiny offline") from None


def use_input_format(model: XLMRobertaForTokenClassification, fmt: InputFormat | None) -> None:
    """Under the authors' input (explicit positions 0..T-1) row 1 of the position embedding is the first
    word's position, so it trains as in their BERT embedding layer (``ondrejbohdal/evograd``,
    ``CrossLingualLearningMetaXL/models.py`` lines 731-760), instead of staying fixed as RoBERTa's pad position."""
    if fmt is not None and fmt.explicit_positions:
        model.roberta.embeddings.position_embeddings.padding_idx = None


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    """The keyword arguments of a forward pass: ids, attention mask and, where the batch has them, position ids."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


@contextmanager
def transformed(model: XLMRobertaForTokenClassification, rtn: nn.Module | None, layer: int) -> Iterator[None]:
    """Within the block, hidden states after encoder layer ``layer`` pass through ``rtn``."""
    if rtn is None:
        yield
        return
    n_layers = model.config.num_hidden_layers
    if not 0 <= layer <= n_layers:
        raise CLIError(f"--transfer_layer must be in 0..{n_layers} for this model, got {layer}")
    module = model.roberta.embeddings if layer == 0 else model.roberta.encoder.layer[layer - 1]
    handle = module.register_forward_hook(lambda _mod, _inp, out: rtn(out))
    try:
        yield
    finally:
        handle.remove()


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over labelled sub-tokens; logits [B, T, C], labels [B, T].

    Under torchrun each rank holds a shard of the sentences, with its own number of labelled
    sub-tokens n_r: rank r returns Σ_{its tokens} ℓ / ((1/N) Σ_r' n_r'), so the ranks' mean is
    the whole batch's mean over its Σ_r n_r tokens (one all-reduce of a count).
    """
    if not is_distributed():
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / mean_over_ranks((labels != IGNORE_INDEX).sum().to(total.dtype))


def tagger_loss(model: XLMRobertaForTokenClassification, batch: Batch, params: Mapping[str, Tensor] | None = None,
                rtn: nn.Module | None = None, layer: int = 12) -> Tensor:
    """Token loss of ``model`` (with ``params`` in place of its own, if given) on ``batch``."""
    inputs = model_inputs(batch)
    with transformed(model, rtn, layer):
        out = model(**inputs) if params is None else functional_forward(model, params, **inputs)
    return token_loss(out.logits, batch["labels"])


def training_loss(model, source: Batch, target: Batch, rtn: nn.Module | None, layer: int,
                  params: Mapping[str, Tensor] | None = None) -> Tensor:
    """L_train = L_source (through the RTN, if any) + L_target (never through it)."""
    return tagger_loss(model, source, params, rtn, layer) + tagger_loss(model, target, params)


def main_update(model, optimizer: torch.optim.Optimizer, scheduler, source: Batch, target: Batch,
                rtn: nn.Module | None, layer: int, max_grad_norm: float | None, scale: float = 1.0) -> float:
    """One optimiser step of the main model on ``scale`` · L_train (the RTN is held fixed).

    ``max_grad_norm`` None: no clipping.
    """
    optimizer.zero_grad(set_to_none=True)
    if is_sharded(model):  # FSDP2: the gathered parameters are not the sharded ones: no ``inputs=``
        with frozen(rtn.parameters() if rtn is not None else ()):
            loss = scale * training_loss(model, source, target, rtn, layer)
            backward(loss)  # FSDP2 reduce-scatters: every rank's shard holds the ranks' mean gradient
    else:
        loss = scale * training_loss(model, source, target, rtn, layer)
        backward(loss, inputs=[p for p in model.parameters() if p.requires_grad])  # scaled under --amp fp16
        average_gradients(model)  # torchrun: the whole batch's gradient on every rank (as DDP), then clipped
    unscale_gradients(optimizer)  # --amp fp16: clip the true gradients
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer_step(optimizer)
    scheduler.step()
    return loss.item()


def metaxl_meta_step(estimator: str, model, rtn: nn.Module, source: Batch, target: Batch, meta: Batch,
                     layer: int, inner_lr: float, **options) -> float:
    """Hypergradient of L_meta w.r.t. the RTN through a virtual update of the whole main model.

    ``estimator`` is a second-order-style key of ``common.hypergrad.ESTIMATORS`` (``second_order``:
    one differentiable SGD step through ``higher``). Accumulates into the RTN's ``.grad``;
    the main model's weights and ``.grad`` are untouched. Returns L_meta at the virtual step.
    """
    if is_sharded(model):  # --fsdp: θ perturbed in FSDP's all-gathers, the model's own forward (common.fsdp)
        return sharded_meta_backward(estimator, model, list(rtn.parameters()),
                                     lambda: training_loss(model, source, target, rtn, layer),
                                     lambda: tagger_loss(model, meta), inner_lr=inner_lr, **options)
    params = {n: p.detach() for n, p in model.named_parameters()}
    return meta_backward(
        estimator, params, list(rtn.parameters()),
        lambda p: training_loss(model, source, target, rtn, layer, params=p),
        lambda p: tagger_loss(model, meta, p),
        inner_lr=inner_lr, **options)


def encoder_features(model, batch: Batch, rtn: nn.Module | None = None, layer: int = 12) -> Tensor:
    """Dropout(encoder output) [B, T, H], with the main model's weights as constants.

    Only the RTN (if given) is in the graph, so a backward pass reaches nothing else.
    """
    frozen = {n: p.detach() for n, p in model.roberta.named_parameters()}
    with transformed(model, rtn, layer):
        hidden = functional_forward(model.roberta, frozen, **model_inputs(batch)).last_hidden_state
    return model.dropout(hidden)


CANDIDATE_ENCODER = ("per_candidate", "shared")


def metaxl_evograd_meta_step(estimator: str, model, rtn: nn.Module, source: Batch, target: Batch, meta: Batch,
                             layer: int, candidate_encoder: str = "per_candidate", **options) -> float:
    """EvoGrad hypergradient for the RTN, perturbing only the classifier head.

    Each candidate head ``θ_k`` is a linear map applied to encoder features (the main model's
    weights are constants; only the source features keep a graph, back to the RTN):

    * ``per_candidate``: the encoder runs again for every candidate on the source and target
      batches, so in training mode each ℓ_k sees its own dropout mask (the EvoGrad code,
      ``ondrejbohdal/evograd``, ``CrossLingualLearningMetaXL/mlt.py`` line 1219);
    * ``shared``: it runs once per batch and all K heads see the same features (K − 1 fewer
      encoder passes; the candidates then differ only by their head).

    The meta batch runs once, at the merged head. Accumulates into the RTN's ``.grad``; the main
    model is untouched. Returns L_meta at the merged head.

    A model sharded by FSDP2 (``common.fsdp``): ``per_candidate`` only; the encoder's shards are
    frozen, the head's perturbed in place with index-addressed noise, and every pass (each
    candidate's, then the meta batch's at the merged head) is the whole model's own forward.
    """
    if candidate_encoder not in CANDIDATE_ENCODER:
        raise ValueError(f"unknown candidate_encoder {candidate_encoder!r}; choose from {CANDIDATE_ENCODER}")
    if is_sharded(model):
        if candidate_encoder != "per_candidate":
            raise ValueError("a sharded model runs the encoder for every candidate (candidate_encoder='per_candidate')")
        # θ = the head alone: the encoder's shards are frozen, so the sharded EvoGrad perturbs only the head;
        # each candidate and the meta batch run the whole model's forward (the meta batch after the candidates)
        with frozen(model.roberta.parameters()):
            return sharded_meta_backward(estimator, model, list(rtn.parameters()),
                                         lambda: training_loss(model, source, target, rtn, layer),
                                         lambda: tagger_loss(model, meta), **options)

    def head_loss(head: Mapping[str, Tensor], hidden: Tensor, batch: Batch) -> Tensor:
        return token_loss(F.linear(hidden, head["weight"], head["bias"]), batch["labels"])

    def features() -> tuple[Tensor, Tensor]:
        source_h = encoder_features(model, source, rtn, layer)
        with torch.no_grad():
            return source_h, encoder_features(model, target)

    shared = features() if candidate_encoder == "shared" else None

    def train_loss(head: Mapping[str, Tensor]) -> Tensor:
        source_h, target_h = shared if shared is not None else features()
        return head_loss(head, source_h, source) + head_loss(head, target_h, target)

    with torch.no_grad():
        meta_h = encoder_features(model, meta)
    head = {n: p.detach() for n, p in model.classifier.named_parameters()}
    return meta_backward(estimator, head, list(rtn.parameters()), train_loss,
                         lambda p: head_loss(p, meta_h, meta), **options)


# ---------------------------------------------------------------------------------------------
# one training iteration of each method, evaluation, tokenizers
# ---------------------------------------------------------------------------------------------

METHODS = ("joint_training", "metaxl", "metaxl_evograd")
# joint training's update: (L_source + L_target) / 2 without clipping (the MetaXL code's step_gold_mix,
# ``ondrejbohdal/evograd``, ``CrossLingualLearningMetaXL/mlt.py`` lines 882-903), or the meta methods'
# L_source + L_target clipped at --max_grad_norm
JOINT_LOSSES = ("half", "sum_clipped")


@dataclass
class StepConfig:
    """What one iteration needs besides the model, optimisers and batches (see train.py's flags)."""

    transfer_layer: int = 12
    max_grad_norm: float = 10.0
    metaxl_estimator: str = "second_order"
    evograd_estimator: str = "evograd"
    n_candidates: int = 2
    sigma: float = 1e-3
    temperature: float = 0.05
    candidate_encoder: str = "per_candidate"
    joint_loss: str = "half"


def train_iteration(method: str, model, rtn: nn.Module | None, optimizer, scheduler, meta_optimizer,
                    source: Batch, target: Batch, meta: Batch | None, cfg: StepConfig,
                    generator: torch.Generator | None = None, meta_scheduler=None) -> dict[str, float]:
    """One iteration: (meta methods) update the RTN on the meta batch, then update the main model.

    The virtual step of ``metaxl`` uses the main model's current learning rate, as in MetaXL.
    ``meta_scheduler`` (if given) steps the RTN's learning rate once per iteration.

    Returns:
        ``{"train_loss": L_train before the main update, "meta_loss": L_meta (NaN for joint_training)}``.
    """
    meta_loss = float("nan")
    if method != "joint_training":
        meta_optimizer.zero_grad(set_to_none=True)
        optimizer.zero_grad(set_to_none=True)  # the last main update's gradients are spent: not held beside the meta step's
        if method == "metaxl":
            meta_loss = metaxl_meta_step(cfg.metaxl_estimator, model, rtn, source, target, meta, cfg.transfer_layer,
                                         inner_lr=scheduler.get_last_lr()[0], inner_steps=1)
        elif method == "metaxl_evograd":
            meta_loss = metaxl_evograd_meta_step(
                cfg.evograd_estimator, model, rtn, source, target, meta, cfg.transfer_layer,
                candidate_encoder=cfg.candidate_encoder, n_candidates=cfg.n_candidates, sigma=cfg.sigma,
                temperature=cfg.temperature, generator=generator)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        meta_optimizer.step()
        if meta_scheduler is not None:
            meta_scheduler.step()
    if method == "joint_training" and cfg.joint_loss == "half":
        train_loss = main_update(model, optimizer, scheduler, source, target, rtn, cfg.transfer_layer, None, scale=0.5)
    elif method == "joint_training" and cfg.joint_loss != "sum_clipped":
        raise ValueError(f"unknown joint_loss {cfg.joint_loss!r}; choose from {JOINT_LOSSES}")
    else:
        train_loss = main_update(model, optimizer, scheduler, source, target, rtn, cfg.transfer_layer,
                                 cfg.max_grad_norm)
    return {"train_loss": train_loss, "meta_loss": meta_loss}


OPTIMIZERS = ("adam", "adamw")


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam with weight decay coupled into the gradient, or AdamW with it decoupled.

    ``adam`` (the MetaXL/EvoGrad code): g ← ∇L + wd·θ, then Adam's moments and step, so a
    parameter whose data gradient is 0 (an embedding row of a sub-token absent from the batch)
    moves by ≈ lr·sign(θ) per step towards 0 whatever wd is. ``adamw``: Adam's step on ∇L alone,
    then θ ← θ − lr·wd·θ.

    Raises:
        ValueError: on an unknown name or a negative weight decay.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, weight_decay=weight_decay)


def to_device(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def load_tokenizer(model_name: str, vocab: dict[str, int] | None = None):
    """The whole-word tokenizer over ``vocab`` for ``tiny``, else the model's fast tokenizer.

    Raises:
        CLIError: if the tokenizer cannot be loaded (offline, wrong path).
    """
    if model_name == TINY:
        return word_level_tokenizer(vocab)
    try:
        return AutoTokenizer.from_pretrained(model_name, use_fast=True)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load the tokenizer of {model_name!r} ({str(err).splitlines()[0]}); "
                       "use --model tiny offline") from None


@torch.no_grad()
def evaluate(model, tokenizer, sentences: list[Sentence], max_length: int, batch_size: int,
             device: torch.device, fmt: InputFormat | None = None) -> dict[str, float]:
    """Entity-level precision, recall and F1 (in %, ``seqeval``) of the tags at first sub-tokens.

    Each prediction goes to its own word (``Encoded.label_words``); a word without a labelled
    sub-token (cut off by ``max_length``, or no sub-token in the ``xlmr`` format) is predicted ``O``
    in its place, so later words stay aligned with their gold tags. ``fmt`` None: ``xlmr``.
    """
    items = encode(tokenizer, sentences, max_length, fmt)
    was_training = model.training
    model.eval()
    predicted = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = collate(chunk, fmt if fmt is not None else tokenizer.pad_token_id)
        logits = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits
        best = logits.argmax(-1).cpu()  # [B, T]
        for i, item in enumerate(chunk):
            tags = ["O"] * item.n_words
            for word, k in zip(item.label_words, best[i][batch["labels"][i] != IGNORE_INDEX].tolist()):
                tags[word] = LABELS[k]
            predicted.append(tags)
    model.train(was_training)
    gold = [tags for _, tags in sentences]
    scores = {name: 100 * score(gold, predicted, zero_division=0)  # no entity predicted -> 0, not a warning
              for name, score in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score))}
    return scores
