"""Hypergradient estimators beyond EvoGrad and the one-step second-order baseline.

The base model θ takes SGD steps on L_train(θ, λ); the hypergradient is dL_val(θ_T)/dλ with

    θ_0 = θ,   θ_{t+1} = θ_t − η ∇_θ L_train(θ_t, λ),   t = 0..T−1.

Two estimators, each with the loss-callable call shape of ``common.evograd`` (a loss callable
maps a dict[str, Tensor] of base-model parameters to a scalar loss):

    finite_difference_hypergrad  the one-step (T = 1) hypergradient with the mixed second
                                 derivative replaced by central differences (DARTS); returns the
                                 validation loss and accumulates into ``.grad`` itself.
    multistep_meta_loss          multi-step estimation (Kim, Park, Choi 2020): one gradient per
                                 window of W inner steps, reused for the rest of the window;
                                 returns L_val(θ_T), differentiable w.r.t. λ (call ``.backward()``).

The T-step unrolled hypergradient (``unrolled`` in ``common.hypergrad.ESTIMATORS``) is
``common.second_order.second_order_meta_loss`` with ``inner_steps=T``: T forward and T
double-backward-capable backward passes, T training graphs and T + 1 parameter copies alive until
``backward()`` (memory linear in T). ``common.hypergrad.meta_backward`` selects any of them by name.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from common.distributed import data_parallel
from common.evograd import check_finite_losses, check_hyperparams, check_scalar_loss, scalar_loss
from common.second_order import check_inner_args

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]


def check_window(inner_steps: int, window: int) -> None:
    """Raise ``ValueError`` unless 1 ≤ W ≤ T (both integers)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window (W) must be an integer >= 1, got {window!r}")
    if window > inner_steps:
        raise ValueError(f"window (W = {window}) must be <= inner_steps (T = {inner_steps}): "
                         "a window cannot be longer than the unroll")


