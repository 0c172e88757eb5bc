"""Implicit-function estimators (cg, neumann) and SAMA against closed forms (float64, fixed seeds).

References: the ridge implicit hypergradient solved in closed form, a 1-D quadratic by hand, the
one-step finite difference, and for SAMA with Adam a reference built from autograd's mixed
derivative and the preconditioner read off a real ``torch.optim.Adam`` by differencing its step.
"""
import copy
import math

import pytest
import torch

from common.hypergrad import ESTIMATORS, meta_backward
from common.hypergrad_study import ProblemInstance, make_ridge_data, one_d_f_prime, one_d_f_second, one_d_instance
from common.implicit import conjugate_gradient, implicit_hypergrad, optimizer_preconditioner, sama_hypergrad
from test_estimators import estimate, one_thread  # noqa: F401  (autouse fixture: one torch thread)

F64 = torch.float64
N_FEATURES = 12


@pytest.fixture(scope="module")
def ridge():
    """Ridge with one strength per feature, θ at the exact minimiser w*(λ)."""
    data = make_ridge_data(40, 60, N_FEATURES, seed=3)
    lam = math.log(0.1) + torch.randn(N_FEATURES, generator=torch.Generator().manual_seed(4), dtype=F64)
    lam = lam.requires_grad_()
    inst = ProblemInstance({"w": data.solution(lam.detach())}, [lam],
                           lambda p: data.train_loss(p["w"], lam), lambda p: data.val_loss(p["w"]),
                           [data.ift_hypergrad(lam.detach())])
    return data, inst


def test_cg_with_as_many_iterations_as_parameters_is_the_implicit_answer(ridge):
    _, inst = ridge
    got = estimate("cg", inst, cg_iters=N_FEATURES, cg_tol=0.0)
    torch.testing.assert_close(got, inst.reference[0], rtol=0, atol=1e-8)
    assert inst.reference[0].abs().max() > 1e-3  # not a trivially small answer
    few = estimate("cg", inst, cg_iters=2, cg_tol=0.0)
    assert (few - inst.reference[0]).norm() > 1e-6  # two steps are not enough: the iterations matter


def test_cg_damping_solves_the_damped_system(ridge):
    data, inst = ridge
    lam = inst.hyperparams[0].detach()
    w = inst.params["w"]
    grad_val = data.x_val.T @ (data.x_val @ w - data.y_val) / len(data.y_val)
    x = torch.linalg.solve(data.hessian(lam) + 0.3 * torch.eye(N_FEATURES, dtype=F64), grad_val)
    got = estimate("cg", inst, cg_iters=N_FEATURES, cg_tol=0.0, cg_damping=0.3)
    torch.testing.assert_close(got, -lam.exp() * w * x, rtol=0, atol=1e-8)


def test_cg_tolerance_stops_early(ridge):
    _, inst = ridge
    loose = estimate("cg", inst, cg_iters=N_FEATURES, cg_tol=0.5)
    exact = estimate("cg", inst, cg_iters=N_FEATURES, cg_tol=0.0)
    assert 1e-8 < (loose - exact).norm() < exact.norm()


def _spd_system(n: int, seed: int, condition: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric positive-definite H with eigenvalues 1 .. ``condition`` (log-spaced) and a v."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q @ torch.diag(torch.logspace(0, math.log10(condition), n, dtype=F64)) @ q.T, \
        torch.randn(n, generator=g, dtype=F64)


def _cg(h: torch.Tensor, v: torch.Tensor, iters: int, damping: float, tol: float, info: dict | None = None):
    (x,), used = conjugate_gradient(lambda p: [h @ p[0]], [v], iters, damping, tol, info)
    residual = ((h + damping * torch.eye(len(v), dtype=F64)) @ x - v).norm() / v.norm()
    return x, used, residual.item()


@pytest.mark.parametrize("tol", [0.5, 0.1, 0.01, 1e-4])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_cg_early_stop_meets_its_tolerance_on_the_norm(tol, damping):
    """Stopped early, ‖(H + δI)x − v‖ ≤ tol·‖v‖, at the first iterate that meets it (not the squared norm)."""
    h, v = _spd_system(30, 5, 1e2)
    info = {}
    x, used, residual = _cg(h, v, 30, damping, tol, info)
    assert 0 < used < 30 and residual <= tol * (1 + 1e-9), (used, residual)
    assert info["relative_residual"] == pytest.approx(residual, rel=1e-6) and not info["non_positive_curvature"]
    _, _, before = _cg(h, v, used - 1, damping, 0.0)   # one step fewer does not meet it
    assert before > tol, (used, before)


@pytest.mark.parametrize("h, v", [
    (torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([0.0, 1.0], dtype=F64)),    # v in H's null space
    (torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64)), torch.tensor([0.0, 0.0, 3.0], dtype=F64)),
    (torch.diag(torch.tensor([1.0, -1.0], dtype=F64)), torch.tensor([1.0, 1.0], dtype=F64)),   # indefinite: ⟨v, Hv⟩ = 0
    (torch.diag(torch.tensor([1.0, -3.0], dtype=F64)), torch.tensor([1.0, 1.0], dtype=F64)),   # ⟨v, Hv⟩ < 0
], ids=["singular", "singular-3d", "indefinite-zero", "indefinite-negative"])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_cg_stops_with_a_finite_answer_at_non_positive_curvature(h, v, tol):
    info = {}
    x, used, _ = _cg(h, v, 5, 0.0, tol, info)
    assert torch.isfinite(x).all() and torch.equal(x, torch.zeros_like(x)) and used == (1 if tol else 5)
    assert info["non_positive_curvature"] and info["relative_residual"] == 1.0   # and it says so
    info = {}
    _cg(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), 5, 0.0, tol, info)
    assert not info["non_positive_curvature"] and info["relative_residual"] < 1e-12


