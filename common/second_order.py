"""Second-order (unrolled) hypergradients: the baseline EvoGrad is compared against.

With T differentiable SGD steps of the base model on the training loss,

    θ_0 = θ,   θ_{t+1} = θ_t − η ∇_θ L_train(θ_t, λ),   t = 0..T−1,

the hypergradient is dL_val(θ_T)/dλ, obtained by backpropagating through the unrolled updates.
For T = 1 it is −η (∂²L_train/∂λ∂θ) ∇_θ' L_val(θ') (plus any direct dependence of L_val on λ):
one double backward, with the graph of the training step kept alive until ``backward()``.

Two implementations with the same call shape as ``common.evograd.evograd_meta_loss``
(loss callables that take a parameter dict):
    second_order_meta_loss       built on ``higher`` (its differentiable SGD, the optimizer
                                 that ``higher.innerloop_ctx`` hands out), as in the paper;
    second_order_meta_loss_func  the same update with ``torch.func.grad`` (``higher`` is archived).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import higher
import torch
from torch import Tensor

from common.distributed import data_parallel
from common.evograd import check_scalar_loss

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]


def check_inner_args(params: Mapping[str, Tensor], inner_lr: float, inner_steps: int) -> None:
    """``ValueError`` unless params is a non-empty dict, inner_lr > 0 and inner_steps is an int >= 1."""
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ValueError("params must be a non-empty dict of tensors")
    if not (isinstance(inner_lr, (int, float)) and inner_lr > 0):
        raise ValueError(f"inner_lr must be > 0, got {inner_lr!r}")
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps (T) must be an integer >= 1, got {inner_steps!r}")


@data_parallel(returns_meta_loss=True)
def second_order_meta_loss(
    params: Mapping[str, Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 1,
) -> Tensor:
    """L_val(θ_T) after T differentiable SGD steps, through ``higher``'s differentiable optimizer.

    Cost: T forward + T double-backward-capable backward passes of the training loss, one
    validation forward; ``backward()`` on the result then runs through all T steps. Memory: the
    T training graphs (built with ``create_graph=True``) and T + 1 parameter copies stay alive
    until ``backward()``.

    Args:
        params: θ, dict of tensors (detached inside; θ receives no gradient).
        train_loss_fn: parameter dict -> scalar training loss (depends on λ).
        val_loss_fn: parameter dict -> scalar validation loss.
        inner_lr: η > 0 of the virtual SGD step.
        inner_steps: T ≥ 1.

    Returns:
        L_val(θ_T), differentiable w.r.t. λ.
    """
    check_inner_args(params, inner_lr, inner_steps)
    names = list(params)
    fast = [params[n].detach().requires_grad_() for n in names]
    diffopt = higher.optim.get_diff_optim(
        torch.optim.SGD(fast, lr=inner_lr), fast, track_higher_grads=True)
    for step in range(inner_steps):
        loss = check_scalar_loss(train_loss_fn(dict(zip(names, fast))), f"train_loss_fn (step {step})")
        fast = diffopt.step(loss, params=fast)
    return check_scalar_loss(val_loss_fn(dict(zip(names, fast))), "val_loss_fn")


@data_parallel(returns_meta_loss=True)
def second_order_meta_loss_func(
    params: Mapping[str, Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    inner_lr: float,
    inner_steps: int = 1,
) -> Tensor:
    """``second_order_meta_loss`` with ``torch.func.grad`` for the inner gradient.

    Same value, cost and memory as the ``higher`` version; ``torch.func.grad`` composes with the
    ordinary autograd of the outer ``backward()``, which differentiates through the updates.
    """
    check_inner_args(params, inner_lr, inner_steps)
    fast = {n: p.detach() for n, p in params.items()}

    def checked_train_loss(p: Params) -> Tensor:
        return check_scalar_loss(train_loss_fn(p), "train_loss_fn")

    for _ in range(inner_steps):
        grads = torch.func.grad(checked_train_loss)(fast)
        fast = {n: fast[n] - inner_lr * grads[n] for n in fast}
    return check_scalar_loss(val_loss_fn(fast), "val_loss_fn")
