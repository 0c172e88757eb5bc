"""One call shape for every hypergradient estimator, selectable by name.

    meta_backward(method, params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float

computes the chosen estimate of dL_val/dλ, accumulates it into ``h.grad`` for every ``h`` in
``hyperparams`` (like ``backward()``), and returns the validation loss it was computed at.
Experiments call this with ``args.method`` so that every estimator runs on the same work.

Methods and their options:
    evograd              n_candidates, sigma, temperature, noise, generator   (plain path)
    evograd_low_memory   same options; one candidate graph alive at a time
    second_order         inner_lr, inner_steps     (``higher``)
    second_order_func    inner_lr, inner_steps     (``torch.func``)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from common.evograd import evograd_hypergrad_low_memory, evograd_meta_loss
from common.second_order import second_order_meta_loss, second_order_meta_loss_func

EVOGRAD_OPTIONS = ("n_candidates", "sigma", "temperature", "noise", "generator")
SECOND_ORDER_OPTIONS = ("inner_lr", "inner_steps")


def _evograd(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    out = evograd_meta_loss(params, train_loss_fn, val_loss_fn, return_diagnostics=True, **options)
    out.val_loss.backward(inputs=list(hyperparams))
    return out.val_loss.item()


def _evograd_low_memory(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    return evograd_hypergrad_low_memory(params, hyperparams, train_loss_fn, val_loss_fn, **options).val_loss.item()


def _second_order(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    loss = second_order_meta_loss(params, train_loss_fn, val_loss_fn, **options)
    loss.backward(inputs=list(hyperparams))
    return loss.item()


def _second_order_func(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    loss = second_order_meta_loss_func(params, train_loss_fn, val_loss_fn, **options)
    loss.backward(inputs=list(hyperparams))
    return loss.item()


ESTIMATORS: dict[str, tuple[Callable[..., float], tuple[str, ...]]] = {
    "evograd": (_evograd, EVOGRAD_OPTIONS),
    "evograd_low_memory": (_evograd_low_memory, EVOGRAD_OPTIONS),
    "second_order": (_second_order, SECOND_ORDER_OPTIONS),
    "second_order_func": (_second_order_func, SECOND_ORDER_OPTIONS),
}


def meta_backward(
    method: str,
    params: Mapping[str, Tensor],
    hyperparams: Sequence[Tensor],
    train_loss_fn: Callable[[dict[str, Tensor]], Tensor],
    val_loss_fn: Callable[[dict[str, Tensor]], Tensor],
    **options,
) -> float:
    """Accumulate the ``method`` hypergradient into ``hyperparams``' ``.grad``.

    Args:
        method: a key of ``ESTIMATORS``.
        params: θ, dict of tensors (receives no gradient).
        hyperparams: λ tensors that receive the hypergradient.
        train_loss_fn, val_loss_fn: parameter dict -> scalar loss.
        **options: the method's options (see the module docstring); options that belong to
            other methods are ignored, so a caller can pass one dict of everything.

    Returns:
        The validation loss (a float) at which the hypergradient was taken.

    Raises:
        ValueError: for an unknown method, or bad options or losses (from the estimator).
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown hypergradient method {method!r}; choose from {sorted(ESTIMATORS)}")
    fn, accepted = ESTIMATORS[method]
    hyperparams = list(hyperparams)
    if not hyperparams:
        raise ValueError("hyperparams is empty")
    return fn(params, hyperparams, train_loss_fn, val_loss_fn, **{k: v for k, v in options.items() if k in accepted})