def test_neumann_error_decreases_with_terms_and_converges(ridge):
    data, inst = ridge
    lam_max = torch.linalg.eigvalsh(data.hessian(inst.hyperparams[0].detach())).max().item()
    alpha = 1.0 / lam_max  # below 2/λ_max
    errors = [(estimate("neumann", inst, neumann_iters=j, neumann_alpha=alpha) - inst.reference[0]).norm().item()
              for j in (1, 5, 20, 50, 200)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4
    # α defaults to inner_lr
    torch.testing.assert_close(estimate("neumann", inst, neumann_iters=7, inner_lr=alpha),
                               estimate("neumann", inst, neumann_iters=7, neumann_alpha=alpha), rtol=0, atol=0)


def test_neumann_matches_its_partial_sum_exactly(ridge):
    data, inst = ridge
    lam = inst.hyperparams[0].detach()
    w, hess = inst.params["w"], data.hessian(lam)
    v = data.x_val.T @ (data.x_val @ w - data.y_val) / len(data.y_val)
    alpha, total, term = 0.3, torch.zeros_like(v), v.clone()
    for _ in range(6):  # J = 5: six terms
        total, term = total + term, term - alpha * hess @ term
    torch.testing.assert_close(estimate("neumann", inst, neumann_iters=5, neumann_alpha=alpha),
                               -lam.exp() * w * alpha * total, rtol=1e-12, atol=1e-15)


def quadratic_1d(theta: float, lam: float, curvature: float, target: float = 0.5):
    """L_train = a(θ − λ)²/2 (H = a, ∂²L_train/∂λ∂θ = −a), L_val = (θ − c)²/2."""
    lam_t = torch.tensor([lam], dtype=F64, requires_grad=True)
    return ProblemInstance({"theta": torch.tensor([theta], dtype=F64)}, [lam_t],
                           lambda p: (curvature * (p["theta"] - lam_t) ** 2 / 2).sum(),
                           lambda p: ((p["theta"] - target) ** 2 / 2).sum(), [])


@pytest.mark.parametrize("theta", [1.3, -0.7])
def test_both_exact_on_a_one_dimensional_quadratic(theta):
    """dL/dλ = −(−a)(1/a)(θ − c) = θ − c for any a; Neumann with α = 1/a is exact from J = 1."""
    inst = quadratic_1d(theta, 0.2, curvature=2.5)
    assert estimate("cg", inst, cg_iters=1).item() == pytest.approx(theta - 0.5, rel=1e-14)
    assert estimate("neumann", inst, neumann_iters=1, neumann_alpha=0.4).item() == pytest.approx(theta - 0.5, rel=1e-14)
    # α = 0.3: partial sum α Σ_{j=0..J} (1 − αa)^j = (1 − (1 − αa)^{J+1})/a, by hand
    want = (1 - (1 - 0.75) ** 4) * (theta - 0.5)
    assert estimate("neumann", inst, neumann_iters=3, neumann_alpha=0.3).item() == pytest.approx(want, rel=1e-14)


# ----------------------------------------------------------------------------- SAMA

def test_sama_with_sgd_equals_finite_difference_at_a_stationary_point():
    """At θ = θ*(λ) the virtual step is a no-op, so SAMA(SGD, η) and finite_difference(η) take the same difference."""
    inst = one_d_instance(0.8, 0.8)  # L_train = f(θ − λ), ∇_θ L_train(λ, λ) = 0
    for eps in (0.3, 0.05):
        sama = estimate("sama", inst, inner_lr=0.4, fd_epsilon=eps)
        fd = estimate("finite_difference", inst, inner_lr=0.4, fd_epsilon=eps)
        torch.testing.assert_close(sama, fd, rtol=1e-13, atol=0)


def test_sama_with_sgd_is_the_preconditioned_formula_to_second_order_in_epsilon():
    """Away from θ*: SAMA = −η (∂²L_train/∂λ∂θ) ∇L_val(θ) = η f''(θ − λ) f'(θ − c), error O(ε²)."""
    theta, lam, eta = 1.7, -0.4, 0.3
    inst = one_d_instance(theta, lam)
    x = torch.tensor(theta - lam, dtype=F64)
    exact = (eta * one_d_f_second(x) * one_d_f_prime(torch.tensor(theta - 0.5, dtype=F64))).item()
    errors = [abs(estimate("sama", inst, inner_lr=eta, fd_epsilon=e).item() - exact) for e in (0.2, 0.1, 0.05)]
    for big, small in zip(errors, errors[1:]):
        assert big / small == pytest.approx(4.0, rel=0.05)
    assert estimate("sama", inst, inner_lr=eta, fd_epsilon=1e-3).item() == pytest.approx(exact, rel=1e-5)


def softmax_regression(seed: int = 0):
    """3-class softmax regression on 5 features, per-feature L2 strengths e^λ; θ as real Parameters."""
    gen = torch.Generator().manual_seed(seed)
    x, x_val = torch.randn(40, 5, generator=gen, dtype=F64), torch.randn(30, 5, generator=gen, dtype=F64)
    y, y_val = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (30,), generator=gen)
    weight = torch.nn.Parameter(0.3 * torch.randn(5, 3, generator=gen, dtype=F64))
    bias = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    lam = (math.log(0.05) + 0.3 * torch.randn(5, generator=gen, dtype=F64)).requires_grad_()

    def train_loss(p):
        return (torch.nn.functional.cross_entropy(x @ p["weight"] + p["bias"], y)
                + (lam.exp()[:, None] * p["weight"] ** 2).sum() / 2)

    def val_loss(p):
        return torch.nn.functional.cross_entropy(x_val @ p["weight"] + p["bias"], y_val)
    return {"weight": weight, "bias": bias}, lam, train_loss, val_loss


