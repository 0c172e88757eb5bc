"""--fsdp together with --amp (common.precision on an FSDP2-sharded model), on 2 CPU (gloo) ranks.

The gradient scaler of --amp fp16 sees only this rank's shards of the gradient; its inf/NaN check
must agree over ranks, or one rank would skip a step that another takes. And a sharded meta step's
passes gather θ + δ for each δ into the same parameter objects inside the iteration's autocast, so
no forward may read a cast copy of θ made before the change.
"""
from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  imported before any group: see close_data_parallel
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from common.distributed import close_data_parallel
from common.fsdp import local_shard, shard_model, sharded_evograd_hypergrad
from common.precision import Precision, backward, optimizer_step, unscale_gradients
from test_distributed import free_port
from test_fsdp import MWN, WORLD, Net, data, finish, torchrun, whole_checkpoint


def scaler_worker(rank: int, port: int) -> None:
    """Three fp16 steps of a sharded model: an inf in rank 1's gradient shard alone (plain step, then unscaled
    and clipped first, as MetaXL does), then finite gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = Net()  # float32; block1.weight's 5 rows split 3 + 2
        shard_model(model, [model.block1, model.block2])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        precision = Precision("fp16", "cpu")
        precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # 2^16 overflows here by itself
        x = data(rank)[0].float()
        for poisoned, clipped in ((True, False), (True, True), (False, False)):
            before = [local_shard(p)[0].clone() for p in model.parameters()]
            scale = precision.scaler.get_scale()
            optimizer.zero_grad(set_to_none=True)
            with precision.iteration():
                backward(model(x).square().mean())
                if poisoned and rank == 1:
                    with torch.no_grad():
                        local_shard(model.block1.weight.grad)[0][0, 0] = float("inf")
                if clipped:
                    unscale_gradients(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer_step(optimizer)
            moved = [not torch.equal(local_shard(p)[0], b) for p, b in zip(model.parameters(), before)]
            if poisoned:  # every rank skips its step and halves the scale
                assert not any(moved) and precision.scaler.get_scale() == scale / 2, (rank, clipped, moved)
            else:  # every non-empty shard moves (rank 1's of shift.weight is empty), the scale stays
                sizes = [local_shard(p)[0].numel() for p in model.parameters()]
                assert all(m == (n > 0) for m, n in zip(moved, sizes)) and precision.scaler.get_scale() == scale
    finally:
        close_data_parallel()  # the group's gloo threads end here, not at interpreter exit


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_fp16_scaler_skips_a_step_on_every_rank_when_one_shard_is_not_finite():
    """The inf check on DTensor gradients is reduced over the mesh (torch's DTensor dispatch of
    ``_amp_foreach_non_finite_check_and_unscale_``): an inf in one rank's shard stops every rank's step."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(scaler_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_mwn_fsdp_under_bf16_equals_the_data_parallel_run(tmp_path):
    """--fsdp --amp bf16 and the replicated 2-process --amp bf16 run, side by side: after an epoch of 3
    finite-difference meta steps (θ perturbed, one δ after another, inside the iteration's autocast) the same
    losses, the same ResNet (parameters and BatchNorm statistics within 1e-5) and VNets apart by less than
    1e-3 of how far they moved (float32 rounding: the reduce-scatter and the all-reduce sum in other orders).
    With autocast's weight cache on, the sharded run's forwards after a perturbation read stale copies of θ."""
    from label_noise_mwn.mwn import init_models

    outs = {name: tmp_path / name for name in ("fsdp", "replicated")}
    argv = [*MWN, "--methods", "finite_difference", "--amp", "bf16"]
    finish(torchrun("label_noise_mwn.train", [*argv, "--fsdp"], outs["fsdp"]),
           torchrun("label_noise_mwn.train", argv, outs["replicated"]))
    want, got = (json.loads(next(out.glob("*.json")).read_text()) for out in (outs["replicated"], outs["fsdp"]))
    assert got["config"]["amp"] == want["config"]["amp"] == "bf16" and got["config"]["fsdp"] is True
    for key in ("train_loss_per_epoch", "meta_loss_per_epoch"):
        assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-6), key
    sharded = whole_checkpoint(outs["fsdp"])
    replicated = torch.load(next((outs["replicated"] / "checkpoints").glob("*.pt")), weights_only=False)
    _, vnet = init_models(3, 10, 1, 8, 1, 8, 100)
    vnet_moved = max((replicated["vnet"][k] - v).abs().max().item() for k, v in vnet.state_dict().items())
    vnet_gap = max((sharded["vnet"][k] - v).abs().max().item() for k, v in replicated["vnet"].items())
    model_gap = max((sharded["model"][k].double() - v.double()).abs().max().item()
                    for k, v in replicated["model"].items())
    assert vnet_moved > 1e-5 and vnet_gap < 1e-3 * vnet_moved and model_gap < 1e-5, (vnet_moved, vnet_gap, model_gap)


def test_a_callers_autocast_weight_cache_serves_no_stale_weights():
    """Under a caller's torch.autocast (weight cache on), bf16 copies of θ cast before the meta step must not feed
    its passes at θ + ε_k or θ*: the shards change in place, and the estimator drops the cast copies."""
    def run(cast_before: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        lam = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
        g = torch.Generator().manual_seed(1)
        x, xv = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
        y, yv = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (16,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if cast_before:
                model(x)  # caches bf16 copies of the weights at θ
            out = sharded_evograd_hypergrad(
                model, [lam], lambda: (F.softplus(lam)[y] * F.cross_entropy(model(x), y, reduction="none")).mean(),
                lambda: F.cross_entropy(model(xv), yv), sigma=0.05, generator=torch.Generator().manual_seed(3),
                candidates_in_float32=False)
        return lam.grad, out.val_loss
    fresh, after_cast = run(False), run(True)
    assert torch.equal(fresh[0], after_cast[0]) and torch.equal(fresh[1], after_cast[1])
