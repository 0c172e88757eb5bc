"""Experiments under ``torchrun`` on CPU (gloo, 2 processes): one results file per run, resume after a
kill, every rank stopping together, ``--sync-bn``.

Each run is ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m <experiment>.train``
with the experiment's smallest configuration (the resume-contract test's), in a subprocess with a
timeout, so a rank waiting for a dead peer cannot hang the suite.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import bench
from common.distributed import process_group, sync_batchnorm
from common.runtime import run_cli

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
ENV = {**os.environ, "EVOGRAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

MWN = ["--quick", "--train_size", "60", "--num_meta", "20", "--batch_size", "20", "--meta_batch_size", "10",
       "--device", "cpu", "--seed", "3", "--threads", "1", "--methods", "mwn_evograd"]
FEWSHOT = ["--width", "4", "--image-size", "16", "--n-shot", "1", "--n-query", "2", "--epochs", "1",
           "--episodes-per-epoch", "2", "--val-episodes", "2", "--test-episodes", "5", "--test-queries", "2",
           "--aux-batch", "4", "--seed", "3", "--threads", "1", "--pretrain-epochs", "1", "--pretrain-batch", "16",
           "--device", "cpu", "--methods", "lft_evograd"]
METAXL = ["--model", "tiny", "--train_size", "24", "--target_train_size", "12", "--epochs", "1", "--batch_size", "6",
          "--lr", "1e-3", "--meta_lr", "1e-3", "--bottle_size", "8", "--max_seq_length", "32",
          "--eval_max_seq_length", "32", "--transfer_layer", "4", "--targets", "qu", "--seed", "3", "--no_figures",
          "--device", "cpu", "--methods", "metaxl_evograd"]


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), *args]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(*args), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


@pytest.mark.parametrize("module, argv, expected", [  # MWN: in the resume test below
    ("cross_domain_fewshot.train", FEWSHOT, ["cross_domain_fewshot_*_lft_evograd_seed3.json",
                                             "cross_domain_fewshot_*_pretrain_linear_seed3.json"]),
    ("metaxl.train", METAXL, ["metaxl_*_metaxl_evograd_seed3.json"]),
])
def test_two_processes_write_exactly_one_results_file_per_run(tmp_path, module, argv, expected):
    proc = torchrun("-m", module, *argv, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for pattern in expected:
        files = list(tmp_path.glob(pattern))
        assert len(files) == 1, (pattern, sorted(p.name for p in tmp_path.iterdir()))
        record = json.loads(files[0].read_text())
        assert record["metrics"] and record["seed"] == 3 and record["config"]["processes"] == WORLD
    assert len(list(tmp_path.glob("*.json"))) == len(expected)


def test_mwn_killed_under_torchrun_resumes_to_the_uninterrupted_results(tmp_path):
    argv = [*MWN, "--epochs", "3", "--milestones", "2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = torchrun("-m", "label_noise_mwn.train", *argv, "--out", str(whole))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in whole.glob("*.json")]  # exactly one results file
    assert record["method"] == "mwn_evograd" and record["config"]["processes"] == WORLD
    assert proc.stderr.count("[mwn_evograd seed 3] epoch 1/3") == 1, proc.stderr  # rank 0 alone prints

    # stop torchrun as soon as the first epoch's checkpoint appears: SIGTERM, which torchrun passes on
    # to its workers (they run in sessions of their own: a SIGKILL of torchrun's group leaves them running)
    run = subprocess.Popen(torchrun_command("-m", "label_noise_mwn.train", *argv, "--out", str(resumed)),
                           cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    checkpoints = resumed / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while not (checkpoints.is_dir() and any(checkpoints.glob("*.pt"))):
            assert run.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=120)
    time.sleep(1)  # no worker may survive torchrun to write results
    assert not list(resumed.glob("*.json")), "killed too late: the run had finished"

    proc = torchrun("-m", "label_noise_mwn.train", *argv, "--out", str(resumed), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resuming after epoch") == 1, proc.stderr  # rank 0 alone prints it
    [want], [got] = list(whole.glob("*.json")), list(resumed.glob("*.json"))
    want, got = json.loads(want.read_text())["metrics"], json.loads(got.read_text())["metrics"]
    assert got["test_epoch_per_epoch"] == [1, 2, 3]
    # bit for bit: the generators are in the checkpoint, and no rank draws from torch's global one while
    # training (tests/test_resume_contract.py), so rank 0's copy of it restored on every rank changes nothing
    epoch_s = ("epoch_s_per_epoch",)  # wall-clock seconds differ
    assert {k: v for k, v in got.items() if k not in epoch_s} == {k: v for k, v in want.items() if k not in epoch_s}


FAILING_RANK = """
from common.distributed import on_every_rank, process_group, rank
from common.runtime import NonFiniteLossError, run_cli
import torch

