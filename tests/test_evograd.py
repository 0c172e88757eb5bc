"""common.evograd against closed forms, finite differences and its own low-memory twin."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.evograd import (CandidateNoise, candidate_weights, check_hyperparams, effective_inner_lr,
                            evograd_hypergrad_low_memory, evograd_meta_loss, functional_forward, perturbable_params)
from common.second_order import second_order_meta_loss
from conftest import quadratic_problem


def noise_of(seed: int, k: int, sigma: float, kind: str, like: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The ε_k that evograd draws from a generator seeded with ``seed`` (same seed protocol)."""
    seeds = torch.randint(0, 2**62, (k,), generator=torch.Generator().manual_seed(seed)).tolist()
    noise = CandidateNoise(seeds, sigma, kind)
    return [noise.sample(i, like) for i in range(k)]


def closed_form(theta, a, b, lam, eps, tau):
    """Independent numpy reference of the EvoGrad hypergradient of the quadratic problem."""
    theta, a, b, lam = (t.detach().numpy() for t in (theta, a, b, lam))
    cands = np.stack([theta + e for e in eps])                    # [K, d]
    losses = ((cands - a) ** 2).sum(1) + (lam * cands ** 2).sum(1)
    w = np.exp(-(losses - losses.min()) / tau)
    w /= w.sum()
    merged = (w[:, None] * cands).sum(0)
    dval_dmerged = 2 * (merged - b)                                # [d]
    dloss_dlam = cands ** 2                                        # [K, d]: ∂ℓ_k/∂λ_i
    dw_dlam = -(w[:, None] / tau) * (dloss_dlam - (w[:, None] * dloss_dlam).sum(0))   # [K, d]
    dval_dw = cands @ dval_dmerged                                 # [K]: ∂L_val/∂w_k
    return dval_dw @ dw_dlam, losses, w


