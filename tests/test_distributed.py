"""Hypergradients under torch.distributed: 2 gloo ranks × half batch == 1 process × whole batch.

One ``torch.multiprocessing.spawn`` of 2 CPU processes runs every check: each process first computes
the single-process whole-batch references (no process group yet), then joins the group, takes its
half of every batch and must reproduce them on both ranks, for every estimator in
``common.hypergrad.ESTIMATORS`` (so estimators added later are checked too) and for the direct
``*_meta_loss(...).backward()`` calls. A failure in a child fails the test with the child's
traceback; the group has a timeout, so a rank that waits for a dead peer cannot hang the suite.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from common.distributed import (all_ranks_loss, average_gradients, is_distributed, rank,
                                rng_states_of_every_rank, shard)
from common.estimators import multistep_meta_loss
from common.evograd import _prepare, evograd_meta_loss, functional_forward, perturbable_params
from common.hypergrad import ESTIMATORS, meta_backward
from common.second_order import second_order_meta_loss, second_order_meta_loss_func

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
BATCH = 8          # whole batch; each rank takes BATCH / WORLD
SEED = 7           # the generator seed of the single process and of rank 0
OPTIONS = dict(n_candidates=3, sigma=1e-2, temperature=0.05, noise="sign", inner_lr=0.3, inner_steps=2,
               window=2, fd_epsilon=1e-3)
DIRECT = {  # differentiable meta losses called as ``fn(params, train, val, **options).backward()``
    "evograd_meta_loss": (evograd_meta_loss, ("n_candidates", "sigma", "temperature", "noise", "generator")),
    "evograd_meta_loss_diagnostics": (evograd_meta_loss, ("n_candidates", "sigma", "temperature", "noise", "generator",
                                                          "return_diagnostics")),
    "second_order_meta_loss": (second_order_meta_loss, ("inner_lr", "inner_steps")),
    "second_order_meta_loss_func": (second_order_meta_loss_func, ("inner_lr", "inner_steps")),
    "multistep_meta_loss": (multistep_meta_loss, ("inner_lr", "inner_steps", "window")),
}


class SmallCNN(nn.Module):
    """conv-relu-pool-conv-relu-linear on 1×8×8 images; a feature-wise scale/shift after the first conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(16, 3)

    def forward(self, x, film_scale=None, film_shift=None):
        h = self.conv1(x)
        if film_scale is not None:
            h = h * (1 + film_scale.view(1, -1, 1, 1)) + film_shift.view(1, -1, 1, 1)
        h = F.avg_pool2d(torch.tanh(h), 2)
        return self.head(torch.tanh(self.conv2(h)).flatten(1))


def problem(kind: str, rank: int | None):
    """(params, hyperparams, train_loss_fn, val_loss_fn) with λ on the loss, the input or inside the net.

    ``rank`` None: the whole batch; else that rank's half. Same model and data on every process.
    """
    torch.manual_seed(0)
    model = SmallCNN().double()
    g = torch.Generator().manual_seed(1)
    x, xv = (torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randint(0, 3, (BATCH,), generator=g) for _ in range(2))
    if rank is not None:
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        x, y, xv, yv = x[part], y[part], xv[part], yv[part]
    lam = {"loss": torch.tensor([0.3, -0.2, 0.1]), "input": torch.tensor([0.2, -0.1]),
           "inside": torch.tensor([0.1, -0.2, 0.3, 0.05, -0.1, 0.2, 0.0, 0.1])}[kind]
    lam = lam.double().requires_grad_()

    def train(p):
        if kind == "loss":
            per_example = F.cross_entropy(functional_forward(model, p, x), y, reduction="none")
            return (F.softplus(lam)[y] * per_example).mean()
        if kind == "input":
            return F.cross_entropy(functional_forward(model, p, x * (1 + lam[0]) + lam[1]), y)
        return F.cross_entropy(functional_forward(model, p, x, lam[:4], lam[4:]), y)

    def val(p):
        return F.cross_entropy(functional_forward(model, p, xv), yv)

    return perturbable_params(model), [lam], train, val


def run_case(kind: str, name: str, rank: int | None, seed: int, problem_of=None) -> tuple[torch.Tensor, float]:
    """λ's hypergradient and the validation loss of estimator (or direct meta loss) ``name``
    (accumulated into the λ of ``problem_of`` if given, a fresh problem's otherwise)."""
    params, hyper, train, val = problem_of or problem(kind, rank)
    generator = torch.Generator().manual_seed(seed)
    if name in DIRECT:
        fn, accepted = DIRECT[name]
        options = {k: v for k, v in {**OPTIONS, "generator": generator, "return_diagnostics": True}.items()
                   if k in accepted}
        loss = fn(params, train, val, **options)
        loss = loss.val_loss if isinstance(loss, tuple) else loss
        loss.backward()
        value = loss.item()
    else:
        value = meta_backward(name, params, hyper, train, val, generator=generator, **OPTIONS)
    return hyper[0].grad.detach().clone(), value