def check():
    if rank() == 1:
        raise NonFiniteLossError("rank 1 diverged at step 1")

def main(argv):
    with process_group(torch.device("cpu")):
        on_every_rank(check)
        torch.distributed.barrier()  # rank 0 would wait here forever if it went on alone

run_cli(main)
"""


def test_a_rank_that_fails_stops_every_rank_with_one_line(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    start = time.monotonic()
    proc = subprocess.run(torchrun_command(str(script)), capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode != 0
    assert "error: rank 1 diverged at step 1" in proc.stderr, proc.stderr
    assert "error: process 0 stopped because another process failed" in proc.stderr, proc.stderr
    assert "exitcode: 2" in proc.stderr  # rank 0 exited with the one-line error, not killed by torchrun
    assert time.monotonic() - start < 100


PROCESS_GROUP = """
import sys
import torch
from common.distributed import process_group, world_size
from common.runtime import finished_runs

with process_group(torch.device("cpu")) as device:
    assert device == torch.device("cpu") and torch.distributed.is_initialized() and world_size() == 2
    assert finished_runs([sys.argv[1]], resume=True, overwrite=False)
assert not torch.distributed.is_initialized()
print("left the group", flush=True)
"""


def test_process_group_joins_and_leaves_and_skips_are_printed_once(tmp_path):
    script, done = tmp_path / "process_group.py", tmp_path / "finished.json"
    script.write_text(PROCESS_GROUP)
    done.write_text("{}")
    proc = subprocess.run(torchrun_command(str(script), str(done)), capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("left the group") == WORLD, proc.stdout
    assert proc.stderr.count("skipping finished run") == 1, proc.stderr  # rank 0 only


def test_process_group_outside_torchrun_is_the_given_device_and_leaves_on_error():
    with process_group(torch.device("cpu")) as device:
        assert device == torch.device("cpu") and not torch.distributed.is_initialized()
    with pytest.raises(KeyError), process_group(torch.device("cpu")):
        raise KeyError("raised inside")


def test_sync_batchnorm_converts_plain_batchnorm_layers_and_is_refused_on_cpu():
    from cross_domain_fewshot.models import FeatureWiseBatchNorm2d, build_model
    model = build_model("ResNet10", "relationnet_softmax", 16, 4)
    plain = [m for m in model.modules() if type(m) is torch.nn.BatchNorm2d]
    featurewise = [m for m in model.modules() if isinstance(m, FeatureWiseBatchNorm2d)]
    assert plain and featurewise
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = sync_batchnorm(model, torch.device("cuda"))  # converting needs no GPU; running does
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == len(plain)
    assert sum(isinstance(m, FeatureWiseBatchNorm2d) for m in converted.modules()) == len(featurewise)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    after = converted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="CUDA only"):
        sync_batchnorm(torch.nn.BatchNorm1d(3), torch.device("cpu"))


@pytest.mark.parametrize("module, argv", [("label_noise_mwn.train", [*MWN, "--epochs", "1"]),
                                          ("cross_domain_fewshot.train", FEWSHOT)])
def test_sync_bn_on_cpu_is_a_one_line_error(tmp_path, capsys, module, argv):
    with pytest.raises(SystemExit) as stop:
        run_cli(importlib.import_module(module).main, [*argv, "--sync-bn", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --sync-bn needs CUDA (PyTorch's SyncBatchNorm does not run on CPU); leave it out"]
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="SyncBatchNorm across 2 processes needs 2 GPUs")
def test_sync_bn_runs_on_two_gpus(tmp_path):
    argv = [a if a != "cpu" else "cuda" for a in [*MWN, "--epochs", "1"]]
    proc = torchrun("-m", "label_noise_mwn.train", *argv, "--sync-bn", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_bench_nproc_times_two_processes_on_halves_of_the_batch(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "common.bench", "rotation", "--quick", "--methods", "evograd",
                           "--nproc", "2", "--reps", "2", "--warmup", "0", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r.get("error") for r in rows] == [None], rows
    assert [(r["processes"], r["batch_per_rank"]) for r in rows] == [(2, 8)]
    for r in rows:
        assert r["time_s"] > 0 and len(r["peak_mem_mb_per_rank"]) == r["processes"]
        assert all(mb > 0 for mb in r["peak_total_mb_per_rank"])
    assert "| evograd | 2 | 8 |" in proc.stdout


def test_bench_nproc_tries_a_failed_launch_once_more_and_says_so(monkeypatch):
    class Done:
        def __init__(self, code, out="", err=""):
            self.returncode, self.stdout, self.stderr = code, out, err
    row = json.dumps({"processes": 2, "batch_per_rank": 8, "time_s": 0.1})
    for outcomes, want in [
        ([Done(1, err="error: port taken"), Done(0, out=row)], {"time_s": 0.1, "retried_after": "error: port taken"}),
        ([Done(1, err="error: port taken"), Done(1, err="ValueError: bad")],
         {"time_s": None, "error": "ValueError: bad", "retried_after": "error: port taken"}),
        ([Done(0, out=row)], {"time_s": 0.1}),
    ]:
        calls = iter(outcomes)
        monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: next(calls))
        got = bench.measure_data_parallel("rotation", {"batch": 16}, "evograd", 2, torch.device("cpu"), 0, 1)
        assert {k: got.get(k) for k in want} == want and ("retried_after" in got) == ("retried_after" in want)
        assert next(calls, None) is None   # no launch beyond the second


def test_bench_nproc_that_does_not_divide_the_batch_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(bench.main, ["rotation", "--quick", "--nproc", "3", "--device", "cpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --nproc [3]: rotation's batch 16 does not split evenly over 3 processes; choose --nproc values "
        "that divide it"]


MWN_SHARDED_HYPERGRADIENT = """
import torch
import torch.nn.functional as F
from common.distributed import close_data_parallel, init_data_parallel, mean_over_ranks, rank, shard
from common.evograd import functional_forward, perturbable_params
from common.hypergrad import meta_backward
from label_noise_mwn.models import VNet, weighted_loss
from metaxl.model import token_loss

