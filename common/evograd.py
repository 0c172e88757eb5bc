"""EvoGrad hypergradients (Bohdal, Yang, Hospedales, NeurIPS 2021, arXiv 2106.10575).

A meta-learning problem has base-model parameters θ, trained on a training loss L_train(θ, λ),
and hyperparameters λ, trained on a validation loss L_val(θ). One EvoGrad meta step is

    ε_k ~ σ·sign(N(0, I))  (or σ·N(0, I)),     θ_k = θ + ε_k,             k = 1..K
    ℓ_k = L_train(θ_k, λ),                      w = softmax(−ℓ / τ)
    θ*  = Σ_k w_k θ_k = θ + Σ_k w_k ε_k,        ∂L_val(θ*)/∂λ  via  w(λ)

θ is treated as a constant: the hypergradient flows through the K scalar losses ℓ_k only, so
there are no second-order derivatives and no graph of an inner update.

Scale. To first order in σ (w_k ≈ 1/K, ℓ_k ≈ ℓ + ∇_θℓ·ε_k) and with E[ε εᵀ] = σ² I,

    E[∂L_val(θ*)/∂λ] = −η_eff · (∂²L_train/∂λ∂θ) ∇_θ L_val(θ),     η_eff = (K − 1) σ² / (K τ),

i.e. on average EvoGrad is the one-step second-order hypergradient with a virtual learning rate
η_eff (1e-5 for K = 2, σ = 1e-3, τ = 0.05), plus zero-mean noise whose size relative to the mean
is about 1 / |cos(∂²L_train/∂λ∂θ · , ∇L_val)| per draw. Compared with a second-order step with
virtual learning rate η it is smaller by η_eff / η on average: a meta learning rate tuned for one
does not transfer to the other (``effective_inner_lr``; ``tests/test_evograd.py`` pins the formula).

Public entry points:
    evograd_meta_loss            the plain path: returns L_val(θ*), call ``.backward()`` on it;
                                 ``batch_candidates=True`` runs the K candidate passes as one
                                 ``torch.func.vmap`` (K parameter copies in memory).
    evograd_hypergrad_low_memory the same hypergradient, one candidate graph alive at a time.
    candidate_weights            softmax(−ℓ/τ) over candidates (dim 0), for vectorised problems.
    effective_inner_lr           η_eff = (K − 1) σ² / (K τ), the scale of EvoGrad's mean (above).
    perturbable_params / functional_forward   nn.Module helpers built on torch.func.
    check_finite_losses          the one finiteness check (one host read) of a meta step.

Host synchronisation: the candidate passes queue work only; the losses of a meta step are checked
for finiteness once, after the validation loss, with a single host read (not once per candidate),
so on a GPU the K candidates run without waiting for each other.
"""
from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from common.distributed import broadcast_seeds, data_parallel, mark_gradient_summed_elsewhere, sum_over_ranks
from common.precision import full_precision

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]
NOISE_KINDS = ("sign", "gaussian")
NOISE_ADDRESSING = ("stream", "index")  # CandidateNoise, common.fsdp.IndexedNoise


class EvoGradOutput(NamedTuple):
    """Result of one EvoGrad step.

    Attributes:
        val_loss: L_val(θ*). Differentiable w.r.t. λ for ``evograd_meta_loss``; detached for the
            low-memory path (whose hypergradients are already in ``.grad``).
        candidate_losses: ℓ_k, shape [K], detached.
        weights: w = softmax(−ℓ/τ), shape [K], detached.
    """

    val_loss: Tensor
    candidate_losses: Tensor
    weights: Tensor


