"""Mixed precision: common.precision, EvoGrad's float32 candidates under autocast, --amp in every trainer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from common import precision
from common.evograd import evograd_hypergrad_low_memory, evograd_meta_loss
from common.hypergrad import meta_backward
from common.precision import Precision, autocast, backward, check_amp, full_precision, optimizer_step
from common.results import load_checkpoint
from common.runtime import run_cli

# ---------------------------------------------------------------------------------------------
# the helper
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp, device, words", [("fp8", "cpu", "amp must be one of"),
                                                ("bf16", "nonsense", "device must name a torch device"),
                                                ("bf16", "meta", "does not run on device type 'meta'")])
def test_bad_input_raises_value_error(amp, device, words):
    with pytest.raises(ValueError, match=words):
        check_amp(amp, device)
    with pytest.raises(ValueError, match=words):
        Precision(amp, device)


@pytest.mark.parametrize("amp, dtype", [("none", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_dtype_on_cpu(amp, dtype):
    layer = torch.nn.Linear(4, 3)
    with autocast(amp, "cpu"):
        out = layer(torch.randn(2, 4))
        with full_precision():  # autocast off inside
            inner = layer(torch.randn(2, 4))
    assert out.dtype == dtype and inner.dtype == torch.float32
    assert Precision(amp, "cpu").dtype == dtype


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_parameter_changed_in_place_inside_an_iteration_is_read_anew(amp):
    """No autocast weight cache: a forward after an in-place change of a parameter inside the same iteration
    (λ's optimiser step before the base step reads λ; under --fsdp the meta step's perturbed shards, which
    FSDP2 gathers into the same parameter objects) sees the new values, not a cast copy of the old ones."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with Precision(amp, "cpu").iteration():
        before = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)
        after = layer(x)
    with autocast(amp, "cpu"):
        fresh = layer(x)
    assert torch.equal(after, fresh) and not torch.equal(after, before)


