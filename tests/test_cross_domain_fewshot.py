"""Tests of cross_domain_fewshot: file lists, episodes, FWT layers, backbones, both meta methods, CLIs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from common.runtime import DataError
from cross_domain_fewshot.data import (DOMAINS, EpisodeSampler, ImageSource, ImageTransform, load_image,
                                       read_file_list, write_embedded_dataset)
from cross_domain_fewshot.lft import METHODS, LFTTrainer, episode_loss
from cross_domain_fewshot.models import (FeatureWiseBatchNorm2d, ResNetBackbone, build_model, feature_transform,
                                         is_fwt_param)

TINY = dict(image_size=40, classes_per_split=(6, 5, 5), images_per_class=8)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return write_embedded_dataset(tmp_path_factory.mktemp("fewshot"), **TINY)


def _write_list(folder, names, labels, n_labels=2):
    path = folder / "base.json"
    path.write_text(json.dumps({"label_names": [f"c{i}" for i in range(n_labels)], "image_names": names,
                                "image_labels": labels}))
    return path


# ------------------------------------------------------------------ file lists and episodes

def test_file_list_reads_generated_folder(tiny_root):
    fl = read_file_list(tiny_root / "cub" / "base.json")
    assert len(fl.label_names) == 6 and len(fl.labels) == 6 * 8
    assert all(p.is_file() for p in fl.image_paths)
    assert {c: len(v) for c, v in fl.indices_by_class().items()} == {c: 8 for c in range(6)}
    img = load_image(fl.image_paths[0])
    assert img.dtype == torch.uint8 and img.shape == (3, 40, 40)
    # every domain and split is written, splits hold disjoint label names
    for domain in DOMAINS:
        names = [set(read_file_list(tiny_root / domain / f"{s}.json").label_names) for s in ("base", "val", "novel")]
        assert not (names[0] & names[1]) and not (names[1] & names[2])


def test_embedded_data_is_deterministic(tmp_path, tiny_root):
    other = write_embedded_dataset(tmp_path / "again", **TINY)
    for rel in ("places/novel/c03_005.jpg", "cars/base/c00_000.jpg"):
        assert torch.equal(load_image(tiny_root / rel), load_image(other / rel))
    # other settings in the same folder replace the old set instead of mixing with it
    write_embedded_dataset(other, **{**TINY, "images_per_class": 7})
    assert len(list((other / "cars" / "base").iterdir())) == 6 * 7
    assert len(read_file_list(other / "cars" / "base.json").labels) == 6 * 7


def test_file_list_errors(tmp_path, tiny_root):
    with pytest.raises(DataError, match="not found"):
        read_file_list(tmp_path / "nope.json")
    src = read_file_list(tiny_root / "cub" / "base.json").image_paths[0]
    with pytest.raises(DataError, match="1 image files missing"):
        read_file_list(_write_list(tmp_path, [str(src), "missing.png"], [0, 1]))
    with pytest.raises(DataError, match="image_labels must be integers"):
        read_file_list(_write_list(tmp_path, [str(src)], [5]))
    (tmp_path / "base.json").write_text('{"label_names": []}')
    with pytest.raises(DataError, match="lacks"):
        read_file_list(tmp_path / "base.json")
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(bad_image)


def test_episode_sampler_shapes_and_disjoint_support_query(tiny_root):
    source = ImageSource(read_file_list(tiny_root / "plantae" / "base.json"), ImageTransform(24, True), cache=True)
    sampler = EpisodeSampler(source, n_way=5, n_shot=2, n_query=3)
    gen = torch.Generator().manual_seed(3)
    labels = source.file_list.labels
    for _ in range(5):
        ep = sampler.sample(gen)
        assert ep.images.shape == (5, 5, 3, 24, 24)
        assert len(set(ep.classes)) == 5
        for cls, row in zip(ep.classes, ep.indices):
            assert all(labels[i] == cls for i in row)            # support and query from the row's class
            assert len(set(row)) == len(row)                     # no image in both support and query
    with pytest.raises(DataError, match="only 0 classes have >= 9"):
        EpisodeSampler(source, n_way=5, n_shot=5, n_query=4)


def test_transform_test_mode_is_deterministic_and_normalised(tiny_root):
    img = load_image(read_file_list(tiny_root / "cars" / "novel.json").image_paths[0])
    t = ImageTransform(32, augment=False)
    a, b = t(img, torch.Generator().manual_seed(0)), t(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    aug = ImageTransform(32, augment=True)
    assert not torch.equal(aug(img, torch.Generator().manual_seed(0)), aug(img, torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------ models and FWT

@pytest.mark.parametrize("depth", ["ResNet10", "ResNet18", "ResNet34"])
def test_backbones_give_512x7x7_at_224(depth):
    backbone = ResNetBackbone(depth)
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 224, 224)).shape == (2, 512, 7, 7)
    assert backbone.feature_size(224) == 7 and backbone.feature_size(32) == 1


def test_fwt_layer_formula_and_switch():
    torch.manual_seed(0)
    layer = FeatureWiseBatchNorm2d(4)
    layer.fwt_gamma.data = torch.linspace(0.1, 0.4, 4).view(1, 4, 1, 1)
    x = torch.randn(3, 4, 5, 5)
    plain = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True)
    with feature_transform(layer, False):
        assert torch.allclose(layer(x), plain, atol=1e-6)
    with feature_transform(layer, True, seed=7):
        out = layer(x)
    gen = torch.Generator().manual_seed(7)
    n_gamma, n_beta = torch.randn(1, 4, 1, 1, generator=gen), torch.randn(1, 4, 1, 1, generator=gen)
    softplus = lambda t: torch.log1p(torch.exp(100 * t)) / 100  # noqa: E731
    expected = (1 + n_gamma * softplus(layer.fwt_gamma)) * plain + n_beta * softplus(layer.fwt_beta)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not layer.fwt_enabled  # restored after the block
    layer.eval()
    with feature_transform(layer, True, seed=7):  # FWT acts in training mode only
        assert torch.allclose(layer(x), torch.nn.functional.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, training=False), atol=1e-6)


def test_fwt_on_changes_model_output_off_keeps_it():
    torch.manual_seed(0)
    model = build_model("ResNet10", "relationnet_softmax", 32, width=8)
    episode = torch.randn(3, 4, 3, 32, 32)
    with feature_transform(model, False):
        off_a, off_b = model(episode, 1), model(episode, 1)
    with feature_transform(model, True, seed=1):
        on_a, on_b = model(episode, 1), model(episode, 1)
    with feature_transform(model, True, seed=2):
        on_c = model(episode, 1)
    assert off_a.shape == (9, 3)
    assert torch.equal(off_a, off_b) and torch.equal(on_a, on_b)      # same seed, same transformation
    assert (on_a - off_a).abs().max() > 1e-3 and (on_c - on_a).abs().max() > 1e-3
    names = [n for n, _ in model.named_parameters() if is_fwt_param(n)]
    assert len(names) == 2 * (4 + 3)  # bn2 of 4 blocks + 3 shortcut BNs, gamma and beta each


def test_protonet_head_matches_distance_to_class_means():
    torch.manual_seed(0)
    model = build_model("ResNet10", "protonet", 32, width=8).eval()
    episode = torch.randn(3, 4, 3, 32, 32)
    with torch.no_grad():
        feats = model.backbone(episode.flatten(0, 1)).mean(dim=(2, 3)).view(3, 4, -1)
        logits = model(episode, 2)
    protos, queries = feats[:, :2].mean(1), feats[:, 2:].reshape(6, -1)
    expected = -((queries[:, None] - protos[None]) ** 2).sum(-1)
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ meta methods

@pytest.mark.parametrize("method", ["lft_second_order", "lft_evograd"])
def test_meta_methods_give_fwt_hypergradients_and_update_both(method):
    torch.manual_seed(0)
    model = build_model("ResNet10", "relationnet_softmax", 32, width=8)
    trainer = LFTTrainer(model, method, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen, unseen = torch.randn(3, 4, 3, 32, 32), torch.randn(3, 4, 3, 32, 32)
    out = trainer.step(seen, unseen, n_shot=1)
    assert set(out) == {"model_loss", "aux_loss", "meta_loss"}
    grads = [p.grad for p in trainer.fwt_params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(is_fwt_param(n) for n in changed) and any(not is_fwt_param(n) for n in changed)


def test_second_order_hypergradient_matches_finite_differences():
    """lft_second_order: dL_U(θ − η∇L_S(θ, λ))/dλ against central differences in one FWT scalar."""
    torch.manual_seed(0)
    model = build_model("ResNet10", "relationnet_softmax", 16, width=4).double()
    seen, unseen = torch.randn(2, 3, 3, 16, 16).double(), torch.randn(2, 3, 3, 16, 16).double()
    trainer = LFTTrainer(model, "lft_second_order", lr=0.05, generator=torch.Generator().manual_seed(0))
    trainer.model_optim = torch.optim.SGD(trainer.model_optim.param_groups[0]["params"], lr=0.0)  # keep θ fixed
    trainer.fwt_optim = torch.optim.SGD(trainer.fwt_params, lr=0.0)
    seed_state = trainer.fwt_generator.get_state()
    trainer.step(seen, unseen, n_shot=1)
    target = trainer.fwt_params[0]
    analytic = target.grad.flatten()[0].item()
    seed = int(torch.randint(0, 2**31 - 1, (), generator=torch.Generator().set_state(seed_state)))

    def meta_loss() -> float:
        names = [n for n, _ in model.named_parameters() if not is_fwt_param(n)]
        theta = [p for n, p in model.named_parameters() if not is_fwt_param(n)]
        with feature_transform(model, True, seed):
            # functional passes: BatchNorm running statistics stay as the trainer's step left them
            grads = torch.autograd.grad(episode_loss(model, dict(zip(names, theta)), seen, 1), theta)
        fast = {n: p - 0.05 * g for n, p, g in zip(names, theta, grads)}
        model.eval()
        with torch.no_grad(), feature_transform(model, False):
            value = episode_loss(model, fast, unseen, 1).item()
        model.train()
        return value

    h = 1e-5
    with torch.no_grad():
        target.view(-1)[0] += h
    plus = meta_loss()
    with torch.no_grad():
        target.view(-1)[0] -= 2 * h
    minus = meta_loss()
    assert analytic == pytest.approx((plus - minus) / (2 * h), rel=1e-4, abs=1e-9)
    assert abs(analytic) > 1e-8


def test_method_names_cover_every_estimator():
    from common.hypergrad import ESTIMATORS
    assert set(METHODS.values()) == set(ESTIMATORS) | {None}
    assert METHODS["lft_evograd"] == "evograd_low_memory" and METHODS["lft_second_order"] == "second_order"


# ------------------------------------------------------------------ command lines

def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd,
                          env={"EVOGRAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_train_help_and_bad_arguments(repo_root, tmp_path):
    assert _run("cross_domain_fewshot.train", "--help", cwd=repo_root).returncode == 0
    bad = _run("cross_domain_fewshot.train", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path), cwd=repo_root)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "is not a folder" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = _run("cross_domain_fewshot.train", "--data-root", str(empty), "--out", str(tmp_path), cwd=repo_root)
    assert missing.returncode == 2 and "miniImagenet/base.json not found" in missing.stderr
    no_ckpt = _run("cross_domain_fewshot.eval", "--checkpoint", str(tmp_path / "x.pt"), cwd=repo_root)
    assert no_ckpt.returncode == 2 and "no checkpoint" in no_ckpt.stderr


def test_tiny_run_of_every_stage_and_method_writes_results(repo_root, tmp_path, tiny_root):
    out = tmp_path / "out"
    common = ["--data-root", str(tiny_root), "--out", str(out), "--width", "4", "--image-size", "16",
              "--n-shot", "1", "--n-query", "2", "--epochs", "2", "--episodes-per-epoch", "2",
              "--val-episodes", "2", "--test-episodes", "5", "--aux-batch", "4", "--seed", "3", "--threads", "1"]
    for stage in ("pretrain", "train", "eval"):
        extra = ["--pretrain-epochs", "1", "--pretrain-batch", "16"] if stage == "pretrain" else []
        proc = _run("cross_domain_fewshot.train", "--stage", stage, *common, *extra, cwd=repo_root)
        assert proc.returncode == 0, proc.stderr
    records = [json.loads(p.read_text()) for p in out.glob("*.json")]
    methods = sorted(r["method"] for r in records)
    assert methods == ["baseline", "lft_evograd", "lft_second_order", "pretrain_linear"]
    for r in records:
        assert r["seed"] == 3 and r["experiment"] == "cross_domain_fewshot"
        assert r["efficiency"]["meta_step_s"] > 0 and r["efficiency"]["device"] == "cpu"
        if r["method"] != "pretrain_linear":
            assert 0 <= r["metrics"]["test_acc"] <= 100 and r["metrics"]["test_ci95"] >= 0
            assert len(r["metrics"]["val_acc_curve"]) == 2
            assert r["setting"] == "real unseen=cub ResNet10 relationnet_softmax 5-way 1-shot"
    assert (out / "figures" / "cross_domain_fewshot_cub_seed3.png").is_file()
    ckpt = next(out.glob("checkpoints/lft_evograd_*.pt"))
    ev = _run("cross_domain_fewshot.eval", "--checkpoint", str(ckpt), "--episodes", "3", cwd=repo_root)
    assert ev.returncode == 0 and "lft_evograd on cub:" in ev.stdout
    # --resume skips the finished run; under other settings (--epochs sets the aux-loss decay) it is refused
    result = next(out.glob("cross_domain_fewshot_*_lft_evograd_seed3.json"))
    before = result.read_bytes()
    proc = _run("cross_domain_fewshot.train", "--methods", "lft_evograd", "--resume", *common, cwd=repo_root)
    assert proc.returncode == 0 and result.read_bytes() == before, proc.stderr
    result.unlink()
    proc = _run("cross_domain_fewshot.train", "--stage", "train", "--methods", "lft_evograd", "--resume",
                *common, "--epochs", "3", cwd=repo_root)
    assert proc.returncode == 2 and "epochs (2 -> 3)" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert len(torch.load(ckpt, weights_only=False)["history"]) == 2


def test_memory_fit_recovers_a_line_and_extrapolates():
    from cross_domain_fewshot.memory_fit import PAPER_PIXELS, episode_pixels, fit_rows, format_measured
    configs = [{"backbone": "ResNet10", "image_size": s, "n_way": 5, "n_shot": 5, "n_query": q}
               for s, q in ((32, 1), (64, 4), (128, 1))]
    rows = [{"config": c, "method": "lft_evograd", "peak_mem_mb": 300.0 + 2e-3 * episode_pixels(c)} for c in configs]
    rows.append({"config": configs[0], "method": "lft_second_order", "peak_mem_mb": 500.0})  # one size: no fit
    fits = fit_rows(rows)
    assert list(fits) == [("ResNet10", "lft_evograd")]
    fit = fits[("ResNet10", "lft_evograd")]
    assert episode_pixels(configs[1]) == 5 * 9 * 64 ** 2
    assert fit["intercept_mb"] == pytest.approx(300.0, rel=1e-6) and fit["mb_per_mpx"] == pytest.approx(2e3, rel=1e-6)
    assert fit["paper_shape_mb"] == pytest.approx(300.0 + 2e-3 * PAPER_PIXELS + fit["params_mb"], rel=1e-6)
    assert fit["fits_12gb"] == (fit["paper_shape_mb"] < 12 * 1024)
    pair = [{"config": configs[0], "method": m, "time_s": t, "peak_mem_mb": mb}
            for m, t, mb in (("lft_second_order", 2.0, 400.0), ("lft_evograd", 1.0, 100.0))]
    assert format_measured(pair).splitlines()[-1] == "| ResNet10 | 32 | 1 | 0.03 | 2.00 | 1.00 | 0.50 | 400 | 100 | 0.25 |"