def _grads_or_zeros(outputs: Tensor, inputs: Sequence[Tensor], **kwargs) -> list[Tensor]:
    """``torch.autograd.grad`` with zeros in place of None for inputs the output does not use."""
    grads = torch.autograd.grad(outputs, list(inputs), allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@data_parallel(returns_meta_loss=False)
def finite_difference_hypergrad(
    params: Mapping[str, Tensor],
    hyperparams: Sequence[Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    inner_lr: float,
    fd_epsilon: float = 0.01,
) -> Tensor:
    """One-step hypergradient with a central-difference mixed derivative; accumulates into ``.grad``.

    The one-step (T = 1) hypergradient of ``second_order_meta_loss`` is

        dL_val(θ')/dλ = ∂L_val/∂λ − η (∂²L_train/∂λ∂θ) v,   θ' = θ − η ∇_θ L_train(θ, λ),
        v = ∇_θ' L_val(θ'),

    and the mixed second-derivative-vector product is replaced (as in DARTS, Liu et al. 2019) by

        (∂²L_train/∂λ∂θ) v ≈ [∇_λ L_train(θ + εv, λ) − ∇_λ L_train(θ − εv, λ)] / (2ε),
        ε = fd_epsilon / ‖v‖,

    so the perturbation θ ± εv has norm ``fd_epsilon`` whatever the scale of v. The error is
    O(ε²) (third derivatives of ∇_λ L_train along v); it vanishes when ∇_λ L_train is quadratic
    in θ.

    Cost: 3 forward + 3 ordinary backward passes of the training loss (one for ∇_θ, two for ∇_λ
    at θ ± εv) and 1 forward + 1 backward of the validation loss; no double backward, no graph
    of the inner update. Memory: one loss graph at a time and three parameter-sized tensors
    (θ', v, θ ± εv), whatever the network.

    Args:
        params: θ, dict of tensors (detached inside; θ receives no gradient).
        hyperparams: the λ tensors that receive the hypergradient (``requires_grad=True``).
        train_loss_fn: parameter dict -> scalar training loss (depends on λ).
        val_loss_fn: parameter dict -> scalar validation loss.
        inner_lr: η > 0 of the virtual SGD step.
        fd_epsilon: norm of the finite-difference perturbation, > 0.

    Returns:
        L_val(θ') (a detached scalar tensor).

    Raises:
        ValueError: on bad arguments, an empty ``hyperparams``, or a non-scalar or non-finite loss.
    """
    check_inner_args(params, inner_lr, 1)
    if not (isinstance(fd_epsilon, (int, float)) and math.isfinite(fd_epsilon) and fd_epsilon > 0):
        raise ValueError(f"fd_epsilon must be a finite number > 0, got {fd_epsilon!r}")
    hyperparams = check_hyperparams(hyperparams)
    names = list(params)
    theta = [params[n].detach() for n in names]

    # virtual step θ' = θ − η ∇_θ L_train(θ, λ), outside any graph
    leaves = [t.clone().requires_grad_() for t in theta]
    train_loss = scalar_loss(train_loss_fn(dict(zip(names, leaves))), "train_loss_fn")
    losses = [train_loss.detach()]  # checked for finiteness once, before .grad is written
    with torch.no_grad():
        virtual = [t - inner_lr * g for t, g in zip(theta, _grads_or_zeros(train_loss, leaves))]
    del train_loss, leaves

    virtual = [t.requires_grad_() for t in virtual]
    val_loss = scalar_loss(val_loss_fn(dict(zip(names, virtual))), "val_loss_fn")
    losses.append(val_loss.detach())
    grads = _grads_or_zeros(val_loss, [*virtual, *hyperparams])
    v, direct = grads[: len(virtual)], grads[len(virtual):]
    del virtual

    # ε = fd_epsilon / ||v|| stays a tensor (no host read); with v = 0 both sides equal θ and the
    # difference term is exactly zero, as it should be
    v_norm = torch.sqrt(sum((g.to(torch.float64) ** 2).sum() for g in v))
    eps = fd_epsilon / v_norm.clamp_min(torch.finfo(torch.float64).tiny)
    side_grads = []
    for sign in (1.0, -1.0):
        shifted = {n: t + (sign * eps * g).to(t.dtype) for n, t, g in zip(names, theta, v)}
        loss = scalar_loss(train_loss_fn(shifted), "train_loss_fn (finite difference)")
        losses.append(loss.detach())
        side_grads.append(_grads_or_zeros(loss, hyperparams))
        del shifted, loss
    total = [d - inner_lr * ((gp - gm) / (2 * eps)).to(d.dtype) for d, gp, gm in zip(direct, *side_grads)]
    check_finite_losses(torch.stack(losses), ["train_loss_fn", "val_loss_fn", "train_loss_fn (finite difference, +)",
                                              "train_loss_fn (finite difference, −)"])
    with torch.no_grad():
        for h, g in zip(hyperparams, total):
            h.grad = g.detach().clone() if h.grad is None else h.grad + g
    return val_loss.detach()


@data_parallel(returns_meta_loss=True)
def multistep_meta_loss(
    params: Mapping[str, Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 1,
    window: int | None = None,
) -> Tensor:
    """L_val(θ_T) of a T-step unroll in which each gradient serves a window of W steps.

    Multi-step estimation (Kim, Park, Choi 2020, "Multi-step Estimation for Gradient-based
    Meta-learning", arXiv 2006.04298): the gradient is computed once at the start of each window
    and reused for the window's remaining steps,

        g = ∇_θ L_train(θ_s, λ),   θ_{s+j} = θ_s − j η g,   j = 1..W   (s = 0, W, 2W, ...),

    the last window being shorter when W does not divide T. Second-order terms (the graph of g)
    are therefore formed once per window. W = 1 is the ordinary T-step unroll
    (``unrolled``, i.e. ``second_order_meta_loss``); W = T takes one gradient for the whole unroll (a single step of
    size Tη).

    Cost: ⌈T/W⌉ forward + ⌈T/W⌉ backward passes of the training loss with ``create_graph=True``;
    ``backward()`` then runs ⌈T/W⌉ Hessian-vector products. Memory: ⌈T/W⌉ training graphs and
    ⌈T/W⌉ + 1 parameter copies.

    Args:
        params: θ, dict of tensors (detached inside; θ receives no gradient).
        train_loss_fn: parameter dict -> scalar training loss (depends on λ).
        val_loss_fn: parameter dict -> scalar validation loss.
        inner_lr: η > 0 of each inner SGD step.
        inner_steps: T ≥ 1.
        window: W with 1 ≤ W ≤ T; None means W = T.

    Returns:
        L_val(θ_T), differentiable w.r.t. λ.

    Raises:
        ValueError: on T < 1, W < 1, W > T, η ≤ 0, empty params, or a non-scalar or non-finite loss.
    """
    check_inner_args(params, inner_lr, inner_steps)
    window = inner_steps if window is None else window
    check_window(inner_steps, window)
    names = list(params)
    fast = [params[n].detach().requires_grad_() for n in names]
    done = 0
    while done < inner_steps:
        steps = min(window, inner_steps - done)
        loss = check_scalar_loss(train_loss_fn(dict(zip(names, fast))), f"train_loss_fn (step {done})")
        grads = _grads_or_zeros(loss, fast, create_graph=True)
        fast = [p - (steps * inner_lr) * g for p, g in zip(fast, grads)]
        done += steps
    return check_scalar_loss(val_loss_fn(dict(zip(names, fast))), "val_loss_fn")