torch.set_default_dtype(torch.float64)
METHODS = ("evograd", "second_order", "finite_difference")


def vnet_hypergradient(method, x, y, meta_x, meta_y):
    torch.manual_seed(0)
    model, vnet = torch.nn.Linear(5, 3), VNet(8)
    def train_loss(p):
        return weighted_loss(vnet, F.cross_entropy(functional_forward(model, p, x), y, reduction="none"))
    def val_loss(p):
        return F.cross_entropy(functional_forward(model, p, meta_x), meta_y)
    meta_backward(method, perturbable_params(model), list(vnet.parameters()), train_loss, val_loss, inner_lr=0.5,
                  n_candidates=3, sigma=0.05, temperature=0.05, noise="sign", fd_epsilon=1e-4,
                  generator=torch.Generator().manual_seed(1))
    return torch.cat([p.grad.flatten() for p in vnet.parameters()])


g = torch.Generator().manual_seed(0)
batch = (torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g),
         torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
whole = {m: vnet_hypergradient(m, *batch) for m in METHODS}   # one process, the whole batch
# MetaXL's token loss: rows with different numbers of labelled sub-tokens (-100: not labelled)
logits = torch.randn(4, 6, 5, generator=g, requires_grad=True)
labels = torch.randint(0, 5, (4, 6), generator=g)
labels[:2, 1:] = -100                            # rank 0's rows: 2 labelled tokens, rank 1's: 12
whole_token_loss = token_loss(logits, labels)
whole_logits_grad, = torch.autograd.grad(whole_token_loss, logits)
init_data_parallel(torch.device("cpu"))
try:
    for m in METHODS:
        sharded = vnet_hypergradient(m, *(shard(t) for t in batch))
        error = ((sharded - whole[m]).norm() / whole[m].norm()).item()
        assert whole[m].norm() > 0 and error < 1e-6, (m, error)
        print(m, "relative error", error)
    shared_token_loss = mean_over_ranks(token_loss(shard(logits), shard(labels)))
    assert torch.allclose(shared_token_loss, whole_token_loss, rtol=1e-12), (shared_token_loss, whole_token_loss)
    grad, = torch.autograd.grad(shared_token_loss, logits)   # each rank: the gradient of its own rows
    mine = whole_logits_grad.tensor_split(2)[rank()]
    assert torch.allclose(grad.tensor_split(2)[rank()], mine, rtol=1e-10, atol=1e-14)
    print("token_loss relative error", ((shared_token_loss - whole_token_loss) / whole_token_loss).abs().item())
finally:
    close_data_parallel()
"""


def test_sharded_mwn_and_metaxl_losses_give_the_whole_batch_values(tmp_path):
    """2 ranks × half batch == 1 × whole (float64): VNet's hypergradient (its weights normalised by the
    whole batch's sum) and MetaXL's token loss and its gradient (divided by the whole batch's count)."""
    script = tmp_path / "mwn_sharded.py"
    script.write_text(MWN_SHARDED_HYPERGRADIENT)
    proc = subprocess.run(torchrun_command(str(script)), capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("relative error") == 2 * 4, proc.stdout