@pytest.mark.parametrize("kind", ["sign", "gaussian"])
@pytest.mark.parametrize("k", [2, 5])
def test_matches_closed_form_on_quadratic(kind, k):
    theta, a, b, lam, train, val = quadratic_problem()
    sigma, tau = 0.3, 0.5
    out = evograd_meta_loss({"theta": theta}, train, val, n_candidates=k, sigma=sigma, temperature=tau,
                            noise=kind, generator=torch.Generator().manual_seed(7), return_diagnostics=True)
    out.val_loss.backward()
    eps = [e[0].numpy() for e in noise_of(7, k, sigma, kind, [theta])]
    expected, losses, w = closed_form(theta, a, b, lam, eps, tau)
    np.testing.assert_allclose(out.candidate_losses.numpy(), losses, rtol=1e-12)
    np.testing.assert_allclose(out.weights.numpy(), w, rtol=1e-10)
    np.testing.assert_allclose(lam.grad.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert np.abs(expected).max() > 1e-3  # non-degenerate


@pytest.mark.parametrize("kind", ["sign", "gaussian"])
@pytest.mark.parametrize("k", [2, 5])
def test_mean_equals_second_order_step_with_effective_lr(kind, k):
    """E[EvoGrad] = one-step second-order hypergradient with η_eff = (K-1)σ²/(Kτ) (module docstring).

    The mean is estimated with a control variate: the leading-order term of each draw,
    c = −(1/(Kτ)) Σ_k ⟨v, ε_k⟩ (g_k − ḡ) with v = ∇L_val(θ), g_k = ∂ℓ_k/∂λ = (θ + ε_k)², computed
    by hand from the same noise, whose mean is known exactly: E[c] = −((K−1)σ²/(Kτ)) 2θ ⊙ v
    (E[ε εᵀ] = σ²I for both noise kinds; the ε² part of g_k has zero correlation with ⟨v, ε⟩).
    mean(EvoGrad − c) + E[c] is unbiased and its spread is far below EvoGrad's own, so 200 draws
    resolve a 5 % scale error in either EvoGrad or η_eff. The first-order statement itself holds to
    about 1e-3 here (terms of higher order in σ‖∇ℓ‖/τ), which the 1 % margin allows.
    """
    theta, a, b, lam, train, val = quadratic_problem()
    sigma, tau, draws = 1e-4, 0.05, 200  # σ small: Δℓ/τ ~ 1e-3, so w_k ≈ 1/K to first order
    v = 2 * (theta - b)
    samples, controls = [], []
    for draw in range(draws):
        lam.grad = None
        evograd_meta_loss({"theta": theta}, train, val, n_candidates=k, sigma=sigma, temperature=tau,
                          noise=kind, generator=torch.Generator().manual_seed(draw)).backward()
        samples.append(lam.grad.clone())
        eps = torch.stack([e[0] for e in noise_of(draw, k, sigma, kind, [theta])])   # [K, d], the same noise
        g = (theta + eps) ** 2
        controls.append(-((eps @ v)[:, None] * (g - g.mean(0))).sum(0) / (k * tau))
    samples, controls = torch.stack(samples), torch.stack(controls)
    eta_eff = effective_inner_lr(k, sigma, tau)
    assert eta_eff == pytest.approx((k - 1) * sigma ** 2 / (k * tau), rel=1e-15)
    residual = samples - controls
    mean = residual.mean(0) - eta_eff * 2 * theta * v
    standard_error = (residual.std(0) / draws ** 0.5).norm()
    lam.grad = None
    second_order_meta_loss({"theta": theta}, train, val, inner_lr=eta_eff).backward()
    expected = lam.grad.clone()
    assert 4 * standard_error < 0.01 * expected.norm()    # precise enough to reject a 5 % scale error
    assert (mean - expected).norm() < 4 * standard_error + 0.01 * expected.norm()
    assert (controls.std(0) / draws ** 0.5).norm() > 4 * standard_error  # the control variate did reduce the spread


def test_noise_kinds_have_the_right_distribution():
    ref = [torch.zeros(20000, dtype=torch.float64)]
    sign = CandidateNoise([3], 0.01, "sign").sample(0, ref)[0]
    assert set(sign.unique().tolist()) == {-0.01, 0.01}
    gauss = CandidateNoise([3], 0.01, "gaussian").sample(0, ref)[0]
    assert abs(gauss.std().item() - 0.01) < 3e-4 and abs(gauss.mean().item()) < 3e-4
    again = CandidateNoise([3], 0.01, "gaussian").sample(0, ref)[0]
    assert torch.equal(gauss, again)  # regenerated exactly from the seed


def test_gradcheck_against_finite_differences():
    theta, a, b, _, _, val = quadratic_problem()
    lam = torch.tensor([0.3, 0.7, 0.2, 0.9, 0.4, 0.6], dtype=torch.float64, requires_grad=True)

    def f(lam_):
        def train(p):
            return ((p["theta"] - a) ** 2).sum() + (lam_ * p["theta"] ** 2).sum()
        return evograd_meta_loss({"theta": theta}, train, val, n_candidates=4, sigma=0.2, temperature=0.3,
                                 noise="gaussian", generator=torch.Generator().manual_seed(11))
    assert torch.autograd.gradcheck(f, (lam,), eps=1e-6, atol=1e-7)


def test_candidate_weights_softmax_over_dim0():
    losses = torch.tensor([[1.0, 2.0], [3.0, 0.5], [2.0, 2.0]])
    w = candidate_weights(losses, 0.5)
    manual = torch.exp(-losses / 0.5) / torch.exp(-losses / 0.5).sum(0)
    torch.testing.assert_close(w, manual)
    with pytest.raises(ValueError, match="temperature"):
        candidate_weights(losses, 0.0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Parameter(torch.full((4,), 0.5))  # a hyperparameter living inside the network
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x, use_gate=True):
        h = self.bn(self.conv(x))
        if use_gate:
            h = h * (1 + self.gate.view(1, -1, 1, 1))
        return self.fc(F.relu(h).flatten(1))


def cnn_problem(dtype=torch.float32):
    torch.manual_seed(0)
    net = SmallCNN().to(dtype)
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(6, 1, 8, 8, generator=g, dtype=dtype), torch.randn(6, 1, 8, 8, generator=g, dtype=dtype)
    y, yv = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    scale = torch.tensor([1.3, -0.2], dtype=dtype, requires_grad=True)  # a hyperparameter acting on the input
    params = perturbable_params(net, include=lambda name: name != "gate")
    hyper = [scale, net.gate]

    def train(p):
        return F.cross_entropy(functional_forward(net, p, torch.tanh(x * scale[0] + scale[1])), y)

    def val(p):
        return F.cross_entropy(functional_forward(net, p, xv, use_gate=False), yv)
    return net, params, hyper, train, val


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_low_memory_path_equals_plain_path(dtype, atol):
    net, params, hyper, train, val = cnn_problem(dtype)
    kwargs = dict(n_candidates=3, sigma=0.05, temperature=0.05)
    plain = evograd_meta_loss(params, train, val, generator=torch.Generator().manual_seed(5),
                              return_diagnostics=True, **kwargs)
    plain.val_loss.backward()
    expected = [h.grad.clone() for h in hyper]
    for h in hyper:
        h.grad = None
    low = evograd_hypergrad_low_memory(params, hyper, train, val, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.allclose(low.val_loss, plain.val_loss.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(low.weights, plain.weights)
    for h, e in zip(hyper, expected):
        assert e.abs().max() > 10 * atol  # the gradient is not trivially zero
        torch.testing.assert_close(h.grad, e, atol=atol, rtol=1e-4)


def test_gradient_reaches_hyperparameters_only_and_batchnorm_stats_are_kept():
    net, params, hyper, train, val = cnn_problem()
    before = {n: b.clone() for n, b in net.named_buffers()}
    evograd_meta_loss(params, train, val, n_candidates=4, generator=torch.Generator().manual_seed(0)).backward()
    for n, b in net.named_buffers():
        assert torch.equal(b, before[n]), f"buffer {n} changed"
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in hyper)
    assert all(p.grad is None for n, p in net.named_parameters() if n != "gate")
    assert all(not p.requires_grad for p in params.values())


def test_reproducible_with_generator():
    _, params, hyper, train, val = cnn_problem(torch.float64)

    def run(seed):
        out = evograd_meta_loss(params, train, val, generator=torch.Generator().manual_seed(seed),
                                sigma=0.05, return_diagnostics=True)
        return out.val_loss.item(), out.weights
    a, b, c = run(3), run(3), run(4)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_parameter_filter():
    net = SmallCNN()
    head = perturbable_params(net, include=lambda n: n.startswith("fc."))
    assert list(head) == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match="filter"):
        perturbable_params(net, include=lambda n: False)


def test_merge_keeps_no_parameter_copies_alive():
    """With λ acting on the loss only, the graph kept for backward is tiny: no K noise copies."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 200))   # ~80k parameters
    x = torch.randn(8, 200)
    lam = torch.tensor(0.7, requires_grad=True)
    params = perturbable_params(net)
    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.numel() * t.element_size())
        return t

    def train(p):
        return lam * functional_forward(net, p, x).pow(2).mean()

    def val(p):
        return functional_forward(net, p, x).mean()
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = evograd_meta_loss(params, train, val, n_candidates=8, sigma=1e-3)
    # validation forward saves θ* once (needed for ∂L/∂θ*); 8 candidates add only scalars
    assert sum(saved_bytes) < 1.5 * param_bytes
    loss.backward()
    assert lam.grad is not None and lam.grad != 0


def test_invalid_arguments_raise_value_error():
    theta, _, _, lam, train, val = quadratic_problem()
    p = {"theta": theta}
    cases = [
        (dict(n_candidates=1), "n_candidates"),
        (dict(n_candidates=2.5), "n_candidates"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(noise="uniform"), "noise"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            evograd_meta_loss(p, train, val, **kwargs)
        if "noise" not in kwargs:
            with pytest.raises(ValueError, match=word):
                effective_inner_lr(**{"n_candidates": 2, "sigma": 1e-3, "temperature": 0.05, **kwargs})
    with pytest.raises(ValueError, match="non-empty"):
        evograd_meta_loss({}, train, val)
    with pytest.raises(ValueError, match="scalar"):
        evograd_meta_loss(p, lambda q: q["theta"] * lam, val)
    with pytest.raises(ValueError, match="non-finite"):
        evograd_meta_loss(p, lambda q: train(q) * float("inf"), val)
    with pytest.raises(ValueError, match="non-finite"):
        evograd_meta_loss(p, train, lambda q: val(q) * float("nan"))
    with pytest.raises(ValueError, match="scalar"):
        evograd_meta_loss(p, train, lambda q: q["theta"])
    with pytest.raises(ValueError, match="requires grad"):
        evograd_meta_loss(p, lambda q: q["theta"].sum(), val)
    with pytest.raises(ValueError, match="hyperparams"):
        evograd_hypergrad_low_memory(p, [], train, val)
    with pytest.raises(ValueError, match="requires_grad"):
        evograd_hypergrad_low_memory(p, [torch.zeros(2)], train, val)


def test_every_estimator_checks_hyperparams_alike():
    """One check (common.evograd.check_hyperparams) for every estimator family: the entry at fault is named."""
    from common.estimators import finite_difference_hypergrad
    from common.fsdp import sharded_evograd_hypergrad
    from common.implicit import implicit_hypergrad, sama_hypergrad

    lam = torch.zeros(2, requires_grad=True)
    assert check_hyperparams((lam,)) == [lam]
    with pytest.raises(ValueError, match=r"^hyperparams is empty: pass a non-empty list of tensors"):
        check_hyperparams([])
    with pytest.raises(ValueError, match=r"hyperparams\[1\] does not require grad$"):
        check_hyperparams([lam, torch.zeros(2)])
    with pytest.raises(ValueError, match=r"hyperparams\[0\] is a float$"):
        check_hyperparams([0.5])
    with pytest.raises(ValueError, match=r"list of leaf tensors .*hyperparams\[0\] is not a leaf$"):
        check_hyperparams([lam * 2], leaf=True)
    p, train, val = {"theta": torch.ones(2)}, lambda q: (q["theta"] * lam).sum(), lambda q: q["theta"].sum()
    calls = [lambda h: evograd_hypergrad_low_memory(p, h, train, val),
             lambda h: finite_difference_hypergrad(p, h, train, val, inner_lr=0.1),
             lambda h: implicit_hypergrad(p, h, train, val), lambda h: sama_hypergrad(p, h, train, val, inner_lr=0.1)]
    for call in calls:
        with pytest.raises(ValueError, match=r"hyperparams\[1\] does not require grad$"):
            call([lam, torch.zeros(2)])
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"hyperparams\[0\] is not a leaf$"):
        sharded_evograd_hypergrad(model, [lam * 2], lambda: model(torch.ones(1, 2)).sum(), lambda: model.weight.sum())
