"""Implicit-function hypergradients (conjugate gradient, Neumann series) and SAMA.

With θ at (or near) a minimiser of L_train(·, λ), H = ∇²_θ L_train(θ, λ) and v = ∇_θ L_val(θ, λ),
the implicit function theorem gives

    dL_val/dλ = ∂_λ L_val − (∂²L_train/∂λ∂θ) H⁻¹ v,

where (∂²L_train/∂λ∂θ) u = ∇_λ [∇_θ L_train(θ, λ) · u]. The estimators differ in how they stand in
for H⁻¹ v:

    implicit_hypergrad(solver="cg")       conjugate gradient on Hessian-vector products
    implicit_hypergrad(solver="neumann")  truncated Neumann series α Σ_{j=0..J} (I − αH)^j v
    sama_hypergrad                        H⁻¹ replaced by the identity and v preconditioned by the base
                                          optimiser's update Jacobian, mixed derivative by finite
                                          differences (no double backward)

All take the loss-callable call shape of ``common.evograd`` (a loss callable maps a
dict[str, Tensor] of base-model parameters to a scalar loss; λ enters through the closure, and
L_val may depend on it directly), accumulate the hypergradient into ``h.grad`` for every λ tensor
``h`` and return the validation loss. ``common.hypergrad.meta_backward`` selects them by name
(``cg``, ``neumann``, ``sama``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from common.estimators import _grads_or_zeros
from common.evograd import check_finite_losses, check_hyperparams, scalar_loss
from common.precision import full_precision

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, strictly_positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if strictly_positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if strictly_positive else '>= 0'}, got {value!r}")


def _check_inputs(params: Mapping[str, Tensor], hyperparams: Sequence[Tensor]) -> list[Tensor]:
    if not isinstance(params, Mapping) or len(params) == 0:
        raise ValueError("params must be a non-empty dict of tensors")
    return check_hyperparams(hyperparams)


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------

def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ over tensors of ⟨a_i, b_i⟩, in float64."""
    return sum((x.to(torch.float64) * y.to(torch.float64)).sum() for x, y in zip(a, b))


def _validation_gradients(names: list[str], theta: list[Tensor], hyperparams: list[Tensor],
                          val_loss_fn: LossFn) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(L_val(θ), v = ∇_θ L_val, ∂_λ L_val): one validation forward and backward."""
    leaves = [t.clone().requires_grad_() for t in theta]
    val_loss = scalar_loss(val_loss_fn(dict(zip(names, leaves))), "val_loss_fn")
    grads = _grads_or_zeros(val_loss, [*leaves, *hyperparams])
    return val_loss.detach(), grads[: len(leaves)], grads[len(leaves):]


def _overflow_advice(solver: str, device: torch.device) -> str:
    """What to change when the Hessian-vector products overflow: the precision under float16
    autocast, else the step of the Neumann series or CG's damping."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16:
        return "an overflow in float16 autocast: run the estimator in bfloat16 or float32 (--amp bf16 or none)"
    if solver == "neumann":
        return "the Neumann series diverges when its step α is above 2/λ_max(H): lower neumann_alpha (--neumann_alpha)"
    return "an overflow of the curvature: raise cg_damping (--cg_damping) or lower the learning rate"


