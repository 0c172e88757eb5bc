"""CUDA correctness: noise regeneration, reproducibility, CPU agreement, no host syncs in a meta step.

Every test here needs a CUDA device and is skipped without one.
"""
import warnings

import pytest
import torch

import common.estimators as estimators_module
import common.evograd as evograd_module
import common.implicit as implicit_module
from common.estimators import finite_difference_hypergrad, multistep_meta_loss
from common.evograd import (CandidateNoise, evograd_hypergrad_low_memory, evograd_meta_loss, merge_candidates,
                            perturbable_params)
from common.hypergrad import ESTIMATORS
from common.implicit import implicit_hypergrad, sama_hypergrad
from common.second_order import second_order_meta_loss, second_order_meta_loss_func
from test_batched import cnn_problem, hypergrad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in convolutions and matmuls, so float32 on CUDA is float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_noise_regenerated_on_cuda_is_the_same_in_merge_forward_and_backward():
    g = torch.Generator(device=CUDA).manual_seed(0)
    params = {"a": torch.randn(1000, 7, device=CUDA, generator=g), "b": torch.randn(33, device=CUDA, generator=g)}
    noise = CandidateNoise([5, 6, 7], 0.01, "sign")
    first, again = noise.sample(1, params.values()), noise.sample(1, params.values())
    for x, y in zip(first, again):
        assert x.device.type == "cuda"
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    weights = torch.tensor([0.2, 0.5, 0.3], device=CUDA, requires_grad=True)
    merged = merge_candidates(params, weights, noise)
    eps = [noise.sample(k, params.values()) for k in range(3)]
    for i, name in enumerate(params):   # forward: θ* − θ = Σ_k w_k ε_k
        expected = sum(weights[k].detach() * eps[k][i] for k in range(3))
        torch.testing.assert_close(merged[name] - params[name], expected, rtol=1e-5, atol=1e-7)
    upstream = [torch.randn_like(p) for p in params.values()]
    sum((m * u).sum() for m, u in zip(merged.values(), upstream)).backward()
    expected_dw = torch.stack([sum((u * e).sum() for u, e in zip(upstream, eps[k])) for k in range(3)])
    torch.testing.assert_close(weights.grad, expected_dw, rtol=1e-5, atol=1e-5)   # backward: <∂L/∂θ*, ε_k>


@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_cuda_run_is_reproducible_with_a_seeded_generator(generator_device):
    model, hyper, train, val = cnn_problem(dtype=torch.float32, device=CUDA)
    grads = []
    for _ in range(2):
        for h in hyper:
            h.grad = None
        evograd_meta_loss(perturbable_params(model), train, val, n_candidates=4, sigma=1e-2,
                          generator=torch.Generator(device=generator_device).manual_seed(3)).backward()
        grads.append([h.grad.clone() for h in hyper])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("k", [2, 5])
def test_low_memory_and_batched_paths_equal_plain_path_on_cuda(k):
    model, hyper, train, val = cnn_problem(dtype=torch.float32, device=CUDA)
    plain = hypergrad("evograd", model, hyper, train, val, k)
    for method in ("evograd_low_memory", "evograd_batched"):
        for a, b in zip(hypergrad(method, model, hyper, train, val, k), plain):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_every_estimator_on_cuda_agrees_with_cpu_with_noise_drawn_on_cpu(method):
    options = {"noise_device": "cpu", "inner_steps": 2, "window": 2}
    results = []
    for device in ("cpu", CUDA):
        model, hyper, train, val = cnn_problem(dtype=torch.float32, device=device)
        results.append([g.cpu() for g in hypergrad(method, model, hyper, train, val, 3, **options)])
    for on_cpu, on_cuda in zip(*results):
        assert on_cpu.abs().max() > 0
        assert (on_cuda - on_cpu).norm() <= 1e-3 * on_cpu.norm(), method


