"""Second-order baselines against the analytic unrolled hypergradient, and higher vs torch.func."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.evograd import functional_forward, perturbable_params
from common.hypergrad import ESTIMATORS, meta_backward
from common.second_order import second_order_meta_loss, second_order_meta_loss_func
from conftest import quadratic_problem

IMPLEMENTATIONS = [second_order_meta_loss, second_order_meta_loss_func]


def analytic_unrolled(theta, a, b, lam, lr, steps):
    """θ_{t+1} = θ_t − η(2(θ_t − a) + 2λθ_t);  d_t = dθ_t/dλ (diagonal) by forward recursion."""
    lam = lam.detach()
    th, d = theta.clone(), torch.zeros_like(theta)
    for _ in range(steps):
        d = d * (1 - 2 * lr * (1 + lam)) - 2 * lr * th
        th = th - lr * (2 * (th - a) + 2 * lam * th)
    return 2 * (th - b) * d


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("steps", [1, 3])
def test_matches_analytic_unrolled_hypergradient(impl, steps):
    theta, a, b, lam, train, val = quadratic_problem()
    impl({"theta": theta}, train, val, inner_lr=0.1, inner_steps=steps).backward()
    expected = analytic_unrolled(theta, a, b, lam, 0.1, steps)
    assert expected.abs().min() > 1e-3
    torch.testing.assert_close(lam.grad, expected, rtol=1e-12, atol=1e-14)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def network_problem():
    torch.manual_seed(0)
    net = TinyNet()
    g = torch.Generator().manual_seed(2)
    x, xv = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    y, yv = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (16,), generator=g)
    example_logits = torch.zeros(16, requires_grad=True)   # per-example weights, as in loss reweighting
    log_decay = torch.tensor(-3.0, requires_grad=True)     # a weight-decay hyperparameter

    def train(p):
        losses = F.cross_entropy(functional_forward(net, p, x), y, reduction="none")
        decay = log_decay.exp() * sum((w ** 2).sum() for w in p.values())
        return (torch.softmax(example_logits, 0) * losses).sum() + decay

    def val(p):
        return F.cross_entropy(functional_forward(net, p, xv), yv)
    return net, perturbable_params(net), [example_logits, log_decay], train, val


@pytest.mark.parametrize("steps", [1, 2])
def test_higher_and_torch_func_agree_on_a_network(steps):
    net, params, hyper, train, val = network_problem()
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    grads = []
    for impl in IMPLEMENTATIONS:
        for h in hyper:
            h.grad = None
        impl(params, train, val, inner_lr=0.5, inner_steps=steps).backward()
        grads.append([h.grad.clone() for h in hyper])
    for g_higher, g_func in zip(*grads):
        assert g_higher.abs().max() > 1e-4
        torch.testing.assert_close(g_higher, g_func, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())


def test_meta_backward_dispatches_to_the_same_numbers():
    _, params, hyper, train, val = network_problem()
    second_order_meta_loss(params, train, val, inner_lr=0.5).backward()
    direct = [h.grad.clone() for h in hyper]
    for h in hyper:
        h.grad = None
    loss = meta_backward("second_order", params, hyper, train, val, inner_lr=0.5, sigma=1e-3)  # sigma ignored
    assert isinstance(loss, float)
    for h, d in zip(hyper, direct):
        torch.testing.assert_close(h.grad, d, rtol=0, atol=0)
    assert {"evograd", "evograd_low_memory", "second_order", "second_order_func"} <= set(ESTIMATORS)
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        meta_backward("nope", params, hyper, train, val)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bad_arguments(impl):
    theta, _, _, _, train, val = quadratic_problem()
    p = {"theta": theta}
    with pytest.raises(ValueError, match="inner_lr"):
        impl(p, train, val, inner_lr=0.0)
    with pytest.raises(ValueError, match="inner_steps"):
        impl(p, train, val, inner_lr=0.1, inner_steps=0)
    with pytest.raises(ValueError, match="non-empty"):
        impl({}, train, val, inner_lr=0.1)
    with pytest.raises(ValueError, match="non-finite"):
        impl(p, train, lambda q: val(q) * float("nan"), inner_lr=0.1)