CASES = [(kind, name) for kind in ("loss", "input", "inside") for name in [*ESTIMATORS, *DIRECT]]


def worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    reference = {case: run_case(*case, rank=None, seed=SEED) for case in CASES}
    two_steps_reference = {name: two_meta_steps(name, rank=None)[0] for name in [*ESTIMATORS, *DIRECT]}
    vmapped_reference = vmapped_candidates(rank=None)
    shard_alone = {case: run_case(*case, rank=rank, seed=SEED) for case in CASES}

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert is_distributed()
        # EvoGrad noise: rank 1's generator starts in another state, yet both ranks get rank 0's seeds.
        other = torch.Generator().manual_seed(SEED if rank == 0 else SEED + 1000)
        seeds = _prepare({"w": torch.zeros(2)}, 3, 1e-3, 0.05, "sign", other)[1].seeds
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, seeds)
        alone = torch.randint(0, 2**62, (3,), generator=torch.Generator().manual_seed(SEED)).tolist()
        assert gathered[0] == gathered[1] == alone, f"noise seeds differ across ranks: {gathered} vs {alone}"

        failures = []
        for case in CASES:
            seed = SEED if rank == 0 else SEED + 1000  # EvoGrad must not depend on rank 1's generator
            grad, value = run_case(*case, rank=rank, seed=seed)
            ref_grad, ref_value = reference[case]
            scale = ref_grad.abs().max().item()
            error = (grad - ref_grad).abs().max().item() / scale
            alone_error = (shard_alone[case][0] - ref_grad).abs().max().item() / scale
            both = [torch.zeros_like(grad) for _ in range(WORLD)]
            dist.all_gather(both, grad)
            if not (scale > 0 and error < 1e-6 and abs(value - ref_value) < 1e-9 * max(1.0, abs(ref_value))
                    and torch.equal(both[0], both[1]) and alone_error > 1e-3):
                failures.append(f"{case}: rel. error {error:.2e} (half batch alone {alone_error:.2e}), "
                                f"val loss {value} vs {ref_value}, ranks equal {torch.equal(both[0], both[1])}")
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)
        check_two_meta_steps_leave_no_hook(two_steps_reference)
        check_evograd_communication()
        check_model_gradients_averaged()
        for got, ref in zip(vmapped_candidates(rank), vmapped_reference):
            assert torch.allclose(got, ref, rtol=1e-10, atol=1e-14), "vmap over candidates differs from one process"
    finally:
        dist.destroy_process_group()


