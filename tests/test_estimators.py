"""Hypergradient estimators against hand-derived 1-D and ridge-regression hypergradients.

The references here use no autograd: forward-mode recursions of dθ_t/dλ written out by hand
(float64), closed-form EvoGrad weights for given noise, and the implicit-function answer.
"""
import argparse
import math

import pytest
import torch

from common.estimators import finite_difference_hypergrad, multistep_meta_loss
from common.evograd import CandidateNoise
from common.hypergrad import ESTIMATORS, add_estimator_args, estimator_options, meta_backward
from common.hypergrad_study import (ONE_D_TARGET, ProblemInstance, make_ridge_data, one_d_f_prime,
                                    one_d_f_second, one_d_instance)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these tensors are small, and two threads spin badly on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
THETA0, LAM, ETA = 1.7, -0.4, 0.3


def estimate(method: str, instance, **options) -> torch.Tensor:
    """The ``method`` hypergradient of ``instance`` through ``meta_backward``, flattened."""
    for h in instance.hyperparams:
        h.grad = None
    meta_backward(method, instance.params, instance.hyperparams, instance.train_loss_fn, instance.val_loss_fn,
                  **options)
    return torch.cat([h.grad.flatten() for h in instance.hyperparams])


# ----------------------------------------------------------------------------- 1-D, by hand