def effective_inner_lr(n_candidates: int, sigma: float, temperature: float) -> float:
    """η_eff = (K − 1) σ² / (K τ): EvoGrad's mean hypergradient is the one-step second-order one at η_eff.

    First order in σ, for noise with E[ε εᵀ] = σ² I (both noise kinds); see the module docstring.
    Multiplying an EvoGrad hypergradient by η / η_eff gives, on average, the second-order
    hypergradient of a virtual SGD step with learning rate η.

    Args:
        n_candidates: K ≥ 2.
        sigma: σ > 0.
        temperature: τ > 0.

    Raises:
        ValueError: on K < 2, σ ≤ 0 or τ ≤ 0.
    """
    _check_candidates(n_candidates)
    _check_positive("sigma", sigma)
    _check_positive("temperature", temperature)
    return (n_candidates - 1) * sigma ** 2 / (n_candidates * temperature)


def candidate_weights(losses: Tensor, temperature: float) -> Tensor:
    """Softmax weights of candidates, w_k = exp(−ℓ_k/τ) / Σ_j exp(−ℓ_j/τ), over dim 0.

    Args:
        losses: candidate losses, shape [K, ...]; trailing dims index independent problems.
        temperature: τ > 0.

    Returns:
        Weights of the same shape as ``losses``, summing to one over dim 0.
    """
    _check_positive("temperature", temperature)
    return torch.softmax(-losses / temperature, dim=0)


class CandidateNoise:
    """Perturbations ε_k regenerated on demand from one integer seed per candidate.

    Storing K seeds instead of K noise tensors is what keeps EvoGrad's memory at one parameter
    copy: ε_k is drawn again whenever it is needed (merge forward, merge backward).

    ``device=None`` draws ε_k on each parameter's own device (its own generator there). A fixed
    ``device`` (e.g. ``"cpu"``) draws it there and moves it to the parameter's device, so the same
    seeds give the same ε_k on a CPU and on a GPU (CUDA and CPU generators produce different
    streams from one seed); the price is a host-to-device copy of every ε_k.
    """

    def __init__(self, seeds: Sequence[int], sigma: float, kind: str,
                 device: torch.device | str | None = None) -> None:
        self.seeds = [int(s) for s in seeds]
        self.sigma = float(sigma)
        self.kind = kind
        self.device = None if device is None else torch.device(device)

    def __len__(self) -> int:
        return len(self.seeds)

    def sample(self, k: int, like: Iterable[Tensor]) -> list[Tensor]:
        """ε_k for every tensor in ``like`` (same shapes, dtypes, devices, order)."""
        generators: dict[torch.device, torch.Generator] = {}
        out = []
        for ref in like:
            draw_device = ref.device if self.device is None else self.device
            gen = generators.get(draw_device)
            if gen is None:
                gen = torch.Generator(device=draw_device).manual_seed(self.seeds[k])
                generators[draw_device] = gen
            eps = torch.randn(ref.shape, generator=gen, device=draw_device, dtype=ref.dtype)
            if self.kind == "sign":
                eps.sign_()
            out.append(eps.mul_(self.sigma).to(ref.device, non_blocking=True))
        return out


class _MergeCandidates(torch.autograd.Function):
    """θ* = θ + Σ_k w_k ε_k with ∂θ*/∂w_k = ε_k, regenerating ε_k in backward (no K copies saved)."""

    @staticmethod
    def forward(ctx, weights: Tensor, noise: CandidateNoise, *base: Tensor):  # type: ignore[override]
        ctx.noise = noise
        ctx.weight_dtype = weights.dtype
        ctx.shapes = [(b.shape, b.dtype, b.device) for b in base]
        merged = [b.detach().clone() for b in base]
        for k in range(len(noise)):
            for m, eps in zip(merged, noise.sample(k, merged)):
                m.add_(eps.mul_(weights[k].to(m.dtype)))
        return tuple(merged)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        refs = [torch.empty(s, dtype=d, device=dev) for s, d, dev in ctx.shapes]
        dw = _noise_dots(grads, ctx.noise, refs).to(ctx.weight_dtype)  # ∂L/∂w_k = <∂L/∂θ*, ε_k>
        return (dw, None) + (None,) * len(refs)