def two_meta_steps(name: str, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """λ's gradient after two consecutive meta steps of ``name`` on the same λ leaf (the second
    accumulates into the first, other noise), and λ itself."""
    case = problem("inside", rank)
    for step in range(2):
        grad, _ = run_case("inside", name, rank, SEED + step if rank in (None, 0) else SEED + 1000 + step, case)
    return grad, case[1][0]


def check_two_meta_steps_leave_no_hook(reference: dict[str, torch.Tensor]) -> None:
    """Consecutive data-parallel meta steps on one λ equal one process's, and no hook on λ outlives them
    (a hook left behind would sum λ's gradient over the ranks once more in every later step)."""
    from common import distributed
    failures = []
    for name, ref in reference.items():
        grad, lam = two_meta_steps(name, dist.get_rank())
        error = (grad - ref).abs().max().item() / ref.abs().max().item()
        if not error < 1e-9 or distributed._leaf_hooks or lam._backward_hooks:
            failures.append(f"{name}: rel. error {error:.2e}, hooks left {len(distributed._leaf_hooks)} "
                            f"registered, {len(lam._backward_hooks or {})} on λ")
    assert not failures, f"rank {dist.get_rank()}, two meta steps:\n" + "\n".join(failures)


def vmapped_candidates(rank: int | None) -> list[torch.Tensor]:
    """K candidate losses and their θ-gradients through ``torch.func.vmap`` of the data-parallel loss."""
    params, _, train, _ = problem("inside", rank)
    loss = all_ranks_loss(train) if rank is not None else train
    g = torch.Generator().manual_seed(5)
    candidates = {n: p + 1e-2 * torch.randn((3, *p.shape), generator=g, dtype=p.dtype) for n, p in params.items()}
    losses = torch.func.vmap(loss)(candidates)
    grads = torch.func.vmap(torch.func.grad(loss))({n: c.requires_grad_() for n, c in candidates.items()})
    return [losses.detach(), *grads.values()]


def check_evograd_communication() -> None:
    """EvoGrad sends seeds, K + 1 losses, K dot products and λ's gradient: nothing of θ's size."""
    sizes, all_reduce, broadcast = [], dist.all_reduce, dist.broadcast

    def count(collective):
        def counted(tensor, *args, **kwargs):
            sizes.append(tensor.numel() * tensor.element_size())
            return collective(tensor, *args, **kwargs)
        return counted

    dist.all_reduce, dist.broadcast = count(all_reduce), count(broadcast)
    try:
        params, hyper, train, val = problem("inside", dist.get_rank())
        meta_backward("evograd", params, hyper, train, val, **OPTIONS)
    finally:
        dist.all_reduce, dist.broadcast = all_reduce, broadcast
    k, lam = OPTIONS["n_candidates"], hyper[0].numel()
    expected = [8 * k] + [8] * (k + 1) + [8 * k, 8 * lam]  # float64 losses and λ
    assert sizes == expected, f"EvoGrad collectives (bytes) {sizes}, expected {expected}"


def check_model_gradients_averaged() -> None:
    """``shard`` + ``average_gradients``: the base model's gradient of the whole batch on every rank."""
    torch.manual_seed(0)
    model = SmallCNN().double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)
    whole = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    idx = shard(torch.arange(BATCH))
    assert len(idx) == BATCH // WORLD and idx[0].item() == rank() * BATCH // WORLD
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    average_gradients(model)
    for p, ref in zip(model.parameters(), whole):
        assert torch.allclose(p.grad, ref, rtol=1e-10, atol=1e-12), "averaged model gradients differ from one process's"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_half_batch_match_one_process_whole_batch():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # raises with the child's traceback if a child fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the distributed workers did not finish within 300 s")


def test_without_process_group_estimators_get_the_callers_own_losses(monkeypatch):
    """No process group: no loss wrapper, no leaf hook, no collective, for every estimator."""
    import common.distributed as distributed

    def fail(*args, **kwargs):
        raise AssertionError("data-parallel machinery used without a process group")

    for name in ("all_ranks_loss", "_AllRanksSum", "_MetaStep"):
        monkeypatch.setattr(distributed, name, fail)
    assert not is_distributed()
    for kind, name in CASES:
        grad, _ = run_case(kind, name, rank=None, seed=SEED)
        assert torch.isfinite(grad).all() and grad.abs().max() > 0
    assert not distributed._leaf_hooks


def torchrun(*args: str, out) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m rotation.train ...`` on CPU (gloo), with a timeout."""
    env = {**os.environ, "EVOGRAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "rotation.train", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_torchrun_rotation_two_processes_write_one_results_file(tmp_path):
    proc = torchrun("--epochs", "1", "--batch-size", "512", "--method", "evograd", out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["rotation_mnist5k-quick_evograd_seed1.json"], files
    record = json.loads((tmp_path / files[0]).read_text())
    assert record["config"]["processes"] == WORLD
    assert len(record["metrics"]["angles_deg"]) == math.ceil(2857 / 512) and record["metrics"]["angle_deg"] != 0.0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["rotation_mnist5k-quick_evograd_seed1.pt"]
    assert proc.stdout.count("evograd seed 1: rotated test") == 1, proc.stdout  # only rank 0 prints


def test_torchrun_bad_batch_size_stops_every_rank_with_one_line(tmp_path):
    proc = torchrun("--epochs", "1", "--batch-size", "2856", "--method", "evograd", out=tmp_path)  # 2857 % 2856 = 1
    assert proc.returncode != 0
    assert "error: --batch-size 2856 gives a training batch of 1 item(s), fewer than the 2 processes" in proc.stderr, \
        proc.stderr
    assert not list(tmp_path.glob("*.json"))


def test_rng_states_of_every_rank_reads_the_generator_asked_for():
    """Without a process group: [this process's state], of the CPU generator or of the one named (MetaXL on a GPU
    passes torch.cuda.get_rng_state)."""
    torch.manual_seed(3)
    (state,) = rng_states_of_every_rank()
    assert torch.equal(state, torch.get_rng_state())
    assert [s.tolist() for s in rng_states_of_every_rank(lambda: torch.tensor([7, 8]))] == [[7, 8]]
