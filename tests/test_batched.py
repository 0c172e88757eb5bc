"""Batched candidates (vmap), one host read per meta step, and the noise_device option (CPU)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common.evograd as evograd_module
from common.evograd import (CandidateNoise, evograd_hypergrad_low_memory, evograd_meta_loss, functional_forward,
                            perturbable_params)
from common.hypergrad import ESTIMATORS, meta_backward
from conftest import quadratic_problem


class SmallCNN(nn.Module):
    """Conv + BatchNorm + Linear: the layers whose vmap behaviour matters."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


def cnn_problem(dtype=torch.float64, dropout: float = 0.0, device="cpu"):
    """λ acts on the input (a per-pixel scale) and on the loss (per-example weights)."""
    torch.manual_seed(0)
    model = SmallCNN(dropout).to(device=device, dtype=dtype).train()
    g = torch.Generator().manual_seed(1)
    x, vx = (torch.randn(8, 1, 6, 6, generator=g, dtype=dtype).to(device) for _ in range(2))
    y, vy = (torch.randint(0, 3, (8,), generator=g).to(device) for _ in range(2))
    scale = (1 + 0.1 * torch.randn(1, 1, 6, 6, generator=g, dtype=dtype)).to(device).requires_grad_()
    weight_logits = (0.1 * torch.randn(8, generator=g, dtype=dtype)).to(device).requires_grad_()

    def train(p):
        losses = F.cross_entropy(functional_forward(model, p, x * scale), y, reduction="none")
        return (torch.softmax(weight_logits, 0) * losses).sum()

    def val(p):
        return F.cross_entropy(functional_forward(model, p, vx), vy)
    return model, [scale, weight_logits], train, val


def hypergrad(method, model, hyper, train, val, k=3, seed=5, **options):
    for h in hyper:
        h.grad = None
    meta_backward(method, perturbable_params(model), hyper, train, val, n_candidates=k, sigma=1e-2,
                  temperature=0.05, generator=torch.Generator().manual_seed(seed), inner_lr=0.1, **options)
    return [h.grad.clone() for h in hyper]


@pytest.mark.parametrize("k", [2, 5])
def test_batched_equals_loop_on_cnn_with_batchnorm(k):
    model, hyper, train, val = cnn_problem()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    loop = hypergrad("evograd", model, hyper, train, val, k)
    batched = hypergrad("evograd", model, hyper, train, val, k, batch_candidates=True)
    by_name = hypergrad("evograd_batched", model, hyper, train, val, k)
    for a, b, c in zip(loop, batched, by_name):
        assert a.abs().max() > 1e-4   # non-degenerate
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(c, b, rtol=0, atol=0)
    for n, b in model.named_buffers():   # BatchNorm running statistics untouched
        torch.testing.assert_close(b, stats[n], rtol=0, atol=0)


def test_batched_equals_loop_on_quadratic_with_diagnostics():
    theta, _, _, lam, train, val = quadratic_problem()
    outs = []
    for batch in (False, True):
        lam.grad = None
        out = evograd_meta_loss({"theta": theta}, train, val, n_candidates=4, sigma=0.3, temperature=0.5,
                                generator=torch.Generator().manual_seed(3), return_diagnostics=True,
                                batch_candidates=batch)
        out.val_loss.backward()
        outs.append((out, lam.grad.clone()))
    (loop, g_loop), (batched, g_batched) = outs
    torch.testing.assert_close(batched.candidate_losses, loop.candidate_losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_batched, g_loop, rtol=1e-6, atol=1e-12)


def test_batched_refuses_randomness_with_value_error():
    model, hyper, train, val = cnn_problem(dropout=0.5)
    with pytest.raises(ValueError, match="batch_candidates=True.*vmap"):
        hypergrad("evograd_batched", model, hyper, train, val)


def test_batched_leaves_eval_mode_batchnorm_working():
    model, hyper, train, val = cnn_problem()
    model.eval()
    torch.testing.assert_close(hypergrad("evograd_batched", model, hyper, train, val),
                               hypergrad("evograd", model, hyper, train, val), rtol=1e-6, atol=1e-9)