def _noise_dots(grads: Sequence[Tensor], noise: CandidateNoise, like: Sequence[Tensor]) -> Tensor:
    """[<grads, ε_k> for k], shape [K] in float64: per-tensor dot products, summed over tensors.

    ``grads`` is ∇_θ* L_val, left rank-local under ``torch.distributed`` (see
    ``merge_candidates``): the K dots are summed over ranks here (``common.distributed``).
    """
    return sum_over_ranks(torch.stack([
        sum(torch.dot(g.reshape(-1), e.reshape(-1)).to(torch.float64) for g, e in zip(grads, noise.sample(k, like)))
        for k in range(len(noise))
    ]))


def merge_candidates(params: Mapping[str, Tensor], weights: Tensor, noise: CandidateNoise) -> Params:
    """θ* = θ + Σ_k w_k ε_k, differentiable w.r.t. ``weights`` only.

    Args:
        params: θ, a dict of tensors (treated as constants).
        weights: w, shape [K].
        noise: the K perturbations, as seeds.

    Returns:
        θ* as a dict with the keys of ``params``.
    """
    merged = _MergeCandidates.apply(weights, noise, *params.values())
    mark_gradient_summed_elsewhere(merged)  # data parallel: ∇θ* stays rank-local, <∇θ*, ε_k> is summed
    return dict(zip(params.keys(), merged))