def _twin_linears():
    """A batch, two equal linear layers and an SGD optimiser for each (fixed seed)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ref, mine = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    mine.load_state_dict(ref.state_dict())
    return x, y, ref, mine, torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(mine.parameters(), lr=0.1)


def test_backward_and_step_are_plain_outside_fp16():
    """Without fp16 (or outside an iteration) the helpers are exactly loss.backward() and optimizer.step()."""
    x, y, ref, mine, opt_ref, opt_mine = _twin_linears()
    F.cross_entropy(ref(x), y).backward()
    opt_ref.step()
    with Precision("none", "cpu").iteration():
        backward(F.cross_entropy(mine(x), y))
        optimizer_step(opt_mine)
    for a, b in zip(ref.parameters(), mine.parameters()):
        assert torch.equal(a, b)


def test_fp16_scaler_unscales_and_skips_non_finite_steps():
    x, y, ref, mine, opt_ref, opt_mine = _twin_linears()
    with torch.autocast("cpu", dtype=torch.float16):
        F.cross_entropy(ref(x), y).backward()
    opt_ref.step()
    run = Precision("fp16", "cpu")
    scale = run.scaler.get_scale()
    with run.iteration():
        backward(F.cross_entropy(mine(x), y))
        assert mine.weight.grad.abs().max() > 100 * ref.weight.grad.abs().max()  # scaled by 2^16
        optimizer_step(opt_mine)
    for a, b in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # the step of the unscaled gradient
    assert run.scaler.get_scale() == scale  # one finite step: growth only after 2000
    before = [p.detach().clone() for p in mine.parameters()]
    with run.iteration():
        backward(F.cross_entropy(mine(x), y) * float("inf"))
        optimizer_step(opt_mine)
    assert all(torch.equal(a, b) for a, b in zip(before, mine.parameters()))  # skipped
    assert run.scaler.get_scale() == scale / 2  # and the scale backed off
    state = run.state_dict()
    other = Precision("fp16", "cpu")
    other.load_state_dict(state)
    assert other.scaler.get_scale() == scale / 2


def test_fp16_gradients_are_unscaled_before_clipping():
    """unscale_gradients divides by the scale now: clipping sees the true gradients, and a clipped fp16
    step is the float32 step with the same clipping (MetaXL clips its model's gradients this way)."""
    x, y, ref, mine, opt_ref, opt_mine = _twin_linears()
    start = [p.detach().clone() for p in ref.parameters()]
    F.cross_entropy(ref(x), y).backward()                     # float32
    true_grads = [p.grad.clone() for p in ref.parameters()]
    max_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item() / 3  # clipping bites
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    opt_ref.step()
    run = Precision("fp16", "cpu")
    with run.iteration():
        backward(F.cross_entropy(mine(x), y))
        precision.unscale_gradients(opt_mine)
        for p, g in zip(mine.parameters(), true_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-2, atol=1e-3)  # fp16 forward: a few 1e-3 apart
        torch.nn.utils.clip_grad_norm_(mine.parameters(), max_norm)
        optimizer_step(opt_mine)
    for a, b, s in zip(ref.parameters(), mine.parameters(), start):
        torch.testing.assert_close(b - s, a - s, rtol=1e-2, atol=1e-4)


def test_iteration_restores_outside_behaviour_after_an_error():
    run = Precision("bf16", "cpu")
    with pytest.raises(RuntimeError):
        with run.iteration():
            raise RuntimeError("boom")
    assert not torch.is_autocast_enabled("cpu") and precision._ACTIVE.get() is None


# ---------------------------------------------------------------------------------------------
# EvoGrad under bf16: the float32-candidates fix on a small problem with a fixed seed
# ---------------------------------------------------------------------------------------------

def _film_problem():
    """A 2-layer MLP with a per-unit scale λ inside (as the study's FiLM MLP), fixed seed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    scale = (1 + 0.1 * torch.randn(64)).requires_grad_()
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    vx, vy = torch.randn(64, 20), torch.randint(0, 5, (64,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def forward(p, inputs, s=None):
        h = torch.relu(F.linear(inputs, p["0.weight"], p["0.bias"]))
        return F.linear(h if s is None else h * s, p["2.weight"], p["2.bias"])

    return params, scale, (lambda p: F.cross_entropy(forward(p, x, scale), y)), \
        (lambda p: F.cross_entropy(forward(p, vx), vy))


def _evograd_grad(amp: str, in_float32: bool, seed: int, low_memory: bool | str) -> torch.Tensor:
    params, scale, train_fn, val_fn = _film_problem()
    gen = torch.Generator().manual_seed(seed)
    options = dict(n_candidates=2, sigma=1e-3, temperature=0.05, generator=gen, candidates_in_float32=in_float32)
    if low_memory == "meta_backward":  # the whole meta step inside autocast, as the trainers run it
        with autocast(amp, "cpu"):
            meta_backward("evograd", params, [scale], train_fn, val_fn, **options)
    elif low_memory:
        with autocast(amp, "cpu"):
            evograd_hypergrad_low_memory(params, [scale], train_fn, val_fn, **options)
    else:
        with autocast(amp, "cpu"):
            meta_loss = evograd_meta_loss(params, train_fn, val_fn, **options)
        meta_loss.backward()  # outside autocast, as documented
    return scale.grad


@pytest.mark.parametrize("low_memory", [False, True, "meta_backward"])
def test_float32_candidates_keep_evograd_signal_under_bf16(low_memory):
    """With candidates in float32 the bf16 hypergradient has cosine > 0.9999 with the float32 one, every draw."""
    cos_fixed, cos_plain = [], []
    for seed in range(8):
        g32 = _evograd_grad("none", True, seed, low_memory)
        cos_fixed.append(F.cosine_similarity(_evograd_grad("bf16", True, seed, low_memory), g32, dim=0).item())
        cos_plain.append(F.cosine_similarity(_evograd_grad("bf16", False, seed, low_memory), g32, dim=0).item())
    assert min(cos_fixed) > 0.9999, cos_fixed
    assert sum(cos_plain) < sum(cos_fixed), cos_plain  # bf16 candidates lose part of the signal  # the fix is needed: bf16 candidates lose the signal


def test_sama_differences_in_float32_keep_its_signal_under_bf16():
    """SAMA's two passes at θ ± εPv in float32: within 1% of the float32 hypergradient under bf16."""
    from common.implicit import sama_hypergrad

    def grad(amp, in_float32):
        params, scale, train_fn, val_fn = _film_problem()
        with autocast(amp, "cpu"):
            sama_hypergrad(params, [scale], train_fn, val_fn, inner_lr=0.1, differences_in_float32=in_float32)
        return scale.grad
    g32 = grad("none", True)
    fixed, plain = ((grad("bf16", flag) - g32).norm() / g32.norm() for flag in (True, False))
    assert fixed < 0.01 < 0.05 < plain, (fixed, plain)   # measured: 0.0017 and 0.15


# ---------------------------------------------------------------------------------------------
# --amp bf16 end to end on CPU, each experiment's smallest configuration
# ---------------------------------------------------------------------------------------------

def _results(folder, pattern):
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_rotation_bf16_and_resume_refuses_changed_amp(tmp_path, capsys):
    from rotation import train
    argv = ["--quick", "--epochs", "1", "--batch-size", "2048", "--threads", "1", "--method", "evograd",
            "--out", str(tmp_path), "--amp", "bf16"]
    train.main(argv)
    result = _results(tmp_path, "rotation_*_evograd_seed1.json")
    assert result["config"]["amp"] == "bf16" and abs(result["metrics"]["angle_deg"]) < 360
    (next(tmp_path.glob("rotation_*_evograd_seed1.json"))).unlink()  # unfinished again: --resume reads the checkpoint
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(train.main, [*argv[:-1], "fp16", "--resume"])
    assert info.value.code == 2 and "amp (\"bf16\" -> \"fp16\")" in capsys.readouterr().err


def test_rotation_fp16_on_cpu_runs(tmp_path):
    from rotation import train
    train.main(["--quick", "--epochs", "1", "--batch-size", "2048", "--threads", "1", "--method", "second_order",
                "--out", str(tmp_path), "--amp", "fp16"])
    assert _results(tmp_path, "rotation_*_second_order_seed1.json")["config"]["amp"] == "fp16"


MWN_TINY = ["--quick", "--train_size", "60", "--num_meta", "20", "--batch_size", "20", "--meta_batch_size", "10",
            "--device", "cpu", "--seed", "3", "--epochs", "1"]
METAXL_TINY = ["--model", "tiny", "--train_size", "24", "--target_train_size", "12", "--epochs", "1",
               "--batch_size", "6", "--lr", "1e-3", "--meta_lr", "1e-3", "--bottle_size", "8", "--max_seq_length",
               "32", "--eval_max_seq_length", "32", "--transfer_layer", "4", "--targets", "qu", "--seed", "3",
               "--no_figures"]


def test_label_noise_mwn_bf16(tmp_path):
    from label_noise_mwn import train
    train.main([*MWN_TINY, "--methods", "mwn_evograd", "mwn_second_order", "--out", str(tmp_path), "--amp", "bf16"])
    for method in ("mwn_evograd", "mwn_second_order"):
        assert _results(tmp_path, f"label_noise_mwn_*_{method}_seed3.json")["config"]["amp"] == "bf16"


def test_metaxl_bf16(tmp_path):
    from metaxl import train
    train.main([*METAXL_TINY, "--methods", "metaxl_evograd", "--out", str(tmp_path), "--amp", "bf16"])
    assert _results(tmp_path, "metaxl_*_metaxl_evograd_seed3.json")["config"]["amp"] == "bf16"


@pytest.mark.parametrize("name", ["label_noise_mwn", "metaxl", "cross_domain_fewshot"])
def test_fp16_checkpoints_keep_the_gradient_scale_for_resume(name, tmp_path, monkeypatch):
    import importlib
    train = importlib.import_module(f"{name}.train")
    if name == "cross_domain_fewshot":
        from cross_domain_fewshot.data import write_embedded_dataset
        root = write_embedded_dataset(tmp_path / "fewshot", image_size=40, classes_per_split=(6, 5, 5),
                                      images_per_class=8)
        argv = [*FEWSHOT_TINY, "--data-root", str(root)]
    else:
        argv = [*MWN_TINY, "--methods", "mwn_evograd"] if name == "label_noise_mwn" else [*METAXL_TINY, "--methods",
                                                                                         "metaxl_evograd"]
    argv += ["--out", str(tmp_path / "out"), "--amp", "fp16"]
    train.main(argv)
    checkpoints = sorted((tmp_path / "out" / "checkpoints").glob("*.pt"))   # few-shot: pre-training and LFT
    saved = [load_checkpoint(path)["amp_scaler"] for path in checkpoints]
    assert saved and all(s["scale"] > 0 and "_growth_tracker" in s for s in saved)   # the scaler's, not {}
    for found in (tmp_path / "out").glob(f"{name}_*.json"):
        found.unlink()   # unfinished again: --resume restores the checkpoints
    loaded = []
    monkeypatch.setattr(precision.Precision, "load_state_dict", lambda self, state: loaded.append(state))
    train.main([*argv, "--resume"])
    assert sorted(map(str, loaded)) == sorted(map(str, saved))


FEWSHOT_TINY = ["--width", "4", "--image-size", "32", "--n-shot", "1", "--n-query", "2", "--epochs", "1",
                "--episodes-per-epoch", "2", "--val-episodes", "2", "--test-episodes", "5", "--test-queries", "2",
                "--aux-batch", "4", "--seed", "3", "--threads", "1", "--pretrain-epochs", "1", "--pretrain-batch",
                "16", "--methods", "lft_evograd"]


def test_cross_domain_fewshot_bf16(tmp_path):
    from cross_domain_fewshot import train
    from cross_domain_fewshot.data import write_embedded_dataset
    fewshot_root = write_embedded_dataset(tmp_path / "fewshot", image_size=40, classes_per_split=(6, 5, 5),
                                          images_per_class=8)
    train.main([*FEWSHOT_TINY, "--data-root", str(fewshot_root), "--out", str(tmp_path), "--amp", "bf16"])
    assert _results(tmp_path, "cross_domain_fewshot_*_lft_evograd_seed3.json")["config"]["amp"] == "bf16"


def test_bench_bf16_tiny(tmp_path):
    from common import bench
    out = tmp_path / "bench.json"
    bench.main(["rotation", "--quick", "--methods", "evograd", "second_order", "--reps", "1", "--warmup", "0",
                "--no-memory", "--amp", "bf16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"evograd", "second_order"} and all(r["amp"] == "bf16" for r in rows)


def test_precision_study_smoke_and_a_raising_estimator_is_a_row_not_a_crash(tmp_path, monkeypatch, capsys):
    from common import precision_study
    real = precision_study.hypergradient

    def cg_overflows_in_fp16(setting, instance, seed, amp, device):
        if setting.method == "cg" and amp == "fp16":
            raise ValueError("cg: train_loss_fn's Hessian-vector products are non-finite (test)")
        return real(setting, instance, seed, amp, device)
    monkeypatch.setattr(precision_study, "hypergradient", cg_overflows_in_fp16)
    run_cli(precision_study.main, ["--problems", "one_d", "--draws", "2", "--amp", "bf16", "fp16",
                                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "precision_study.json").read_text())["rows"]
    assert len(rows) == 2 * len(precision_study.precision_settings("evograd", 0.5))
    cg = {r["amp"]: r for r in rows if r["label"] == "cg J=10"}
    assert cg["fp16"]["failed_draws"] == 2 and "non-finite" in cg["fp16"]["error"]
    assert cg["bf16"]["failed_draws"] == 0 and cg["bf16"]["cos_to_float32"] == pytest.approx(1.0, abs=1e-6)
    assert "| one_d | cg J=10 | fp16 | raised on 2 of 2 draws: cg: train_loss_fn's Hessian" in out
    with pytest.raises(ValueError, match="unrelated"):   # only a non-finite value becomes a row
        monkeypatch.setattr(precision_study, "hypergradient",
                            lambda *a: (_ for _ in ()).throw(ValueError("unrelated bug")))
        precision_study.run_problem("one_d", 1, 0, ["bf16"], torch.device("cpu"), tmp_path / "cache")