def test_noise_device_draws_there_and_moves():
    like = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5)]
    here = CandidateNoise([11, 12], 0.1, "gaussian").sample(1, like)
    via_cpu = CandidateNoise([11, 12], 0.1, "gaussian", device="cpu").sample(1, like)
    for a, b, ref in zip(here, via_cpu, like):
        assert b.device == ref.device and b.dtype == ref.dtype and b.shape == ref.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model, hyper, train, val = cnn_problem()
    for method in ("evograd", "evograd_batched", "evograd_low_memory"):
        torch.testing.assert_close(hypergrad(method, model, hyper, train, val, noise_device="cpu"),
                                   hypergrad(method, model, hyper, train, val), rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise_device"):
        hypergrad("evograd", model, hyper, train, val, noise_device="not-a-device")


@pytest.mark.parametrize("method", ["evograd", "evograd_batched", "evograd_low_memory"])
def test_non_finite_candidate_loss_still_raises_naming_it(method):
    theta, _, _, lam, _, val = quadratic_problem()

    def train(p):   # finite at θ, inf at every perturbed θ_k
        return (lam * p["theta"]).sum() * torch.where((p["theta"] != theta).any(), torch.inf, 1.0)
    with pytest.raises(ValueError, match=r"train_loss_fn \(candidate 0\) returned a non-finite loss"):
        meta_backward(method, {"theta": theta}, [lam], train, val, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="val_loss_fn returned a non-finite"):
        meta_backward(method, {"theta": theta}, [lam], lambda p: (lam * p["theta"]).sum(),
                      lambda p: p["theta"].sum() / 0.0, generator=torch.Generator().manual_seed(0))


class HostReads:
    """Counts the calls that read a tensor's value on the host (each one a sync on a GPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        self.finite_checks = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)
        check = evograd_module.check_finite_losses

        def counted_check(*args, **kwargs):
            self.finite_checks += 1
            return check(*args, **kwargs)
        monkeypatch.setattr(evograd_module, "check_finite_losses", counted_check)


def reads_per_step(monkeypatch, method: str, k: int, **options) -> tuple[int, int]:
    model, hyper, train, val = cnn_problem(dtype=torch.float32)
    hypergrad(method, model, hyper, train, val, k, **options)   # warm-up outside the count
    with monkeypatch.context() as patch:
        reads = HostReads(patch)
        hypergrad(method, model, hyper, train, val, k, **options)
    return reads.count, reads.finite_checks


@pytest.mark.parametrize("method", ["evograd", "evograd_batched", "evograd_low_memory"])
def test_evograd_host_reads_once_per_step_not_per_candidate(monkeypatch, method):
    few, many = reads_per_step(monkeypatch, method, 2), reads_per_step(monkeypatch, method, 8)
    assert few == many                       # nothing scales with K
    reads, checks = few
    assert checks == 1                       # one finiteness check per meta step
    # the seeds' tolist (a CPU generator here), the check's bool, meta_backward's float: 3 reads
    assert reads <= 3


@pytest.mark.parametrize("method", sorted(set(ESTIMATORS) - {"evograd", "evograd_batched", "evograd_low_memory"}))
def test_other_estimators_read_the_host_a_fixed_number_of_times(monkeypatch, method):
    # cg without its early stop (cg_tol = 0); its early stop reads one boolean per CG step (below)
    options = {"cg_tol": 0.0} if method == "cg" else {}
    reads, _ = reads_per_step(monkeypatch, method, 2, **options)
    assert reads <= 4, f"{method} reads tensor values on the host {reads} times per meta step"


def test_cg_early_stop_reads_one_boolean_per_step(monkeypatch):
    without, _ = reads_per_step(monkeypatch, "cg", 2, cg_tol=0.0, cg_iters=6)
    assert reads_per_step(monkeypatch, "cg", 2, cg_tol=0.0, cg_iters=2)[0] == without  # none per CG step
    # a tolerance never met: the solve runs until its 6 steps or the CNN's first non-positive curvature
    # (then one more read stops it); the old solve read 4 values per step
    with_stop, _ = reads_per_step(monkeypatch, "cg", 2, cg_tol=1e-30, cg_iters=6)
    assert 1 <= with_stop - without <= 6


def test_mwn_weight_normalisation_without_host_read_keeps_the_zero_sum_rule():
    from label_noise_mwn.models import normalize_over_batch
    raw = torch.tensor([0.5, 1.5, 2.0], requires_grad=True)
    torch.testing.assert_close(normalize_over_batch(raw), raw.detach() / 4.0)
    zeros = torch.zeros(3, requires_grad=True)
    out = normalize_over_batch(zeros)
    out.sum().backward()
    torch.testing.assert_close(out, torch.zeros(3))     # unchanged when the sum is exactly zero
    assert torch.isfinite(zeros.grad).all()