def stepped_optimizer(kind: str, params: dict, train_loss, steps: int = 4):
    """A real torch optimiser after a few steps on ``train_loss``."""
    make = {"adam": lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.95), weight_decay=0.01),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.2, nesterov=False),
            "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)}[kind]
    optimizer = make(list(params.values()))
    for _ in range(steps):
        optimizer.zero_grad()
        train_loss(params).backward()
        optimizer.step()
    optimizer.zero_grad()
    return optimizer


def differenced_update_jacobian(optimizer, params: dict, grads: list, h: float = 1e-6) -> list:
    """diag ∂u/∂g of the optimiser's real next step, by central differences of ``optimizer.step()``.

    Every update we precondition with is elementwise in g, so one pair of steps with all
    coordinates shifted by ±h gives the whole diagonal.
    """
    moves = []
    for sign in (1.0, -1.0):
        twin = copy.deepcopy({"opt": optimizer, "params": params})
        opt, ps = twin["opt"], list(twin["params"].values())
        before = [p.detach().clone() for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g + sign * h
        opt.step()
        moves.append([b - p.detach() for b, p in zip(before, ps)])  # u = θ_t − θ_{t+1}
    return [(up - um) / (2 * h) for up, um in zip(*moves)]


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd", "nesterov"])
def test_preconditioner_is_the_jacobian_of_the_real_optimizer_step(kind):
    params, _, train_loss, _ = softmax_regression()
    optimizer = stepped_optimizer(kind, params, train_loss)
    grads = list(torch.autograd.grad(train_loss(params), list(params.values())))
    got = optimizer_preconditioner(optimizer, params, train_grads=grads)
    want = differenced_update_jacobian(optimizer, params, grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-10)
    if kind.startswith("adam"):
        assert torch.cat([g.flatten() for g in got]).std() > 0  # a real diagonal, not a multiple of I


def test_sama_with_adam_equals_the_autograd_reference():
    params, lam, train_loss, val_loss = softmax_regression(seed=1)
    optimizer = stepped_optimizer("adam", params, train_loss, steps=5)
    names, leaves = list(params), list(params.values())
    grads = list(torch.autograd.grad(train_loss(params), leaves))
    precondition = differenced_update_jacobian(optimizer, params, grads)
    # reference: ∂_λ L_val − ∇_λ ⟨∇_θ L_train, P v⟩ with autograd's double backward
    v = torch.autograd.grad(val_loss(params), leaves)
    train_grads = torch.autograd.grad(train_loss(params), leaves, create_graph=True)
    pairing = sum((g * (p * vv)).sum() for g, p, vv in zip(train_grads, precondition, v))
    want = -torch.autograd.grad(pairing, lam)[0]
    lam.grad = None
    meta_backward("sama", params, [lam], train_loss, val_loss, base_optimizer=optimizer, fd_epsilon=1e-4)
    torch.testing.assert_close(lam.grad, want, rtol=1e-6, atol=1e-12)
    assert want.abs().max() > 1e-6
    assert all(p.grad is None for p in leaves)  # θ received nothing
    # and differs from the SGD preconditioner's direction
    lam.grad = None
    meta_backward("sama", params, [lam], train_loss, val_loss, inner_lr=0.05, fd_epsilon=1e-4)
    cosine = torch.nn.functional.cosine_similarity(lam.grad, want, dim=0)
    assert cosine < 0.9999


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("method,options,message", [
    ("cg", {"cg_iters": 0}, "cg_iters must be an integer >= 1"),
    ("cg", {"cg_iters": 2.5}, "cg_iters must be an integer >= 1"),
    ("cg", {"cg_damping": -0.1}, "cg_damping must be a finite number >= 0"),
    ("cg", {"cg_tol": -1.0}, "cg_tol must be a finite number >= 0"),
    ("neumann", {"neumann_iters": 0, "neumann_alpha": 0.1}, "neumann_iters must be an integer >= 1"),
    ("neumann", {"neumann_alpha": 0.0}, "neumann_alpha must be a finite number > 0"),
    ("neumann", {"neumann_alpha": -1.0}, "neumann_alpha must be a finite number > 0"),
    ("neumann", {}, "neumann needs neumann_alpha (or inner_lr"),
    ("sama", {}, "sama without base_optimizer is plain SGD and needs inner_lr"),
    ("sama", {"inner_lr": 0.1, "fd_epsilon": 0.0}, "fd_epsilon must be a finite number > 0"),
    ("sama", {"inner_lr": -0.1}, "inner_lr must be a finite number > 0"),
])
def test_bad_options_raise_value_error(method, options, message):
    with pytest.raises(ValueError) as err:
        estimate(method, one_d_instance(1.0, 0.2), **options)
    assert message in str(err.value)


def test_unsupported_optimizers_raise_value_error():
    params, lam, train_loss, val_loss = softmax_regression()
    for optimizer, message in [(torch.optim.RMSprop(list(params.values())), "not RMSprop"),
                               (torch.optim.Adam(list(params.values()), amsgrad=True), "amsgrad"),
                               (torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]), "does not optimise")]:
        with pytest.raises(ValueError, match=message):
            sama_hypergrad(params, [lam], train_loss, val_loss, base_optimizer=optimizer)
    with pytest.raises(ValueError, match="solver must be"):
        implicit_hypergrad(params, [lam], train_loss, val_loss, solver="lbfgs")
    with pytest.raises(ValueError, match="requires_grad"):
        implicit_hypergrad(params, [lam.detach()], train_loss, val_loss)