def _accumulate(hyperparams: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for h, g in zip(hyperparams, grads):
            h.grad = g.detach().clone() if h.grad is None else h.grad + g.detach()


def conjugate_gradient(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], iters: int,
                       damping: float = 0.0, tol: float = 1e-6, info: dict | None = None) -> tuple[list[Tensor], int]:
    """Solve (H + δI) x = v by conjugate gradient from x_0 = 0, with H given as ``hvp(p) = Hp``.

        r_0 = p_0 = v;   α_k = ⟨r_k, r_k⟩ / ⟨p_k, (H + δI) p_k⟩,   x_{k+1} = x_k + α_k p_k,
        r_{k+1} = r_k − α_k (H + δI) p_k,   p_{k+1} = r_{k+1} + (⟨r_{k+1}, r_{k+1}⟩ / ⟨r_k, r_k⟩) p_k,

    stopping after ``iters`` steps, once ‖r‖ ≤ tol·‖v‖, or where ⟨p, (H + δI)p⟩ ≤ 0 (H + δI not
    positive definite along p: the last iterate is kept). Exact in at most dim(θ) steps for a
    positive-definite H (in exact arithmetic).

    Host reads: α and β stay on the device, and a step past a stop is masked to a no-op, so with
    ``tol = 0`` the solve reads nothing from the device; with ``tol > 0`` it reads one boolean per
    step to stop early (the price of the early stop on a GPU).

    ``info``, if given, receives how the solve ended (two host reads at the end):
    ``non_positive_curvature`` (True where it stopped at ⟨p, (H + δI)p⟩ ≤ 0: H singular along v, or
    indefinite) and ``relative_residual`` ‖r‖/‖v‖ of the returned x.

    Returns:
        (x, number of Hessian-vector products used).
    """
    x = [torch.zeros_like(t) for t in v]
    r = [t.clone() for t in v]
    p = [t.clone() for t in v]
    rr = _dot(r, r)
    stop = tol ** 2 * rr
    active = rr > 0  # 0-d bool tensor: False once converged or past a non-positive curvature
    rr_v = rr
    flat = torch.zeros((), dtype=torch.bool, device=rr.device)  # met a non-positive curvature
    used = 0
    for _ in range(iters):
        active = active & (rr > stop)
        if tol > 0 and not bool(active):
            break
        hp = hvp(p)
        used += 1
        if damping:
            hp = [a + damping * b for a, b in zip(hp, p)]
        curvature = _dot(p, hp)
        flat = flat | (active & (curvature <= 0))
        active = active & (curvature > 0)
        alpha = torch.where(active, rr / torch.where(active, curvature, 1.0), 0.0)
        x = [a + alpha.to(a.dtype) * b for a, b in zip(x, p)]
        r = [a - alpha.to(a.dtype) * b for a, b in zip(r, hp)]
        rr_next = _dot(r, r)
        beta = torch.where(active, rr_next / torch.where(rr > 0, rr, 1.0), 0.0)
        p = [a + beta.to(a.dtype) * b for a, b in zip(r, p)]
        rr = torch.where(active, rr_next, rr)
    if info is not None:
        info["non_positive_curvature"] = bool(flat)
        info["relative_residual"] = float((rr / rr_v).sqrt()) if float(rr_v) > 0 else 0.0
    return x, used


def neumann_series(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], iters: int,
                   alpha: float) -> list[Tensor]:
    """H⁻¹ v ≈ α Σ_{j=0..J} (I − αH)^j v (J = ``iters`` Hessian-vector products).

    The series converges to H⁻¹ v when 0 < α < 2/λ_max(H) and H is positive definite; the error
    after J terms is (I − αH)^{J+1} H⁻¹ v.
    """
    term = [t.clone() for t in v]
    total = [t.clone() for t in v]
    for _ in range(iters):
        hv = hvp(term)
        term = [a - alpha * b for a, b in zip(term, hv)]
        total = [a + b for a, b in zip(total, term)]
    return [alpha * t for t in total]


# ---------------------------------------------------------------------------------------------
# implicit differentiation: conjugate gradient, Neumann series
# ---------------------------------------------------------------------------------------------