def host_syncs(step) -> int:
    """Number of synchronising CUDA calls ``step()`` makes (``torch.cuda.set_sync_debug_mode("warn")``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()   # not counted: outside the mode below
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_host_syncs_per_meta_step_do_not_grow_with_k(method):
    model, hyper, train, val = cnn_problem(dtype=torch.float32, device=CUDA)
    hypergrad(method, model, hyper, train, val, 2)   # warm-up (cuDNN, allocator)
    counts = [host_syncs(lambda k=k: hypergrad(method, model, hyper, train, val, k)) for k in (2, 8)]
    assert counts[0] == counts[1], counts
    assert counts[0] <= 3, counts   # the finiteness check, the returned float, at most one more


def one_step(method: str, params, hyper, train, val):
    """The estimator's computation without ``meta_backward``'s final ``.item()``."""
    generator = torch.Generator().manual_seed(0)   # seeds drawn on the CPU: no device read
    if method in ("evograd", "evograd_batched"):
        evograd_meta_loss(params, train, val, n_candidates=4, generator=generator,
                          batch_candidates=method == "evograd_batched").backward(inputs=hyper)
    elif method == "evograd_low_memory":
        evograd_hypergrad_low_memory(params, hyper, train, val, n_candidates=4, generator=generator)
    elif method == "finite_difference":
        finite_difference_hypergrad(params, hyper, train, val, inner_lr=0.1)
    elif method == "multistep":
        multistep_meta_loss(params, train, val, inner_lr=0.1, inner_steps=2, window=2).backward(inputs=hyper)
    elif method == "second_order_func":
        second_order_meta_loss_func(params, train, val, inner_lr=0.1).backward(inputs=hyper)
    elif method in ("cg", "neumann"):   # cg without its early stop, which reads one boolean per step
        implicit_hypergrad(params, hyper, train, val, solver=method, cg_tol=0.0, inner_lr=0.1)
    elif method == "sama":
        sama_hypergrad(params, hyper, train, val, inner_lr=0.1)
    elif method in ("second_order", "unrolled"):
        second_order_meta_loss(params, train, val, inner_lr=0.1, inner_steps=2).backward(inputs=hyper)
    else:
        raise AssertionError(f"one_step does not know {method!r}: add it")


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_no_sync_in_a_meta_step_but_the_finiteness_check(method, monkeypatch):
    model, hyper, train, val = cnn_problem(dtype=torch.float32, device=CUDA)
    params = perturbable_params(model)
    one_step(method, params, hyper, train, val)   # warm-up
    check = evograd_module.check_finite_losses

    def allowed_check(*args, **kwargs):   # the one host read a step is allowed
        torch.cuda.set_sync_debug_mode("default")
        try:
            return check(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    for module in (evograd_module, estimators_module, implicit_module):
        monkeypatch.setattr(module, "check_finite_losses", allowed_check)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_step(method, params, hyper, train, val)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_full_precision_turns_cuda_autocast_off(amp):
    """``full_precision()`` must leave CUDA autocast too, not only the CPU's: EvoGrad's candidate passes and
    SAMA's differences run in float32 inside it; ``full_precision(False)`` and the code after it keep autocast."""
    from common.precision import AMP_DTYPES, autocast, full_precision
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8).to(CUDA)
    x = torch.randn(4, 16, device=CUDA)
    exact = layer(x)
    with autocast(amp, CUDA):
        assert torch.is_autocast_enabled("cuda") and layer(x).dtype == AMP_DTYPES[amp]
        with full_precision():
            assert not torch.is_autocast_enabled("cuda")
            inside = layer(x)
        with full_precision(enabled=False):
            assert layer(x).dtype == AMP_DTYPES[amp]
        assert layer(x).dtype == AMP_DTYPES[amp]
    assert inside.dtype == torch.float32 and torch.equal(inside, exact)


def test_evograd_candidates_run_in_float32_under_cuda_autocast():
    """Under CUDA bf16 autocast EvoGrad's K candidate losses are the float32 ones (same noise), not bfloat16's."""
    from common.precision import autocast
    model, _, train, val = cnn_problem(dtype=torch.float32, device=CUDA)
    params = perturbable_params(model)
    losses = {}
    for amp in ("none", "bf16"):
        with autocast(amp, CUDA):
            out = evograd_meta_loss(params, train, val, n_candidates=4, sigma=1e-3, temperature=0.05,
                                    generator=torch.Generator().manual_seed(3), noise_device="cpu",
                                    return_diagnostics=True)
        losses[amp] = out.candidate_losses
    torch.testing.assert_close(losses["bf16"], losses["none"], rtol=1e-6, atol=0)