@data_parallel(returns_meta_loss=True)
def evograd_meta_loss(
    params: Mapping[str, Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    n_candidates: int = 2,
    sigma: float = 1e-3,
    temperature: float = 0.05,
    noise: str = "sign",
    generator: torch.Generator | None = None,
    return_diagnostics: bool = False,
    batch_candidates: bool = False,
    noise_device: torch.device | str | None = None,
    candidates_in_float32: bool = True,
) -> Tensor | EvoGradOutput:
    """Validation loss at the EvoGrad-merged parameters, differentiable w.r.t. hyperparameters.

    Computes ℓ_k = L_train(θ + ε_k), w = softmax(−ℓ/τ), θ* = θ + Σ_k w_k ε_k and returns
    L_val(θ*). Calling ``.backward()`` on it puts ∂L_val(θ*)/∂λ into the ``.grad`` of every
    tensor that ``train_loss_fn`` depends on and that requires grad; θ receives nothing (it is
    detached inside).

    Memory: at any time one perturbed copy θ_k is built; ε_k is regenerated from a per-candidate
    seed when merging and again in the backward pass, so no K parameter copies are kept. What
    stays alive until ``backward()`` is θ*, the validation graph, and the K training-loss graphs
    (small when λ acts on the loss, e.g. Meta-Weight-Net; up to K network graphs when λ acts on
    the input or inside the network: use ``evograd_hypergrad_low_memory`` then).

    Batched candidates (``batch_candidates=True``): the K perturbed parameter sets are stacked
    into tensors of shape [K, ...] and ``train_loss_fn`` runs once under
    ``torch.func.vmap(train_loss_fn)`` over them, one batched pass in place of K passes. Same
    seeds, same ε_k, same ℓ_k and the same hypergradient as the loop (to rounding; tested to 1e-6
    in float64). Memory: **K full parameter copies** are held during the candidate pass (the loop
    holds one), plus the activations of all K candidates at once. ``train_loss_fn`` must be
    vmappable: no randomness (dropout in training mode), no ``.item()`` or data-dependent Python
    control flow, no in-place update of a module buffer. BatchNorm in training mode is handled
    when the model runs through ``functional_forward``: it normalises with the batch statistics
    as in the loop, and its running statistics are not read or written (the loop leaves them
    unchanged too). Anything else that vmap refuses raises ``ValueError``. Where it pays off,
    measured side by side on a CPU (docs/batched_candidates.md): only where each candidate
    pass is too small to keep the cores busy (rotation's LeNet width 1, K = 2, 5, 10: 0.9× the
    loop's time); at LeNet width 4 (1.1–1.5×) and on Meta-Weight-Net's ResNet-32 (1.05–1.7×) it
    was slower, and it always took more memory (1.1–1.9×). On a GPU, where small passes leave the
    card idle, ``make gpu-bench`` measures it.

    Host synchronisation: the candidate losses are not read on the host one by one; one check,
    after the validation loss, reads whether all K + 1 losses are finite.

    Args:
        params: θ, dict of tensors. Detached inside.
        train_loss_fn: maps a parameter dict to the scalar training loss (depends on λ).
        val_loss_fn: maps a parameter dict to the scalar validation loss.
        n_candidates: K ≥ 2.
        sigma: σ > 0, perturbation scale.
        temperature: τ > 0, softmax temperature.
        noise: "sign" for σ·sign(N(0,1)) (the network experiments) or "gaussian" for σ·N(0,1).
        generator: optional torch.Generator; the K noise seeds are drawn from it (else from the
            global RNG), so a seeded generator makes the step reproducible.
        return_diagnostics: if True return an ``EvoGradOutput`` with the candidate losses and
            weights as well.
        batch_candidates: run the K candidate passes as one ``torch.func.vmap`` (see above).
        noise_device: draw ε_k on this device and move it to θ's (``"cpu"`` makes CPU and CUDA
            runs with the same generator use the same noise); default: on θ's own device.
        candidates_in_float32: under ``torch.autocast``, run the K candidate passes (forward, and
            so their backward) with autocast off, in float32 (``common.precision.full_precision``);
            the validation pass keeps the caller's autocast. The K candidates differ by σ·‖∇ℓ‖,
            near bfloat16's resolution: in bfloat16 the differences of their gradients w.r.t. λ,
            which make the hypergradient, are mostly rounding (common/HYPERGRAD_STUDY.md,
            "Reduced precision"). No effect outside autocast. Call ``.backward()`` on the result
            outside autocast too (PyTorch's advice; ``meta_backward`` does): a backward pass run
            under a CPU autocast recasts the float32 candidate graphs' backward ops to bfloat16.

    Returns:
        L_val(θ*) (a scalar tensor), or an ``EvoGradOutput`` if ``return_diagnostics``.

    Raises:
        ValueError: on K < 2, σ ≤ 0, τ ≤ 0, unknown noise, empty params, a non-scalar or
            non-finite loss, or (``batch_candidates``) a ``train_loss_fn`` that vmap cannot run.
    """
    base, noise_spec = _prepare(params, n_candidates, sigma, temperature, noise, generator, noise_device)
    with full_precision(candidates_in_float32):
        if batch_candidates:
            losses_t = _batched_candidate_losses(base, noise_spec, train_loss_fn)
        else:
            losses = []
            for k in range(n_candidates):
                candidate = {n: p + e for (n, p), e in zip(base.items(), noise_spec.sample(k, base.values()))}
                losses.append(scalar_loss(train_loss_fn(candidate), f"train_loss_fn (candidate {k})"))
                del candidate
            losses_t = torch.stack(losses)
    if not losses_t.requires_grad:
        raise ValueError(
            "train_loss_fn does not depend on any tensor that requires grad, so no hyperparameter "
            "would receive a hypergradient")
    weights = candidate_weights(losses_t, temperature)
    val_loss = scalar_loss(val_loss_fn(merge_candidates(base, weights, noise_spec)), "val_loss_fn")
    check_finite_losses(torch.cat([losses_t.detach(), val_loss.detach().reshape(1)]),
                        [f"train_loss_fn (candidate {k})" for k in range(n_candidates)] + ["val_loss_fn"])
    if return_diagnostics:
        return EvoGradOutput(val_loss, losses_t.detach(), weights.detach())
    return val_loss


# Set while ``train_loss_fn`` runs under vmap over candidates: ``functional_forward`` then keeps
# BatchNorm from touching its (unbatched) running statistics.
_VMAPPED_CANDIDATES: contextvars.ContextVar[bool] = contextvars.ContextVar("evograd_vmapped_candidates",
                                                                           default=False)


def _batched_candidate_losses(base: Params, noise_spec: CandidateNoise, train_loss_fn: LossFn) -> Tensor:
    """[ℓ_1, ..., ℓ_K] from one ``torch.func.vmap`` of ``train_loss_fn`` over K stacked θ + ε_k."""
    n_candidates = len(noise_spec)
    stacked = {n: p.unsqueeze(0).repeat(n_candidates, *([1] * p.dim())) for n, p in base.items()}
    for k in range(n_candidates):   # K copies of θ (the price of batching), one ε_k at a time
        for copies, eps in zip(stacked.values(), noise_spec.sample(k, base.values())):
            copies[k].add_(eps)

    def one_candidate(candidate: Params) -> Tensor:
        return scalar_loss(train_loss_fn(candidate), "train_loss_fn (batched candidates)")

    token = _VMAPPED_CANDIDATES.set(True)
    try:
        return torch.func.vmap(one_candidate, randomness="error")(stacked)
    except RuntimeError as err:
        reason = (str(err).strip().splitlines() or ["unknown error"])[0]
        raise ValueError(
            f"batch_candidates=True: train_loss_fn cannot run under torch.func.vmap ({reason}); it must be "
            "free of randomness (dropout in training mode), .item() and in-place buffer updates outside "
            "functional_forward. Use batch_candidates=False (the loop over candidates).") from err
    finally:
        _VMAPPED_CANDIDATES.reset(token)


@data_parallel(returns_meta_loss=False)
def evograd_hypergrad_low_memory(
    params: Mapping[str, Tensor],
    hyperparams: Sequence[Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    n_candidates: int = 2,
    sigma: float = 1e-3,
    temperature: float = 0.05,
    noise: str = "sign",
    generator: torch.Generator | None = None,
    noise_device: torch.device | str | None = None,
    candidates_in_float32: bool = True,
    noise_addressing: str = "stream",
) -> EvoGradOutput:
    """EvoGrad hypergradient with one candidate graph alive at a time; accumulates into ``.grad``.

    Same value as ``evograd_meta_loss(...).backward()`` (same seeds, same noise), computed as

        g_k = ∂ℓ_k/∂λ                      (one candidate at a time, graph freed after)
        a_k = ∂L_val/∂w_k = <∇_θ* L_val, ε_k>
        ∂L_val/∂ℓ_k = −(w_k/τ)(a_k − Σ_j w_j a_j)          (softmax(−ℓ/τ) Jacobian)
        ∂L_val/∂λ = Σ_k (∂L_val/∂ℓ_k) g_k  (+ any direct dependence of L_val on λ)

    Peak memory is one training graph (or the validation graph), whatever K is. Meant for λ that
    act on the input or inside the network (rotation angle, feature-wise transformations).

    Args:
        params: θ, dict of tensors. Detached inside.
        hyperparams: the λ tensors to receive gradients (``requires_grad=True``).
        train_loss_fn, val_loss_fn, n_candidates, sigma, temperature, noise, generator,
            noise_device, candidates_in_float32: as in ``evograd_meta_loss``.
        noise_addressing: "stream" (``CandidateNoise``) or "index" (``common.fsdp.IndexedNoise``:
            each element's noise from its parameter's name and index, the noise of the sharded
            EvoGrad ``common.fsdp.sharded_evograd_hypergrad``; ``noise_device`` is then unused).

    Returns:
        ``EvoGradOutput`` with the detached validation loss, candidate losses and weights.

    Raises:
        ValueError: as ``evograd_meta_loss``, or if ``hyperparams`` is empty or holds a tensor
            that does not require grad.
    """
    hyperparams = check_hyperparams(hyperparams)
    base, noise_spec = _prepare(params, n_candidates, sigma, temperature, noise, generator, noise_device,
                                noise_addressing)

    losses, loss_grads = [], []  # loss_grads[k][i] = ∂ℓ_k/∂λ_i
    for k in range(n_candidates):
        candidate = {n: p + e for (n, p), e in zip(base.items(), noise_spec.sample(k, base.values()))}
        with full_precision(candidates_in_float32):
            loss = scalar_loss(train_loss_fn(candidate), f"train_loss_fn (candidate {k})")
        del candidate
        with full_precision():  # backward outside autocast (on CPU it would recast the float32 graph)
            grads = torch.autograd.grad(loss, hyperparams, allow_unused=True)
        losses.append(loss.detach())
        loss_grads.append([torch.zeros_like(h) if g is None else g for g, h in zip(grads, hyperparams)])
        del loss, grads
    losses_t = torch.stack(losses)
    weights = candidate_weights(losses_t, temperature)

    with torch.no_grad():
        merged = merge_candidates(base, weights, noise_spec)
    merged = {n: m.requires_grad_() for n, m in merged.items()}
    val_loss = scalar_loss(val_loss_fn(merged), "val_loss_fn")
    check_finite_losses(torch.cat([losses_t, val_loss.detach().reshape(1)]),  # the step's one host read
                        [f"train_loss_fn (candidate {k})" for k in range(n_candidates)] + ["val_loss_fn"])
    with full_precision():
        grads = torch.autograd.grad(val_loss, [*merged.values(), *hyperparams], allow_unused=True)
    grad_merged, grad_direct = grads[: len(merged)], grads[len(merged):]

    with torch.no_grad():
        grad_merged = [torch.zeros_like(m) if g is None else g for g, m in zip(grad_merged, merged.values())]
        dl_dw = _noise_dots(grad_merged, noise_spec, grad_merged).to(weights.dtype)
        dl_dloss = -(weights / temperature) * (dl_dw - (weights * dl_dw).sum())
        for i, h in enumerate(hyperparams):
            total = sum(dl_dloss[k] * loss_grads[k][i] for k in range(n_candidates))
            if grad_direct[i] is not None:
                total = total + grad_direct[i]
            h.grad = total.detach().clone() if h.grad is None else h.grad + total
    return EvoGradOutput(val_loss.detach(), losses_t, weights)


# ---------------------------------------------------------------------------------------------
# nn.Module helpers (torch.func)
# ---------------------------------------------------------------------------------------------

def perturbable_params(module: nn.Module, include: Callable[[str], bool] | None = None) -> Params:
    """θ of a module as a dict of detached tensors, optionally filtered by name.

    Args:
        module: the base model.
        include: ``include(name) -> bool`` picks the parameters that form θ (e.g. only the
            classifier head, or everything but feature-wise-transformation parameters). The
            parameters left out keep their live values in ``functional_forward``.

    Returns:
        ``{name: parameter.detach()}`` in the module's parameter order.

    Raises:
        ValueError: if the filter leaves no parameter.
    """
    params = {n: p.detach() for n, p in module.named_parameters() if include is None or include(n)}
    if not params:
        raise ValueError("no parameter of the module passed the include filter")
    return params


def functional_forward(module: nn.Module, params: Mapping[str, Tensor], *args, **kwargs):
    """``module(*args, **kwargs)`` with the tensors in ``params`` in place of its parameters.

    Names missing from ``params`` use the module's own parameters. Buffers are cloned for the
    call, so BatchNorm in training mode normalises with batch statistics as usual but its running
    statistics (and ``num_batches_tracked``) are left unchanged by candidate, virtual-step and
    validation passes. Under ``evograd_meta_loss(..., batch_candidates=True)`` (vmap over the
    candidates) BatchNorm layers in training mode get no running statistics at all: they
    normalise with batch statistics, which is what the loop does, and nothing is updated.
    """
    buffers: dict[str, Tensor | None] = {n: b.clone() for n, b in module.named_buffers()}
    if _VMAPPED_CANDIDATES.get():
        for prefix, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.training and sub.track_running_stats:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    buffers[f"{prefix}.{name}" if prefix else name] = None
    return torch.func.functional_call(module, {**params, **buffers}, args, kwargs, strict=False)


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------

def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_candidates(n_candidates: int) -> None:
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 2:
        raise ValueError(f"n_candidates (K) must be an integer >= 2, got {n_candidates!r}")


def _prepare(params, n_candidates, sigma, temperature, noise, generator, noise_device=None,
             noise_addressing="stream", offsets=None):
    """(θ detached, the K candidates' noise) after the argument checks; the seeds are rank 0's.

    ``noise_addressing="index"`` gives ``common.fsdp.IndexedNoise`` (element i of a tensor from
    (seed, name, offsets[j] + i), so a shard's noise is a slice of the whole tensor's) instead of
    ``CandidateNoise``; ``offsets`` (default all 0) as there.
    """
    if noise_addressing not in NOISE_ADDRESSING:
        raise ValueError(f"noise_addressing must be one of {NOISE_ADDRESSING}, got {noise_addressing!r}")
    _check_candidates(n_candidates)
    _check_positive("sigma", sigma)
    _check_positive("temperature", temperature)
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ValueError("params must be a non-empty dict of tensors")
    base = {n: p.detach() for n, p in params.items()}
    device = generator.device if generator is not None else torch.device("cpu")
    seeds = broadcast_seeds(torch.randint(0, 2**62, (n_candidates,), generator=generator, device=device).tolist())
    try:
        noise_device = None if noise_device is None else torch.device(noise_device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"noise_device must name a torch device such as 'cpu' or 'cuda', got {noise_device!r}") from err
    if noise_addressing == "index":
        from common.fsdp import IndexedNoise  # common.fsdp imports this module
        return base, IndexedNoise(seeds, sigma, noise, list(base), offsets)
    return base, CandidateNoise(seeds, sigma, noise, noise_device)


def scalar_loss(loss: Tensor, what: str) -> Tensor:
    """Return ``loss`` as a 0-d tensor; ``ValueError`` naming ``what`` if it is not a one-element tensor.

    Reads only the shape, never the value, so it does not wait for a GPU.
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{what} must return a scalar tensor, got {shape}")
    return loss.reshape(())


def check_hyperparams(hyperparams: Iterable[Tensor], leaf: bool = False) -> list[Tensor]:
    """λ as a list, checked: non-empty, every entry a tensor with ``requires_grad=True`` (and, with
    ``leaf``, a leaf: the sharded estimators read λ's ``.grad``).

    Raises:
        ValueError: one line naming the first entry at fault.
    """
    hyperparams = list(hyperparams)
    kind = "leaf tensors" if leaf else "tensors"
    if not hyperparams:
        raise ValueError(f"hyperparams is empty: pass a non-empty list of {kind} with requires_grad=True, the "
                         "tensors that receive hypergradients")
    for i, h in enumerate(hyperparams):
        if not isinstance(h, Tensor):
            problem = f"is a {type(h).__name__}"
        elif not h.requires_grad:
            problem = "does not require grad"
        elif leaf and not h.is_leaf:
            problem = "is not a leaf"
        else:
            continue
        raise ValueError(f"hyperparams must be a non-empty list of {kind} with requires_grad=True; "
                         f"hyperparams[{i}] {problem}")
    return hyperparams


def check_finite_losses(losses: Tensor, whats: Sequence[str]) -> None:
    """``ValueError`` naming the first non-finite entry of ``losses`` (shape [n], one name each).

    One host read (``bool`` of ``isfinite(losses).all()``) however many losses: a meta step calls
    it once on all of its losses instead of once per loss.
    """
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{whats[first]} returned a non-finite loss ({losses[first].item()})")


def check_scalar_loss(loss: Tensor, what: str) -> Tensor:
    """Return ``loss`` as a 0-d tensor; ``ValueError`` naming ``what`` if it is not a finite scalar.

    One host read per call; the EvoGrad paths use ``scalar_loss`` per loss and one
    ``check_finite_losses`` per meta step instead.
    """
    loss = scalar_loss(loss, what)
    check_finite_losses(loss.reshape(1), [what])
    return loss
