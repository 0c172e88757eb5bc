"""One call shape for every hypergradient estimator, selectable by name.

    meta_backward(method, params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float

computes the chosen estimate of dL_val/dλ, accumulates it into ``h.grad`` for every ``h`` in
``hyperparams`` (like ``backward()``), and returns the validation loss it was computed at.
Experiments call this with ``args.method`` so that every estimator runs on the same work.

Methods, their options, and their cost per hypergradient (F/B: forward/backward passes of the
training loss; "graph": what stays alive until the hypergradient is formed; T inner steps, K
candidates, W window):

    method              options                                     cost                        memory
    evograd             n_candidates, sigma, temperature, noise,    K F + K·(B w.r.t. λ only)    K loss graphs + θ*
                        generator, noise_device, batch_candidates
    evograd_batched     as evograd (batch_candidates=True)          one vmapped F over K         K loss graphs + θ* + K θ copies
    evograd_low_memory  as evograd, no batch_candidates             same, one graph at a time    1 loss graph
    second_order        inner_lr, inner_steps (``higher``)          T F + T double-backward B    T graphs + T+1 θ copies
    second_order_func   inner_lr, inner_steps (``torch.func``)      as second_order              as second_order
    finite_difference   inner_lr, fd_epsilon                        3 F + 3 plain B (T = 1)      1 graph + 3 θ-sized tensors
    unrolled            inner_lr, inner_steps                       as second_order              as second_order
    multistep           inner_lr, inner_steps, window               ⌈T/W⌉ F + ⌈T/W⌉ double B     ⌈T/W⌉ graphs
    cg                  cg_iters, cg_damping, cg_tol                1 F + 1 double B + J HVPs    train graph + its gradient's
                                                                    + 1 B into λ                 graph, 4 θ-sized vectors
    neumann             neumann_iters, neumann_alpha (or inner_lr)  as cg                        as cg, 3 θ-sized vectors
    sama                inner_lr, base_optimizer, fd_epsilon        2 F + 2 plain B (+1 F/B Adam) 1 graph + 3 θ-sized tensors

(plus one validation forward/backward for every method; HVP: Hessian-vector product, J its
count). The estimators' docstrings in ``common.evograd``, ``common.second_order``,
``common.estimators`` and ``common.implicit`` give the details.
``add_estimator_args`` / ``estimator_options`` give CLIs the flags of all of them at once.
Under ``torch.distributed`` every method gives the whole batch's hypergradient on every rank,
with the same call (``common.distributed``, which lists what each method communicates).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from common.distributed import data_parallel
from common.estimators import finite_difference_hypergrad, multistep_meta_loss
from common.evograd import evograd_hypergrad_low_memory, evograd_meta_loss
from common.implicit import implicit_hypergrad, sama_hypergrad
from common.precision import full_precision
from common.runtime import non_negative, positive
from common.second_order import second_order_meta_loss, second_order_meta_loss_func

EVOGRAD_OPTIONS = ("n_candidates", "sigma", "temperature", "noise", "generator", "noise_device", "candidates_in_float32")
SECOND_ORDER_OPTIONS = ("inner_lr", "inner_steps")
FINITE_DIFFERENCE_OPTIONS = ("inner_lr", "fd_epsilon")
MULTISTEP_OPTIONS = ("inner_lr", "inner_steps", "window")
CG_OPTIONS = ("cg_iters", "cg_damping", "cg_tol")
NEUMANN_OPTIONS = ("neumann_iters", "neumann_alpha", "inner_lr")
SAMA_OPTIONS = ("inner_lr", "base_optimizer", "fd_epsilon", "differences_in_float32")


def _evograd(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    out = evograd_meta_loss(params, train_loss_fn, val_loss_fn, return_diagnostics=True, **options)
    with full_precision():  # backward outside autocast (common.precision)
        out.val_loss.backward(inputs=list(hyperparams))
    return out.val_loss.item()


def _evograd_batched(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    """``evograd`` with the K candidate passes as one ``torch.func.vmap`` (``batch_candidates=True``)."""
    return _evograd(params, hyperparams, train_loss_fn, val_loss_fn, **options, batch_candidates=True)


def _evograd_low_memory(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    return evograd_hypergrad_low_memory(params, hyperparams, train_loss_fn, val_loss_fn, **options).val_loss.item()


def _backward_through(meta_loss_fn: Callable[..., Tensor]) -> Callable[..., float]:
    """Estimator that builds ``meta_loss_fn``'s differentiable L_val and backpropagates it into λ."""
    def estimate(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
        loss = meta_loss_fn(params, train_loss_fn, val_loss_fn, **options)
        with full_precision():  # backward outside autocast (common.precision)
            loss.backward(inputs=list(hyperparams))
        return loss.item()
    estimate.__doc__ = f"``{meta_loss_fn.__name__}(...).backward()`` into the hyperparameters."
    return estimate


def _finite_difference(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    return finite_difference_hypergrad(params, hyperparams, train_loss_fn, val_loss_fn, **options).item()


def _cg(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    return implicit_hypergrad(params, hyperparams, train_loss_fn, val_loss_fn, solver="cg", **options).item()


def _neumann(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    return implicit_hypergrad(params, hyperparams, train_loss_fn, val_loss_fn, solver="neumann", **options).item()


def _sama(params, hyperparams, train_loss_fn, val_loss_fn, **options) -> float:
    return sama_hypergrad(params, hyperparams, train_loss_fn, val_loss_fn, **options).item()


ESTIMATORS: dict[str, tuple[Callable[..., float], tuple[str, ...]]] = {
    "evograd": (_evograd, EVOGRAD_OPTIONS + ("batch_candidates",)),
    "evograd_batched": (_evograd_batched, EVOGRAD_OPTIONS),
    "evograd_low_memory": (_evograd_low_memory, EVOGRAD_OPTIONS),
    "second_order": (_backward_through(second_order_meta_loss), SECOND_ORDER_OPTIONS),
    "second_order_func": (_backward_through(second_order_meta_loss_func), SECOND_ORDER_OPTIONS),
    "finite_difference": (_finite_difference, FINITE_DIFFERENCE_OPTIONS),
    "unrolled": (_backward_through(second_order_meta_loss), SECOND_ORDER_OPTIONS),  # T = inner_steps
    "multistep": (_backward_through(multistep_meta_loss), MULTISTEP_OPTIONS),
    "cg": (_cg, CG_OPTIONS),
    "neumann": (_neumann, NEUMANN_OPTIONS),
    "sama": (_sama, SAMA_OPTIONS),
}


def add_estimator_args(parser: argparse.ArgumentParser, inner_lr: float | None, inner_steps: int = 1,
                       window: int | None = None, fd_epsilon: float = 0.01) -> argparse.ArgumentParser:
    """Add the non-EvoGrad estimators' flags where the parser lacks them.

    ``--inner_lr``, ``--inner_steps``, ``--window``, ``--fd_epsilon`` (second-order, unrolled,
    multistep, finite-difference, SAMA; the arguments give their defaults, every value > 0),
    ``--cg_iters`` (10), ``--cg_damping`` (0, ≥ 0), ``--cg_tol`` (1e-6, ≥ 0), ``--neumann_iters`` (5)
    and ``--neumann_alpha`` (default: ``inner_lr``). Flags whose
    destination the parser already has (say an experiment's own ``--inner_lr``) are left as they
    are; ``inner_lr=None`` adds no ``--inner_lr`` (for a caller that sets η itself, e.g. from its
    learning-rate schedule).
    """
    flags = {
        "inner_lr": (positive(float), inner_lr, "η of the virtual/unrolled SGD steps (second_order, unrolled, "
                                      "multistep, finite_difference)"),
        "inner_steps": (positive(int), inner_steps, "T, inner steps unrolled by second_order/unrolled/multistep"),
        "window": (positive(int), window, "W, inner steps per gradient in multistep (1 <= W <= T; default W = T)"),
        "fd_epsilon": (positive(float), fd_epsilon, "norm of the central-difference perturbation of "
                                                    "finite_difference and sama"),
        "cg_iters": (positive(int), 10, "J, most conjugate-gradient steps (Hessian-vector products) of cg"),
        "cg_damping": (non_negative(float), 0.0, "δ >= 0 added to the Hessian in cg: solves (H + δI) x = v"),
        "cg_tol": (non_negative(float), 1e-6, "cg stops once the residual norm is <= this times ‖v‖ (0: never)"),
        "neumann_iters": (positive(int), 5, "J, Hessian-vector products of the Neumann series (neumann)"),
        "neumann_alpha": (positive(float), None, "α of the Neumann series, below 2/λ_max(H) (default: inner_lr)"),
    }
    existing = {action.dest for action in parser._actions}
    for dest, (kind, default, text) in flags.items():
        if dest not in existing and not (dest == "inner_lr" and inner_lr is None):
            parser.add_argument(f"--{dest}", type=kind, default=default, help=text)
    return parser


def estimator_options(args: argparse.Namespace) -> dict:
    """The non-EvoGrad estimator options found on ``args`` (see ``add_estimator_args``)."""
    names = set(SECOND_ORDER_OPTIONS + FINITE_DIFFERENCE_OPTIONS + MULTISTEP_OPTIONS + CG_OPTIONS + NEUMANN_OPTIONS)
    return {n: getattr(args, n) for n in sorted(names) if getattr(args, n, None) is not None}


@data_parallel(returns_meta_loss=False)
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