def one_d_windowed(theta: float, lam: float, eta: float, steps: int, window: int) -> float:
    """dL_val(θ_T)/dλ for L_train = f(θ − λ), one gradient per window (window 1: plain unroll).

    Inside a window starting at s: θ_{s+j} = θ_s − jη f'(θ_s − λ) and, with J = dθ/dλ,
    J_{s+j} = J_s − jη f''(θ_s − λ)(J_s − 1).
    """
    theta, lam = torch.tensor(theta, dtype=F64), torch.tensor(lam, dtype=F64)
    jac, done = torch.tensor(0.0, dtype=F64), 0
    while done < steps:
        j = min(window, steps - done)
        x = theta - lam
        theta, jac = theta - j * eta * one_d_f_prime(x), jac - j * eta * one_d_f_second(x) * (jac - 1)
        done += j
    return (one_d_f_prime(theta - ONE_D_TARGET) * jac).item()


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("method", ["unrolled", "second_order", "second_order_func"])
def test_unrolled_matches_one_d_recursion(method, steps):
    got = estimate(method, one_d_instance(THETA0, LAM), inner_lr=ETA, inner_steps=steps)
    assert got.item() == pytest.approx(one_d_windowed(THETA0, LAM, ETA, steps, 1), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("steps,window", [(7, 1), (7, 2), (7, 3), (7, 7), (6, 3), (1, 1)])
def test_multistep_matches_one_d_windowed_recursion(steps, window):
    got = estimate("multistep", one_d_instance(THETA0, LAM), inner_lr=ETA, inner_steps=steps, window=window)
    assert got.item() == pytest.approx(one_d_windowed(THETA0, LAM, ETA, steps, window), rel=1e-12, abs=1e-15)


def test_multistep_window_one_equals_unrolled_and_window_t_is_one_long_step():
    inst = one_d_instance(THETA0, LAM)
    torch.testing.assert_close(estimate("multistep", inst, inner_lr=ETA, inner_steps=5, window=1),
                               estimate("unrolled", inst, inner_lr=ETA, inner_steps=5), rtol=1e-14, atol=0)
    one_long = estimate("second_order", inst, inner_lr=5 * ETA, inner_steps=1)
    default_window = estimate("multistep", inst, inner_lr=ETA, inner_steps=5)  # W defaults to T
    assert torch.allclose(default_window, one_long, rtol=1e-13, atol=0)


def test_finite_difference_error_is_second_order_in_epsilon():
    inst = one_d_instance(THETA0, LAM)
    exact = one_d_windowed(THETA0, LAM, ETA, 1, 1)
    errors = [abs(estimate("finite_difference", inst, inner_lr=ETA, fd_epsilon=eps).item() - exact)
              for eps in (0.2, 0.1, 0.05)]
    assert errors[0] < 0.2**2 * abs(exact)  # O(ε²) with a constant below 1 here
    for big, small in zip(errors, errors[1:]):
        assert big / small == pytest.approx(4.0, rel=0.05)  # halving ε quarters the error
    default = estimate("finite_difference", inst, inner_lr=ETA).item()  # ε = 0.01
    assert default == pytest.approx(exact, rel=1e-4)


def evograd_by_hand(theta: torch.Tensor, lam: torch.Tensor, eps: torch.Tensor, tau: float,
                    dtrain_dlam, dval_dtheta) -> torch.Tensor:
    """EvoGrad's dL_val(θ*)/dλ for candidates θ + ε_k (eps: [K, d]), softmax weights by hand.

    w = softmax(−ℓ/τ), θ* = θ + Σ_k w_k ε_k, dw_k/dλ = −(w_k/τ)(g_k − Σ_j w_j g_j) with
    g_k = ∂ℓ_k/∂λ ([K, h]); dL/dλ = Σ_k <∇L_val(θ*), ε_k> dw_k/dλ.
    """
    losses, grads = zip(*(dtrain_dlam(theta + e, lam) for e in eps))
    losses, grads = torch.stack(losses), torch.stack(grads)
    w = torch.exp(-(losses - losses.min()) / tau)
    w = w / w.sum()
    merged = theta + (w[:, None] * eps).sum(0)
    dw = -(w / tau)[:, None] * (grads - (w[:, None] * grads).sum(0))
    return ((eps @ dval_dtheta(merged))[:, None] * dw).sum(0)


def evograd_noise(n_candidates: int, sigma: float, kind: str, seed: int, dim: int) -> torch.Tensor:
    """The K perturbations EvoGrad draws from a generator seeded with ``seed`` ([K, dim])."""
    seeds = torch.randint(0, 2**62, (n_candidates,), generator=torch.Generator().manual_seed(seed)).tolist()
    noise = CandidateNoise(seeds, sigma, kind)
    return torch.stack([noise.sample(k, [torch.empty(dim, dtype=F64)])[0] for k in range(n_candidates)])


@pytest.mark.parametrize("method", ["evograd", "evograd_low_memory"])
@pytest.mark.parametrize("n_candidates,kind", [(2, "gaussian"), (5, "sign"), (10, "gaussian")])
def test_evograd_matches_closed_form_on_one_d(method, n_candidates, kind):
    sigma, tau = 0.05, 0.02
    got = estimate(method, one_d_instance(THETA0, LAM), n_candidates=n_candidates, sigma=sigma, temperature=tau,
                   noise=kind, generator=torch.Generator().manual_seed(3))
    eps = evograd_noise(n_candidates, sigma, kind, 3, 1)

    def train(theta, lam):  # ℓ = f(θ − λ), ∂ℓ/∂λ = −f'(θ − λ)
        x = theta - lam
        return (torch.log(torch.cosh(x)) + 0.1 * x**2).sum(), -one_d_f_prime(x)
    want = evograd_by_hand(torch.tensor([THETA0], dtype=F64), torch.tensor([LAM], dtype=F64), eps, tau, train,
                           lambda theta: one_d_f_prime(theta - ONE_D_TARGET))
    assert got.item() != 0
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_evograd_small_sigma_limit_is_one_step_with_rate_sigma_squared_over_tau():
    """K = 2, ε = ±σ, σ → 0: dL/dλ → (σ²/τ)(∂²ℓ/∂θ∂λ)·(−L_val'(θ)) = the one-step form with η = σ²/τ."""
    sigma, tau = 1e-3, 0.05
    for seed in range(20):  # find a draw whose two sign perturbations differ
        eps = evograd_noise(2, sigma, "sign", seed, 1)
        if eps[0].item() != eps[1].item():
            break
    got = estimate("evograd", one_d_instance(THETA0, LAM), n_candidates=2, sigma=sigma, temperature=tau,
                   noise="sign", generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(THETA0 - LAM, dtype=F64)
    limit = -(sigma**2 / tau) * one_d_f_second(x) * one_d_f_prime(torch.tensor(THETA0 - ONE_D_TARGET, dtype=F64))
    # θ* = θ ± σ tanh(...) differs from θ by O(σ²/τ) and the softmax saturation adds O(σ²/τ²)
    assert got.item() == pytest.approx(-limit.item(), rel=2e-3)


# ----------------------------------------------------------------------------- ridge, by hand

@pytest.fixture(scope="module")
def ridge():
    data = make_ridge_data(30, 40, 6, seed=5)
    gen = torch.Generator().manual_seed(9)
    lam = (math.log(0.2) + 0.5 * torch.randn(6, generator=gen, dtype=F64))
    w0 = torch.randn(6, generator=gen, dtype=F64)  # away from w*(λ)
    return data, lam, w0


def ridge_instance_at(data, lam, w0) -> ProblemInstance:
    """The ridge problem at an arbitrary w0 (the study's instances sit at w*(λ))."""
    lam = lam.clone().requires_grad_()
    return ProblemInstance({"w": w0.clone()}, [lam], lambda p: data.train_loss(p["w"], lam),
                           lambda p: data.val_loss(p["w"]), [data.ift_hypergrad(lam.detach())])


def ridge_windowed(data, lam, w0, eta, steps, window):
    """Linear dynamics w ← w − jη((A + D)w − b), J ← (I − jη(A + D))J − jη diag(e^λ ⊙ w), by hand."""
    n = len(data.y_train)
    a = data.x_train.T @ data.x_train / n
    b = data.x_train.T @ data.y_train / n
    d = torch.diag(lam.exp())
    w, jac, done = w0.clone(), torch.zeros(len(w0), len(w0), dtype=F64), 0
    while done < steps:
        j = min(window, steps - done)
        w, jac = w - j * eta * ((a + d) @ w - b), (torch.eye(len(w)) - j * eta * (a + d)) @ jac - j * eta * torch.diag(lam.exp() * w)
        done += j
    grad_val = data.x_val.T @ (data.x_val @ w - data.y_val) / len(data.y_val)
    return jac.T @ grad_val


@pytest.mark.parametrize("method,options,window", [
    ("second_order", {"inner_steps": 1}, 1), ("second_order_func", {"inner_steps": 1}, 1),
    ("unrolled", {"inner_steps": 9}, 1), ("multistep", {"inner_steps": 9, "window": 1}, 1),
    ("multistep", {"inner_steps": 9, "window": 4}, 4), ("multistep", {"inner_steps": 9, "window": 9}, 9),
    ("finite_difference", {"fd_epsilon": 0.01}, 1),
])
def test_ridge_estimators_match_linear_recursion(ridge, method, options, window):
    data, lam, w0 = ridge
    got = estimate(method, ridge_instance_at(data, lam, w0), inner_lr=0.2, **options)
    want = ridge_windowed(data, lam, w0, 0.2, options.get("inner_steps", 1), window)
    # ∂L_train/∂λ is quadratic in w, so central differences are exact up to rounding
    tol = 1e-8 if method == "finite_difference" else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_ridge_long_unroll_converges_to_implicit_function_answer(ridge):
    data, lam, _ = ridge
    inst = ridge_instance_at(data, lam, data.solution(lam))
    got = estimate("unrolled", inst, inner_lr=0.2, inner_steps=300)
    torch.testing.assert_close(got, inst.reference[0], rtol=1e-6, atol=1e-9)


def test_evograd_matches_closed_form_on_ridge(ridge):
    data, lam, w0 = ridge
    sigma, tau = 0.01, 0.01
    got = estimate("evograd", ridge_instance_at(data, lam, w0), n_candidates=4, sigma=sigma, temperature=tau,
                   noise="gaussian", generator=torch.Generator().manual_seed(11))

    def train(w, lam_):  # ℓ and ∂ℓ/∂λ_j = e^{λ_j} w_j²/2
        return data.train_loss(w, lam_), lam_.exp() * w**2 / 2
    want = evograd_by_hand(w0, lam, evograd_noise(4, sigma, "gaussian", 11, 6), tau, train,
                           lambda w: data.x_val.T @ (data.x_val @ w - data.y_val) / len(data.y_val))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("method,options,message", [
    ("unrolled", {"inner_steps": 0}, "inner_steps (T) must be an integer >= 1"),
    ("multistep", {"inner_steps": 0, "window": 1}, "inner_steps (T) must be an integer >= 1"),
    ("multistep", {"inner_steps": 4, "window": 0}, "window (W) must be an integer >= 1"),
    ("multistep", {"inner_steps": 4, "window": 5}, "window (W = 5) must be <= inner_steps (T = 4)"),
    ("multistep", {"inner_steps": 4, "window": 2.0}, "window (W) must be an integer"),
    ("finite_difference", {"fd_epsilon": 0.0}, "fd_epsilon must be a finite number > 0"),
    ("finite_difference", {"inner_lr": -1.0}, "inner_lr must be > 0"),
])
def test_bad_arguments_give_clear_errors(method, options, message):
    inst = one_d_instance(THETA0, LAM)
    with pytest.raises(ValueError) as err:
        estimate(method, inst, **{"inner_lr": ETA, **options})
    assert message in str(err.value)


def test_direct_functions_reject_bad_arguments():
    inst = one_d_instance(THETA0, LAM)
    with pytest.raises(ValueError, match="window"):
        multistep_meta_loss(inst.params, inst.train_loss_fn, inst.val_loss_fn, ETA, 3, window=4)
    with pytest.raises(ValueError, match="inner_steps"):
        multistep_meta_loss(inst.params, inst.train_loss_fn, inst.val_loss_fn, ETA, inner_steps=-2)
    with pytest.raises(ValueError, match="requires_grad"):
        finite_difference_hypergrad(inst.params, [torch.zeros(1)], inst.train_loss_fn, inst.val_loss_fn, ETA)
    with pytest.raises(ValueError, match="non-finite"):
        finite_difference_hypergrad(inst.params, inst.hyperparams, lambda p: inst.train_loss_fn(p) * math.inf,
                                    inst.val_loss_fn, ETA)


def test_registry_names_and_accumulation():
    """Every registered estimator accumulates into ``.grad`` like ``backward()``: two calls (EvoGrad with the
    same noise) leave twice one call's hypergradient."""
    assert {"evograd", "evograd_low_memory", "second_order", "second_order_func", "finite_difference", "unrolled",
            "multistep"} <= set(ESTIMATORS)
    inst = one_d_instance(THETA0, LAM)

    def options() -> dict:
        return {"inner_lr": ETA, "inner_steps": 2, "window": 2, "n_candidates": 3, "sigma": 0.1,
                "temperature": 0.5, "noise": "gaussian", "generator": torch.Generator().manual_seed(7)}
    for method in sorted(ESTIMATORS):
        once = estimate(method, inst, **options()).clone()
        assert once.abs().max() > 0, method
        meta_backward(method, inst.params, inst.hyperparams, inst.train_loss_fn, inst.val_loss_fn, **options())
        torch.testing.assert_close(inst.hyperparams[0].grad.flatten(), 2 * once, rtol=1e-13, atol=0, msg=method)


def test_estimator_cli_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner_lr", type=float, default=0.7)  # an experiment's own flag is kept
    add_estimator_args(parser, inner_lr=0.1, inner_steps=3)
    args = parser.parse_args(["--window", "2"])
    assert estimator_options(args) == {"fd_epsilon": 0.01, "inner_lr": 0.7, "inner_steps": 3, "window": 2,
                                       "cg_iters": 10, "cg_damping": 0.0, "cg_tol": 1e-6, "neumann_iters": 5}
    assert "window" not in estimator_options(parser.parse_args([]))
    assert "neumann_alpha" not in estimator_options(args)  # None: meta_backward falls back to inner_lr
    args = parser.parse_args(["--cg_iters", "4", "--cg_damping", "0.5", "--neumann_alpha", "0.2", "--cg_tol", "0"])
    assert {k: estimator_options(args)[k] for k in ("cg_iters", "cg_damping", "neumann_alpha", "cg_tol")} == {
        "cg_iters": 4, "cg_damping": 0.5, "neumann_alpha": 0.2, "cg_tol": 0.0}
    for bad in (["--cg_iters", "0"], ["--cg_damping", "-1"], ["--neumann_alpha", "0"], ["--neumann_iters", "-2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# ----------------------------------------------------------------------------- L_val depending on λ directly

CURV, TARGET, GAMMA = 2.0, 0.5, 0.8  # L_train = a(θ − λ)²/2, L_val = (θ − c)²/2 + γλθ


def direct_instance(theta: float, lam: float) -> ProblemInstance:
    """A 1-D problem whose validation loss depends on λ directly: ∂_λ L_val = γθ, ∇_θ L_val = θ − c + γλ."""
    lam_t = torch.tensor([lam], dtype=F64, requires_grad=True)
    return ProblemInstance({"theta": torch.tensor([theta], dtype=F64)}, [lam_t],
                           lambda p: (CURV * (p["theta"] - lam_t) ** 2 / 2).sum(),
                           lambda p: ((p["theta"] - TARGET) ** 2 / 2 + GAMMA * lam_t * p["theta"]).sum(), [])


def direct_unrolled(theta: float, lam: float, step: float, n_steps: int) -> float:
    """n SGD steps of size ``step``: θ_n = λ + rⁿ(θ − λ), dθ_n/dλ = 1 − rⁿ, r = 1 − a·step; then
    dL_val(θ_n, λ)/dλ = γθ_n + (θ_n − c + γλ)(1 − rⁿ)."""
    r = 1 - CURV * step
    theta_n = lam + r**n_steps * (theta - lam)
    return GAMMA * theta_n + (theta_n - TARGET + GAMMA * lam) * (1 - r**n_steps)


def direct_evograd(theta: float, lam: float, eps: torch.Tensor, tau: float) -> float:
    """EvoGrad by hand: θ* = θ + Σ w_k ε_k, dL/dλ = γθ* + (θ* − c + γλ) Σ_k ε_k dw_k/dλ."""
    losses = CURV * (theta + eps[:, 0] - lam) ** 2 / 2
    dlosses = -CURV * (theta + eps[:, 0] - lam)          # ∂ℓ_k/∂λ
    w = torch.softmax(-losses / tau, 0)
    dw = -(w / tau) * (dlosses - (w * dlosses).sum())
    merged = theta + (w * eps[:, 0]).sum()
    return (GAMMA * merged + (merged - TARGET + GAMMA * lam) * (eps[:, 0] * dw).sum()).item()


DIRECT_CASES = {  # method: (options, closed form at θ, λ)
    "second_order": ({"inner_lr": ETA}, lambda t, l: direct_unrolled(t, l, ETA, 1)),
    "second_order_func": ({"inner_lr": ETA}, lambda t, l: direct_unrolled(t, l, ETA, 1)),
    "finite_difference": ({"inner_lr": ETA}, lambda t, l: direct_unrolled(t, l, ETA, 1)),
    "unrolled": ({"inner_lr": ETA, "inner_steps": 4}, lambda t, l: direct_unrolled(t, l, ETA, 4)),
    "multistep": ({"inner_lr": 0.1, "inner_steps": 6, "window": 2}, lambda t, l: direct_unrolled(t, l, 0.2, 3)),
    "cg": ({"cg_iters": 3}, lambda t, l: GAMMA * t + (t - TARGET + GAMMA * l)),
    "neumann": ({"neumann_iters": 3, "neumann_alpha": 0.2},
                lambda t, l: GAMMA * t + (1 - (1 - 0.2 * CURV) ** 4) * (t - TARGET + GAMMA * l)),
    "sama": ({"inner_lr": ETA}, lambda t, l: GAMMA * t + ETA * CURV * (t - TARGET + GAMMA * l)),
    "evograd": ({}, None),
    "evograd_low_memory": ({}, None),
    "evograd_batched": ({}, None),
}


def test_direct_cases_cover_every_estimator():
    assert set(DIRECT_CASES) == set(ESTIMATORS)


@pytest.mark.parametrize("method", sorted(DIRECT_CASES))
@pytest.mark.parametrize("theta,lam", [(1.3, -0.4), (-0.6, 0.9)])
def test_validation_loss_depending_on_lambda_directly(method, theta, lam):
    """Every estimator keeps the direct term ∂L_val/∂λ (here a sizeable part of the answer)."""
    options, closed_form = DIRECT_CASES[method]
    if closed_form is None:  # EvoGrad: the same noise by hand
        sigma, tau, k = 0.05, 0.02, 3
        options = {"n_candidates": k, "sigma": sigma, "temperature": tau, "noise": "gaussian",
                   "generator": torch.Generator().manual_seed(5)}
        want = direct_evograd(theta, lam, evograd_noise(k, sigma, "gaussian", 5, 1), tau)
    else:
        want = closed_form(theta, lam)
    got = estimate(method, direct_instance(theta, lam), **options).item()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_finite_difference_step_has_norm_fd_epsilon():
    """θ ± ε v with ε = fd_epsilon/‖v‖: pinned by the central difference written out with that step."""
    theta, lam, eta, delta = THETA0, LAM, ETA, 0.5  # a large step, so its size shows in the result
    inst = one_d_instance(theta, lam)
    got = estimate("finite_difference", inst, inner_lr=eta, fd_epsilon=delta).item()
    virtual = theta - eta * one_d_f_prime(torch.tensor(theta - lam, dtype=F64))
    v = one_d_f_prime(virtual - ONE_D_TARGET)                    # ∇L_val(θ'), here negative or positive
    x, shift = torch.tensor(theta - lam, dtype=F64), delta * torch.sign(v)
    # ∇_λ L_train(θ) = −f'(θ − λ); difference over 2ε = 2δ/|v|
    mixed = (-one_d_f_prime(x + shift) + one_d_f_prime(x - shift)) * v.abs() / (2 * delta)
    assert got == pytest.approx(-eta * mixed.item(), rel=1e-12)
    scaled = ProblemInstance(inst.params, inst.hyperparams, inst.train_loss_fn,
                             lambda p: 1000 * inst.val_loss_fn(p), [])
    # the step does not grow with ‖v‖, so the estimate is linear in L_val
    assert estimate("finite_difference", scaled, inner_lr=eta, fd_epsilon=delta).item() == pytest.approx(1000 * got,
                                                                                                        rel=1e-10)


@pytest.mark.parametrize("kind", ["gaussian", "sign"])
def test_candidate_noise_is_independent_across_tensors(kind):
    """One generator per candidate runs through all the tensors: two same-shape tensors get different
    draws, and over a multi-tensor parameter dict E[ε εᵀ] = σ² I (no entry repeats another's draw)."""
    like = [torch.zeros(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64), torch.zeros(4, dtype=F64)]
    sigma, n = 0.5, 4000
    noise = CandidateNoise(range(n), sigma, kind)
    first, second, _ = noise.sample(0, like)
    assert not torch.equal(first, second)
    draws = torch.stack([torch.cat([e.flatten() for e in noise.sample(k, like)]) for k in range(n)])  # [n, 16]
    moments = draws.T @ draws / n
    # each entry's sampling error is about σ²/√n (0.004); a repeated draw would put σ² (0.25) off the diagonal
    torch.testing.assert_close(moments, sigma ** 2 * torch.eye(16, dtype=F64), rtol=0, atol=5 * sigma ** 2 / n ** 0.5)