def implicit_hypergrad(
    params: Mapping[str, Tensor],
    hyperparams: Sequence[Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    solver: str = "cg",
    cg_iters: int = 10,
    cg_damping: float = 0.0,
    cg_tol: float = 1e-6,
    neumann_iters: int = 5,
    neumann_alpha: float | None = None,
    inner_lr: float | None = None,
) -> Tensor:
    """Implicit-function hypergradient with H⁻¹v from CG or a Neumann series; accumulates into ``.grad``.

        dL_val/dλ ≈ ∂_λ L_val − (∂²L_train/∂λ∂θ) x,   x ≈ H⁻¹ v,   v = ∇_θ L_val(θ, λ),

    all at the given θ (assumed near a minimiser of L_train; elsewhere this is the implicit
    answer the local quadratic model of L_train would give).

    - ``solver="cg"``: x solves (H + δI) x = v by ``conjugate_gradient`` (``cg_iters`` steps at most,
      ``cg_damping`` δ ≥ 0, relative residual tolerance ``cg_tol``); as in Rajeswaran et al. 2019
      (iMAML) and Pedregosa 2016 (HOAG).
    - ``solver="neumann"``: x = α Σ_{j=0..J} (I − αH)^j v (Lorraine, Vicol, Duvenaud 2020,
      "Optimizing Millions of Hyperparameters by Implicit Differentiation"), J = ``neumann_iters``,
      α = ``neumann_alpha`` (default ``inner_lr``, the base model's learning rate); converges for
      0 < α < 2/λ_max(H).

    Cost: 1 forward + 1 backward of the training loss with ``create_graph=True``, then J
    Hessian-vector products (each a backward through the gradient's graph, about 2 backward
    passes), 1 backward of ⟨∇_θ L_train, x⟩ into λ, and 1 forward + 1 backward of the validation
    loss. Memory: the training loss's graph and its gradient's graph stay alive for all J
    products, plus 4 (CG: x, r, p, Hp) or 3 (Neumann) θ-sized vectors.

    Args:
        params: θ, dict of tensors (detached inside; θ receives no gradient).
        hyperparams: the λ tensors that receive the hypergradient (``requires_grad=True``).
        train_loss_fn, val_loss_fn: parameter dict -> scalar loss (either may depend on λ).
        solver: "cg" or "neumann".
        cg_iters: J ≥ 1, the most CG steps.  cg_damping: δ ≥ 0.  cg_tol: ≥ 0 (0: run all J steps).
        neumann_iters: J ≥ 1.  neumann_alpha: α > 0 (None: ``inner_lr``).
        inner_lr: the base model's learning rate (the default α).

    Returns:
        L_val(θ) (a detached scalar tensor).

    Raises:
        ValueError: on an unknown solver, iterations < 1, δ < 0, tolerance < 0, α ≤ 0 (or no α and
            no ``inner_lr``), empty inputs, a non-scalar or non-finite loss, or a non-finite
            Hessian-vector product.
    """
    hyperparams = _check_inputs(params, hyperparams)
    if solver == "cg":
        _check_int("cg_iters", cg_iters)
        _check_number("cg_damping", cg_damping, strictly_positive=False)
        _check_number("cg_tol", cg_tol, strictly_positive=False)
    elif solver == "neumann":
        _check_int("neumann_iters", neumann_iters)
        if neumann_alpha is None:
            if inner_lr is None:
                raise ValueError("neumann needs neumann_alpha (or inner_lr, its default)")
            neumann_alpha = inner_lr
        _check_number("neumann_alpha", neumann_alpha, strictly_positive=True)
    else:
        raise ValueError(f"solver must be 'cg' or 'neumann', got {solver!r}")
    names = list(params)
    theta = [params[n].detach() for n in names]
    val_loss, v, direct = _validation_gradients(names, theta, hyperparams, val_loss_fn)

    leaves = [t.clone().requires_grad_() for t in theta]
    train_loss = scalar_loss(train_loss_fn(dict(zip(names, leaves))), "train_loss_fn")
    train_grads = _grads_or_zeros(train_loss, leaves, create_graph=True)
    live = [i for i, g in enumerate(train_grads) if g.requires_grad]  # the rest: L_train linear there
    products_sum = torch.zeros((), device=val_loss.device)  # Σ of every Hp entry (float32): finite iff all are

    def hvp(vec: list[Tensor]) -> list[Tensor]:
        nonlocal products_sum
        if not live:
            return [torch.zeros_like(t) for t in vec]
        products = _grads_or_zeros([train_grads[i] for i in live], leaves, grad_outputs=[vec[i] for i in live],
                                   retain_graph=True)
        products_sum = products_sum + sum(h.detach().float().sum() for h in products)
        return [h.detach() for h in products]

    if solver == "cg":
        x, _ = conjugate_gradient(hvp, v, cg_iters, cg_damping, cg_tol)
    else:
        x = neumann_series(hvp, v, neumann_iters, neumann_alpha)
    # One host read checks the losses and the products together. Without the products' check CG would
    # stop silently at a NaN curvature (x stays 0: a zero hypergradient), as under fp16 autocast,
    # where the double backward overflows.
    products_name = "train_loss_fn's Hessian-vector products"
    try:
        check_finite_losses(torch.stack([val_loss.float(), train_loss.detach().float(), products_sum]),
                            ["val_loss_fn", "train_loss_fn", products_name])
    except ValueError as err:
        if not str(err).startswith(products_name):
            raise
        raise ValueError(f"{solver}: {products_name} are non-finite ({_overflow_advice(solver, val_loss.device)})"
                         ) from None
    pairing = sum((train_grads[i] * x[i]).sum() for i in live) if live else None
    mixed = (_grads_or_zeros(pairing, hyperparams) if pairing is not None and pairing.requires_grad
             else [torch.zeros_like(h) for h in hyperparams])  # (∂²L_train/∂λ∂θ) x
    _accumulate(hyperparams, [d - m for d, m in zip(direct, mixed)])
    return val_loss


# ---------------------------------------------------------------------------------------------
# SAMA
# ---------------------------------------------------------------------------------------------

def _group_and_state(optimizer: torch.optim.Optimizer, param: Tensor, name: str) -> tuple[dict, dict]:
    for group in optimizer.param_groups:
        if any(q is param for q in group["params"]):
            return group, optimizer.state.get(param, {})
    raise ValueError(f"base_optimizer does not optimise parameter {name!r}: pass the optimiser of these params")


def optimizer_preconditioner(base_optimizer: torch.optim.Optimizer | None, params: Mapping[str, Tensor],
                             inner_lr: float | None = None,
                             train_grads: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Diagonal of ∂u/∂g, the Jacobian of the base optimiser's next update u with respect to the gradient g.

    - None: plain SGD, u = η g, ∂u/∂g = η (``inner_lr``).
    - ``torch.optim.SGD`` (momentum μ, dampening d): ∂u/∂g = lr·c with c = 1 before its first step
      (1 + μ with Nesterov) and c = 1 − d after it (1 + μ(1 − d) with Nesterov).
    - ``torch.optim.Adam`` / ``AdamW`` (not AMSGrad): with its moments m, s and step count t, and
      g the current training gradient (plus the L2 term of Adam's coupled weight decay),

          m' = β1 m + (1 − β1) g,   s' = β2 s + (1 − β2) g²,   b1 = 1 − β1^{t+1},   b2 = 1 − β2^{t+1},
          u = lr (m'/b1) / (√(s'/b2) + ε),
          ∂u/∂g = (lr/b1) [ (1 − β1)/D − m' (1 − β2) g / (b2 √(s'/b2) D²) ],   D = √(s'/b2) + ε,

      elementwise: the next Adam step linearised at the current gradient. (Betty's ``sama``
      differentiates the step just taken instead, using a gradient it stores itself;
      ``torch.optim.Adam`` keeps no copy of it, and the two differ only by the change of the
      gradient between consecutive steps.)

    Args:
        base_optimizer: None, or the optimiser whose ``param_groups`` hold the tensors of ``params``.
        params: θ (the optimiser's own parameter tensors when ``base_optimizer`` is given).
        inner_lr: η of plain SGD (needed when ``base_optimizer`` is None).
        train_grads: ∇_θ L_train(θ, λ) in ``params`` order (needed for Adam).

    Raises:
        ValueError: for an optimiser whose preconditioning is not implemented (or AMSGrad,
            ``maximize``), a parameter the optimiser does not hold, or a missing ``inner_lr``.
    """
    names = list(params)
    if base_optimizer is None:
        if inner_lr is None:
            raise ValueError("sama without base_optimizer is plain SGD and needs inner_lr (its learning rate)")
        _check_number("inner_lr", inner_lr, strictly_positive=True)
        return [torch.full_like(params[n], float(inner_lr)) for n in names]
    kind = type(base_optimizer)
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise ValueError(f"sama preconditioning is implemented for torch.optim.SGD, Adam and AdamW, "
                         f"not {kind.__name__}")
    out = []
    for i, name in enumerate(names):
        param = params[name]
        group, state = _group_and_state(base_optimizer, param, name)
        if group.get("maximize", False):
            raise ValueError("sama preconditioning does not support maximize=True optimisers")
        lr = float(group["lr"])
        if kind is torch.optim.SGD:
            mu, damp, nesterov = group["momentum"], group["dampening"], group["nesterov"]
            started = mu != 0 and state.get("momentum_buffer") is not None
            c = (1 - damp) if started else 1.0
            out.append(torch.full_like(param, lr * ((1 + mu * c) if nesterov and mu != 0 else c)))
            continue
        if group.get("amsgrad", False):
            raise ValueError("sama preconditioning for Adam with amsgrad=True is not implemented")
        if train_grads is None:
            raise ValueError("Adam preconditioning needs the current training gradient (train_grads)")
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        g = train_grads[i].detach()
        coupled = kind is torch.optim.Adam and not group.get("decoupled_weight_decay", False)
        if coupled and group["weight_decay"]:
            g = g + group["weight_decay"] * param.detach()
        step = float(state["step"]) if "step" in state else 0.0
        m = state.get("exp_avg", torch.zeros_like(g))
        s = state.get("exp_avg_sq", torch.zeros_like(g))
        m_next = beta1 * m + (1 - beta1) * g
        s_next = beta2 * s + (1 - beta2) * g * g
        b1, b2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
        root = (s_next / b2).sqrt()
        denom = root + eps
        second = torch.where(root > 0, m_next * (1 - beta2) * g / (b2 * root.clamp_min(1e-300) * denom**2),
                             torch.zeros_like(g))
        out.append((lr / b1) * ((1 - beta1) / denom - second))
    return out


def sama_hypergrad(
    params: Mapping[str, Tensor],
    hyperparams: Sequence[Tensor],
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    inner_lr: float | None = None,
    base_optimizer: torch.optim.Optimizer | None = None,
    fd_epsilon: float = 0.01,
    differences_in_float32: bool = True,
) -> Tensor:
    """SAMA hypergradient (Choe et al., NeurIPS 2023, "Making Scalable Meta Learning Practical").

    The base Jacobian H⁻¹ of the implicit hypergradient is replaced by the identity and v by its
    image under the Jacobian P = ∂u/∂g of the base optimiser's update (``optimizer_preconditioner``:
    η·I for SGD, a diagonal from the moment estimates for Adam):

        dL_val/dλ ≈ ∂_λ L_val − (∂²L_train/∂λ∂θ) P v,   v = ∇_θ L_val(θ, λ),

    with the mixed product by central differences along Pv (as ``finite_difference``):

        (∂²L_train/∂λ∂θ) Pv ≈ [∇_λ L_train(θ + εPv) − ∇_λ L_train(θ − εPv)] / (2ε),   ε = fd_epsilon / ‖Pv‖.

    With plain SGD this is the one-step hypergradient of ``finite_difference`` with v taken at θ
    instead of at the virtual step θ' = θ − η∇L_train (the two coincide where ∇_θ L_train = 0).

    Cost: 2 forward + 2 ordinary backward passes of the training loss (into λ, at θ ± εPv), one more
    of each for the gradient that Adam's preconditioner needs, and 1 forward + 1 backward of the
    validation loss; no double backward. Memory: one loss graph at a time and 3 θ-sized tensors
    (v, Pv, θ ± εPv).

    Args:
        params: θ, dict of tensors (the optimiser's own parameters when ``base_optimizer`` is given).
        hyperparams: the λ tensors that receive the hypergradient (``requires_grad=True``).
        train_loss_fn, val_loss_fn: parameter dict -> scalar loss (either may depend on λ).
        inner_lr: η of plain SGD, used when ``base_optimizer`` is None.
        base_optimizer: None (plain SGD with ``inner_lr``), or a ``torch.optim.SGD``/``Adam``/``AdamW``.
        fd_epsilon: norm of the finite-difference perturbation, > 0.
        differences_in_float32: under ``torch.autocast``, run the two passes at θ ± εPv (forward
            and backward) with autocast off, in float32 (``common.precision.full_precision``), as
            EvoGrad's candidates: their difference is a small change of two gradients, and in
            bfloat16 it is mostly rounding (``python -m common.precision_study`` measures it;
            ``common/HYPERGRAD_STUDY.md``, "Reduced precision"). No effect outside autocast.

    Returns:
        L_val(θ) (a detached scalar tensor).

    Raises:
        ValueError: on bad arguments (see ``optimizer_preconditioner``), empty inputs, or a
            non-scalar or non-finite loss.
    """
    hyperparams = _check_inputs(params, hyperparams)
    _check_number("fd_epsilon", fd_epsilon, strictly_positive=True)
    names = list(params)
    theta = [params[n].detach() for n in names]
    train_grads = None
    losses, whats = [], []  # every loss of the step, checked for finiteness once at the end
    if base_optimizer is not None and not isinstance(base_optimizer, torch.optim.SGD):
        leaves = [t.clone().requires_grad_() for t in theta]
        loss = scalar_loss(train_loss_fn(dict(zip(names, leaves))), "train_loss_fn")
        losses.append(loss.detach())
        whats.append("train_loss_fn")
        train_grads = _grads_or_zeros(loss, leaves)
        del loss, leaves
    precondition = optimizer_preconditioner(base_optimizer, params, inner_lr, train_grads)
    val_loss, v, direct = _validation_gradients(names, theta, hyperparams, val_loss_fn)
    losses.append(val_loss)
    whats.append("val_loss_fn")
    pv = [p * g for p, g in zip(precondition, v)]
    # ε = fd_epsilon / ‖Pv‖ stays a tensor (no host read); with Pv = 0 both sides equal θ and the
    # difference term is exactly zero
    eps = fd_epsilon / torch.sqrt(_dot(pv, pv)).clamp_min(torch.finfo(torch.float64).tiny)
    side = []
    for sign in (1.0, -1.0):
        shifted = {n: t + (sign * eps * d).to(t.dtype) for n, t, d in zip(names, theta, pv)}
        with full_precision(differences_in_float32):
            loss = scalar_loss(train_loss_fn(shifted), "train_loss_fn (finite difference)")
            side.append(_grads_or_zeros(loss, hyperparams))
        losses.append(loss.detach())
        whats.append(f"train_loss_fn (finite difference, {'+' if sign > 0 else '−'})")
        del shifted, loss
    total = [d - ((gp - gm) / (2 * eps)).to(d.dtype) for d, gp, gm in zip(direct, *side)]
    check_finite_losses(torch.stack(losses), whats)
    _accumulate(hyperparams, total)
    return val_loss