def test_registered_by_name_and_accumulate():
    assert {"cg", "neumann", "sama"} <= set(ESTIMATORS)
    inst = one_d_instance(1.1, 0.3)
    for method in ("cg", "neumann", "sama"):
        once = estimate(method, inst, inner_lr=0.3).clone()
        meta_backward(method, inst.params, inst.hyperparams, inst.train_loss_fn, inst.val_loss_fn, inner_lr=0.3)
        torch.testing.assert_close(inst.hyperparams[0].grad.flatten(), 2 * once, rtol=1e-13, atol=0)


@pytest.mark.parametrize("solver", ["cg", "neumann"])
def test_a_non_finite_hessian_vector_product_raises_instead_of_a_zero_hypergradient(solver):
    # |θ|^1.5 has a finite loss and gradient at θ = 0 but an infinite second derivative there, as a
    # float16 double backward that overflows: CG used to stop at the NaN curvature and return x = 0
    theta = torch.tensor([0.0, 0.5], dtype=torch.float64)
    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    train = lambda p: lam * p["theta"].abs().pow(1.5).sum() + (p["theta"] ** 2).sum()  # noqa: E731
    val = lambda p: ((p["theta"] - 1.0) ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match=rf"^{solver}: train_loss_fn's Hessian-vector products are non-finite"):
        implicit_hypergrad({"theta": theta}, [lam], train, val, solver=solver, inner_lr=0.1)
    assert lam.grad is None   # nothing accumulated
    finite = torch.tensor([0.25, 0.5], dtype=torch.float64)   # away from 0 the same problem is fine
    implicit_hypergrad({"theta": finite}, [lam], train, val, solver=solver, inner_lr=0.1)
    assert torch.isfinite(lam.grad).all() and lam.grad != 0


def test_a_non_finite_loss_is_named_before_the_products():
    theta = torch.tensor([0.0, 0.5], dtype=torch.float64)
    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="^train_loss_fn returned a non-finite loss"):
        implicit_hypergrad({"theta": theta}, [lam], lambda p: lam * p["theta"].sum() / 0.0,
                           lambda p: (p["theta"] ** 2).sum(), solver="cg")
