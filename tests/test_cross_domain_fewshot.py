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
from cross_domain_fewshot import lft
from cross_domain_fewshot.eval import evaluate_on_domain, model_from_checkpoint
from cross_domain_fewshot.lft import METHODS, LFTTrainer, aux_weight_at, episode_loss, resolve_meta_order
from cross_domain_fewshot.models import (FeatureWiseBatchNorm2d, RelationModule, ResNetBackbone, build_model,
                                         feature_transform, is_fwt_param, mlp_classifier)

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
    spread = {"candidate_loss_spread"} if method == "lft_evograd" else set()
    assert set(out) == {"model_loss", "aux_loss", "meta_loss"} | spread
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


# ------------------------------------------------------------------ defaults that follow the authors' code

def _fwt_seeds_of_one_step(method, **options):
    """The FWT seeds of every training-mode pass with FWT on during one meta-iteration."""
    torch.manual_seed(0)
    model = build_model("ResNet10", "relationnet_softmax", 16, width=4)
    trainer = LFTTrainer(model, method, generator=torch.Generator().manual_seed(0), **options)
    seeds = []
    first_fwt = next(m for m in model.modules() if isinstance(m, FeatureWiseBatchNorm2d))
    first_fwt.register_forward_pre_hook(lambda m, _: seeds.append(m.fwt_seed) if m.fwt_enabled and m.training else None)
    trainer.step(torch.randn(2, 3, 3, 16, 16), torch.randn(2, 3, 3, 16, 16), n_shot=1)
    return seeds


def test_evograd_candidates_draw_their_own_fwt_noise_by_default():
    """Default: model step and each of the K = 2 candidates get their own draw; shared: one draw."""
    independent = _fwt_seeds_of_one_step("lft_evograd")
    assert len(independent) == 3 and None not in independent and len(set(independent)) == 3
    shared = _fwt_seeds_of_one_step("lft_evograd", fwt_noise="shared")
    assert len(shared) == 3 and len(set(shared)) == 1
    assert independent[0] == shared[0]  # the model step's draw is the same either way
    # the second-order virtual step reuses the model step's forward pass (one draw) in the authors' code
    assert len(set(_fwt_seeds_of_one_step("lft_second_order"))) == 1
    # the layer turns different seeds into different noise
    layer = FeatureWiseBatchNorm2d(4)
    x = torch.randn(3, 4, 2, 2)
    outs = []
    for seed in independent[1:]:
        with feature_transform(layer, True, seed):
            outs.append(layer(x))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_independent_fwt_noise_is_repeatable_and_the_same_in_both_evograd_paths():
    """Seeded noise repeats; the low-memory path evaluates each candidate once with the plain path's draw."""
    def fwt_grads(method):
        torch.manual_seed(0)
        model = build_model("ResNet10", "relationnet_softmax", 16, width=4).double()
        trainer = LFTTrainer(model, method, generator=torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(1)
        seen, unseen = (torch.randn(2, 3, 3, 16, 16, generator=gen).double() for _ in range(2))
        calls = []
        original = lft.episode_loss
        lft.episode_loss = lambda *a: calls.append(1) or original(*a)
        try:
            trainer.step(seen, unseen, n_shot=1)
        finally:
            lft.episode_loss = original
        return [p.grad.clone() for p in trainer.fwt_params], len(calls)

    low_a, calls_low = fwt_grads("lft_evograd")
    low_b, _ = fwt_grads("lft_evograd")
    plain, calls_plain = fwt_grads("lft_evograd_plain")
    assert calls_low == calls_plain == 2 + 1 + 1  # model step + K candidates + validation, nothing recomputed
    assert all(torch.equal(a, b) for a, b in zip(low_a, low_b))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(low_a, plain))
    assert sum(g.abs().sum() for g in low_a) > 0


def test_relation_module_batchnorm_keeps_no_running_statistics():
    torch.manual_seed(0)
    module = RelationModule(channels=8, side=2)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 2 and all(not bn.track_running_stats and bn.running_mean is None for bn in bns)
    assert not any("running" in key for key in module.state_dict())
    pairs = torch.randn(12, 16, 2, 2) * 3 + 1
    train_out = module(pairs)
    assert torch.allclose(module.eval()(pairs), train_out, atol=1e-6)  # batch statistics in eval mode too
    running = RelationModule(channels=8, side=2, bn="running")
    running(pairs)  # one training pass updates the running statistics
    assert not torch.allclose(running.eval()(pairs), running.train()(pairs), atol=1e-3)
    assert all(not m.track_running_stats for m in build_model("ResNet10", "relationnet_softmax", 16, width=4)
               .relation.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_relation_module_init_is_fan_out_normal():
    """Conv weights ~ N(0, 2 / (3·3·out)) (the authors' init_layer), not PyTorch's uniform default."""
    torch.manual_seed(0)
    convs = [m for m in RelationModule(channels=64, side=7).modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        w = conv.weight.detach().flatten()
        expected_std = (2 / (9 * conv.out_channels)) ** 0.5
        assert w.std().item() == pytest.approx(expected_std, rel=0.03) and abs(w.mean().item()) < 0.01 * expected_std * 10
        assert w.abs().max().item() > 3.5 * expected_std  # a normal's tails, beyond a uniform's bound
    default = [m for m in RelationModule(channels=64, side=7, init="pytorch").modules() if isinstance(m, torch.nn.Conv2d)]
    fan_in = 9 * default[0].in_channels
    assert default[0].weight.std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.03)


def test_aux_head_is_three_layer_mlp_with_the_authors_schedule():
    head = mlp_classifier(32, 64)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 32), (32, 32), (32, 64)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in head) == 2 and isinstance(head[-1], torch.nn.Linear)
    # 0.9^(20·epoch // epochs): 20 steps of 0.9 over training
    assert [aux_weight_at(e, 400) for e in (0, 19, 20, 39, 40, 399)] == pytest.approx(
        [1, 1, 0.9, 0.9, 0.81, 0.9 ** 19], rel=1e-12)
    assert aux_weight_at(3, 10, "pretrained_linear", 2.0) == pytest.approx(1.4)
    # computed in eval mode: running BatchNorm statistics used and left unchanged
    torch.manual_seed(0)
    model = build_model("ResNet10", "relationnet_softmax", 16, width=4)
    trainer = LFTTrainer(model, "baseline", aux_classifier=mlp_classifier(model.backbone.out_channels, 6))
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    loss = trainer.aux_loss(images, labels)
    assert torch.isfinite(loss) and model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    # in a step it comes before the episode pass (which updates the running statistics)
    out = trainer.step(torch.randn(2, 3, 3, 16, 16), torch.randn(2, 3, 3, 16, 16), 1, (images, labels), 0.5)
    assert out["aux_loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    trainer.aux_mode = "train"
    trainer.aux_loss(images, labels)
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())


@pytest.mark.parametrize("method, options, at_updated", [
    ("lft_evograd", {}, True), ("lft_second_order", {}, False),
    ("lft_evograd", {"meta_order": "before"}, False), ("lft_second_order", {"meta_order": "after"}, True)])
def test_meta_step_is_taken_at_the_updated_theta_for_evograd_by_default(method, options, at_updated, monkeypatch):
    torch.manual_seed(0)
    model = build_model("ResNet10", "relationnet_softmax", 16, width=4)
    trainer = LFTTrainer(model, method, generator=torch.Generator().manual_seed(0), **options)
    seen_theta = {}
    real_meta_backward = lft.meta_backward

    def spy(estimator, params, *args, **kwargs):
        seen_theta.update({n: p.detach().clone() for n, p in params.items()})
        return real_meta_backward(estimator, params, *args, **kwargs)
    monkeypatch.setattr(lft, "meta_backward", spy)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_fwt_param(n)}
    trainer.step(torch.randn(2, 3, 3, 16, 16), torch.randn(2, 3, 3, 16, 16), n_shot=1)
    after = {n: p.detach() for n, p in model.named_parameters() if not is_fwt_param(n)}
    assert set(seen_theta) == set(after) and any(not torch.equal(before[n], after[n]) for n in after)
    reference = after if at_updated else before
    assert all(torch.equal(seen_theta[n], reference[n]) for n in reference)
    assert trainer.meta_order == ("after" if at_updated else "before")
    assert resolve_meta_order("lft_evograd_plain") == "after" and resolve_meta_order("lft_finite_difference") == "before"


def test_eval_defaults_to_the_final_model_and_15_queries(tmp_path, tiny_root):
    from cross_domain_fewshot.train import build_parser
    defaults = build_parser().parse_args([])
    assert (defaults.test_queries, defaults.test_checkpoint, defaults.n_query) == (15, "final", 16)
    assert (defaults.fwt_noise, defaults.meta_order, defaults.aux_loss) == ("independent", "auto", "mlp")
    assert (defaults.relation_bn, defaults.relation_init) == ("batch", "fan_out")
    cfg = {"backbone": "ResNet10", "head": "relationnet_softmax", "image_size": 16, "width": 4, "n_way": 5,
           "n_shot": 1, "n_query": 2, "relation_bn": "batch", "relation_init": "fan_out"}
    torch.manual_seed(0)
    final, best = build_model(**{k: cfg[k] for k in ("backbone", "head", "image_size", "width")}), None
    best = {k: v + 1 for k, v in final.state_dict().items()}
    state = {"config": cfg, "model": final.state_dict(), "best_model": best}
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in model_from_checkpoint(state).state_dict().items())
    assert all(torch.equal(v, best[k]) for k, v in model_from_checkpoint(state, "best_val").state_dict().items())
    novel = read_file_list(tiny_root / "cub" / "novel.json")  # 8 images per class: list each twice
    (tmp_path / "cub").mkdir()
    (tmp_path / "cub" / "novel.json").write_text(json.dumps({
        "label_names": novel.label_names, "image_names": [str(p) for p in novel.image_paths] * 2,
        "image_labels": list(novel.labels) * 2}))
    root = tmp_path
    shapes = []
    model = model_from_checkpoint(state)
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    evaluate_on_domain(model, root, "cub", cfg, n_episodes=1, seed=0, n_query=defaults.test_queries)
    assert shapes == [(5, 1 + 15, 3, 16, 16)]


def test_method_names_cover_every_estimator():
    from common.hypergrad import ESTIMATORS
    assert set(METHODS.values()) == set(ESTIMATORS) | {None}
    assert METHODS["lft_evograd"] == "evograd_low_memory" and METHODS["lft_second_order"] == "second_order"


# ------------------------------------------------------------------ command lines

def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd,
                          env={"EVOGRAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_train_help_and_bad_arguments(repo_root, tmp_path, tiny_root):
    assert _run("cross_domain_fewshot.train", "--help", cwd=repo_root).returncode == 0
    bad = _run("cross_domain_fewshot.train", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path), cwd=repo_root)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "is not a folder" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = _run("cross_domain_fewshot.train", "--data-root", str(empty), "--out", str(tmp_path), cwd=repo_root)
    # the test split is checked first, before any training
    assert missing.returncode == 2 and "cub/novel.json not found" in missing.stderr
    missing_base = _run("cross_domain_fewshot.train", "--data-root", str(empty), "--stage", "pretrain", "--out",
                        str(tmp_path), cwd=repo_root)
    assert missing_base.returncode == 2 and "miniImagenet/base.json not found" in missing_base.stderr
    too_many = _run("cross_domain_fewshot.train", "--data-root", str(tiny_root), "--out", str(tmp_path), cwd=repo_root)
    assert too_many.returncode == 2 and "--test-queries 15 queries per class: lower it" in too_many.stderr  # 5 + 15 > 8 images per class
    assert not (tmp_path / "checkpoints").exists()  # stopped before any work
    no_ckpt = _run("cross_domain_fewshot.eval", "--checkpoint", str(tmp_path / "x.pt"), cwd=repo_root)
    assert no_ckpt.returncode == 2 and "no checkpoint" in no_ckpt.stderr


def test_tiny_run_of_every_stage_and_method_writes_results(repo_root, tmp_path, tiny_root):
    out = tmp_path / "out"
    common = ["--data-root", str(tiny_root), "--out", str(out), "--width", "4", "--image-size", "16",
              "--n-shot", "1", "--n-query", "2", "--epochs", "2", "--episodes-per-epoch", "2",
              "--val-episodes", "2", "--test-episodes", "5", "--test-queries", "2", "--aux-batch", "4", "--seed", "3",
              "--threads", "1"]
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
            assert r["config"]["test_checkpoint"] == "final" and r["config"]["test_queries"] == 2
            assert r["config"]["fwt_noise"] == "independent" and r["config"]["aux_loss"] == "mlp"
            assert r["config"]["resolved_meta_order"] == ("after" if r["method"] == "lft_evograd" else "before")
    assert (out / "figures" / "cross_domain_fewshot_cub_seed3.png").is_file()
    ckpt = next(out.glob("checkpoints/lft_evograd_*.pt"))
    state = torch.load(ckpt, weights_only=False)
    assert state["config"]["relation_bn"] == "batch" and state["config"]["resolved_meta_order"] == "after"
    assert [k for k in state["aux_classifier"] if k.endswith("weight")] == ["0.weight", "2.weight", "4.weight"]
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


# ------------------------------------------------------------------ the authors' baseline, encoder and data pipeline

def _authors_encoder_state(width, n_classes=200, seed=0):
    """An encoder state of the authors' layout (their BaselineTrain over a ResNet10), key by key."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=gen)  # noqa: E731

    def bn(prefix, c):
        return {f"{prefix}.weight": rand(c), f"{prefix}.bias": rand(c), f"{prefix}.running_mean": rand(c),
                f"{prefix}.running_var": rand(c).abs() + 0.5, f"{prefix}.num_batches_tracked": torch.tensor(7)}
    state = {"feature.trunk.0.weight": rand(width, 3, 7, 7), **bn("feature.trunk.1", width)}
    for b, (cin, cout) in enumerate([(width, width), (width, 2 * width), (2 * width, 4 * width), (4 * width, 8 * width)]):
        t = f"feature.trunk.{4 + b}"
        state.update({f"{t}.C1.weight": rand(cout, cin, 3, 3), **bn(f"{t}.BN1", cout),
                      f"{t}.C2.weight": rand(cout, cout, 3, 3), **bn(f"{t}.BN2", cout)})
        if cin != cout:
            state.update({f"{t}.shortcut.weight": rand(cout, cin, 1, 1), **bn(f"{t}.BNshortcut", cout)})
    state.update({"classifier.weight": rand(n_classes, 8 * width), "classifier.bias": torch.zeros(n_classes)})
    return state


def _tiny_args(tiny_root, out, *extra):
    return ["--data-root", str(tiny_root), "--out", str(out), "--width", "4", "--image-size", "16", "--n-shot", "1",
            "--n-query", "2", "--val-episodes", "1", "--test-episodes", "2", "--test-queries", "2", "--aux-batch", "4",
            "--seed", "3", *extra]


def test_encoder_file_of_the_authors_layout_loads(tmp_path, tiny_root):
    from common.runtime import CLIError
    from cross_domain_fewshot.train import parse_config, read_encoder
    folder = tmp_path / "baseline"
    folder.mkdir()
    state = _authors_encoder_state(4)
    torch.save({"epoch": 399, "state": state}, folder / "399.tar")
    torch.save({"epoch": 24, "state": _authors_encoder_state(4, seed=1)}, folder / "24.tar")
    torch.save({"epoch": 0, "state": {"feature.trunk.0.weight": torch.zeros(4, 3, 7, 7)}}, tmp_path / "partial.tar")
    backbone_state, classifier = read_encoder(folder, "ResNet10", 4)  # a folder: its highest epoch, as the authors
    backbone = ResNetBackbone("ResNet10", 4)
    backbone.load_state_dict(backbone_state, strict=False)
    ours = backbone.state_dict()
    pairs = {"stem.0.weight": "feature.trunk.0.weight", "stem.1.running_var": "feature.trunk.1.running_var",
             "blocks.0.conv1.weight": "feature.trunk.4.C1.weight", "blocks.0.bn2.bias": "feature.trunk.4.BN2.bias",
             "blocks.1.shortcut.0.weight": "feature.trunk.5.shortcut.weight",
             "blocks.3.shortcut.1.running_mean": "feature.trunk.7.BNshortcut.running_mean",
             "blocks.3.conv2.weight": "feature.trunk.7.C2.weight", "blocks.2.bn1.weight": "feature.trunk.6.BN1.weight"}
    assert all(torch.equal(ours[k], state[v]) for k, v in pairs.items())
    assert sum(not k.startswith("classifier.") for k in state) == len(backbone_state)
    assert set(k for k in ours if ".fwt_" not in k) == set(backbone_state)  # every tensor but the FWT parameters
    assert classifier["weight"].shape == (200, 32) and torch.equal(classifier["bias"], torch.zeros(200))
    # the train stage starts from it (no pretrain stage), the FWT parameters at their initial values
    args = parse_config(_tiny_args(tiny_root, tmp_path / "out", "--encoder-checkpoint", str(folder / "399.tar")))
    assert args.encoder_checkpoint.endswith("399.tar")
    for argv, words in [(["--encoder-checkpoint", str(tmp_path / "none.tar")], "not found"),
                        (["--encoder-checkpoint", str(folder), "--width", "8"], "--width 64"),
                        (["--encoder-checkpoint", str(folder), "--backbone", "ResNet18"], "lacks"),
                        (["--encoder-checkpoint", str(tmp_path / "partial.tar")], "lacks"),
                        (["--encoder-checkpoint", str(folder), "--stage", "pretrain"], "replaces the pretrain stage"),
                        (["--encoder-checkpoint", str(tiny_root / "cub" / "base.json")], "not a readable torch file")]:
        with pytest.raises(CLIError, match="--encoder-checkpoint") as err:
            parse_config(_tiny_args(tiny_root, tmp_path / "out", *argv))
        assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("protocol", ["authors", "lft"])
def test_baseline_has_no_aux_loss_and_mixes_the_seen_domains(protocol, tmp_path, tiny_root, monkeypatch):
    from cross_domain_fewshot import data as fewshot_data
    from cross_domain_fewshot import train as fewshot_train
    from cross_domain_fewshot.data import balanced_domain_order
    assert fewshot_train.build_parser().parse_args([]).baseline_protocol == "authors"
    order = balanced_domain_order(4, 100, torch.Generator().manual_seed(0))
    assert sorted(order) == sorted(list(range(4)) * 25) and order != sorted(order)
    torch.save({"epoch": 399, "state": _authors_encoder_state(4)}, tmp_path / "399.tar")
    episodes, steps, aux_picks = [], [], []
    real_sample, real_step, real_load = EpisodeSampler.sample, LFTTrainer.step, fewshot_data.BatchSampler.load

    def sample(self, generator):
        if self.source.file_list.path.stem == "base":
            episodes.append(self.source.file_list.path.parent.name)
        return real_sample(self, generator)

    def step(self, seen, unseen, n_shot, aux_batch=None, aux_weight=0.0):
        steps.append((unseen is None, aux_batch is None, self.aux_classifier is None))
        return real_step(self, seen, unseen, n_shot, aux_batch, aux_weight)

    def load(self, picks, generator):
        aux_picks.extend(picks)
        return real_load(self, picks, generator)
    monkeypatch.setattr(EpisodeSampler, "sample", sample)
    monkeypatch.setattr(LFTTrainer, "step", step)
    monkeypatch.setattr(fewshot_data.BatchSampler, "load", load)
    out = tmp_path / "out"
    fewshot_train.main(_tiny_args(tiny_root, out, "--methods", "baseline", "--epochs", "2", "--episodes-per-epoch", "8",
                                  "--encoder-checkpoint", str(tmp_path / "399.tar"), "--baseline-protocol", protocol))
    seen = [d for d in DOMAINS if d != "cub"]
    assert not list(out.glob("*pretrain_linear*.json"))  # the encoder file stands in for the pretrain stage
    state = torch.load(next(out.glob("checkpoints/baseline_*.pt")), weights_only=False)
    if protocol == "authors":
        # one episode per step, no auxiliary head or loss, every seen domain twice in each epoch of 8
        assert steps == [(True, True, True)] * 16 and state["aux_classifier"] is None and not aux_picks
        assert sorted(episodes[:8]) == sorted(episodes[8:]) == sorted(seen * 2)
        assert all(h["aux_loss"] == 0 for h in state["history"])
    else:  # as the LFT methods: one pseudo-seen domain per epoch, auxiliary batches without replacement
        assert steps == [(False, False, False)] * 16 and state["aux_classifier"] is not None
        assert len(set(episodes[0:16:2])) == 1 and len(set(episodes[16::2])) == 1
        assert len(aux_picks) == 16 * 4 and len(set(aux_picks[:48])) == 48  # 48 miniImagenet base images, one pass


def test_pretraining_head_and_batches_without_replacement(tiny_root):
    from cross_domain_fewshot.data import BatchSampler
    from cross_domain_fewshot.train import PretrainNet, build_parser
    defaults = build_parser().parse_args([])
    assert (defaults.pretrain_classes, defaults.batch_sampling) == (200, "epochs")
    net = PretrainNet(ResNetBackbone("ResNet10", 4), 200)
    assert net.classifier.out_features == 200 and torch.equal(net.classifier.bias, torch.zeros(200))
    source = ImageSource(read_file_list(tiny_root / "miniImagenet" / "base.json"), ImageTransform(8, False), cache=True)
    n = len(source.file_list.labels)  # 48
    picks = []
    batches = BatchSampler(source, 10)
    real_load = batches.load
    batches.load = lambda p, g: (picks.append(list(p)), real_load(p, g))[1]
    gen = torch.Generator().manual_seed(0)
    sizes = [len(labels) for _, labels in batches.epoch(gen)]
    assert sizes == [10, 10, 10, 10, 8] and sorted(sum(picks, [])) == list(range(n))
    picks.clear()
    for _ in range(5):  # the auxiliary stream: the same passes, one batch at a time ...
        batches.sample(gen)
    assert sorted(sum(picks, [])) == list(range(n))
    batches.sample(gen)
    resumed = BatchSampler(source, 10)  # ... and a resumed stream continues the pass
    resumed.load_state_dict(batches.state_dict())
    assert resumed.pending == batches.pending and len(resumed.pending) == 4
    assert BatchSampler(source, 10, min_batch=9)._pass(gen)[-1].__len__() == 10  # a remainder under min_batch: dropped
    with_replacement = BatchSampler(source, 48, "replacement")
    images, labels = with_replacement.sample(torch.Generator().manual_seed(0))
    assert labels.shape == (48,)


def test_small_classes_are_padded_by_repetition(tmp_path, tiny_root):
    from cross_domain_fewshot.data import episode_classes
    from cross_domain_fewshot.train import build_parser, sampler_for
    assert build_parser().parse_args([]).small_classes == "pad"
    src = [str(p) for p in read_file_list(tiny_root / "cub" / "base.json").image_paths]
    labels = [0] * 3 + [1] * 6 + [2] * 60
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"label_names": ["a", "b", "c"], "image_names": (src * 2)[:69], "image_labels": labels}))
    fl = read_file_list(path)
    padded = episode_classes(fl, 3, 2, 3, pad_to=50)
    assert padded[0] == [0, 1, 2] * 16 + [0, 1] and len(padded[1]) == 50 and padded[2] == list(range(9, 69))
    assert episode_classes(fl, 3, 2, 3, pad_to=5)[0] == [0, 1, 2, 0, 1] and len(episode_classes(fl, 3, 2, 3, 5)[1]) == 6
    assert list(episode_classes(fl, 1, 2, 3)) == [1, 2]  # without padding: the class of 3 images is left out
    with pytest.raises(DataError, match="only 2 classes have >= 5 images"):
        episode_classes(fl, 3, 2, 3)
    sampler = EpisodeSampler(ImageSource(fl, ImageTransform(8, False), cache=True), 3, 2, 3, pad_to=50)
    rows = [row for _ in range(4) for row in sampler.sample(torch.Generator().manual_seed(1)).indices]
    assert any(len(set(row)) < len(row) for row in rows)  # a padded class repeats images within a row
    # in training: 50 in single-domain loaders (pseudo-seen, validation), one row in multi-domain ones
    cfg = {"resolved_data_root": str(tiny_root), "data_root": None, "image_size": 8, "jitter_order": "fixed",
           "n_way": 5, "n_shot": 1, "n_query": 2, "small_classes": "pad"}
    assert {len(v) for v in sampler_for(cfg, "cars", "base", True).groups.values()} == {50}
    assert {len(v) for v in sampler_for(cfg, "cars", "base", True, multi_domain=True).groups.values()} == {8}
    assert {len(v) for v in sampler_for({**cfg, "small_classes": "drop"}, "cars", "base", True).groups.values()} == {8}


def test_colour_jitter_order_is_fixed_brightness_contrast_saturation(tiny_root):
    from cross_domain_fewshot.data import ImageTransform as Transform
    from cross_domain_fewshot.train import build_parser
    assert build_parser().parse_args([]).jitter_order == "fixed"
    img = load_image(read_file_list(tiny_root / "cub" / "base.json").image_paths[0]).float() / 255
    gray = lambda x: (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)  # noqa: E731 (PIL's "L")
    gen = torch.Generator().manual_seed(4)
    f = [0.6 + 0.8 * torch.rand((), generator=gen).item() for _ in range(3)]
    expected = (img * f[0]).clamp(0, 1)                                                      # Brightness
    expected = (gray(expected).mean() + f[1] * (expected - gray(expected).mean())).clamp(0, 1)  # Contrast
    expected = (gray(expected) + f[2] * (expected - gray(expected))).clamp(0, 1)               # Color
    out = Transform(40, True)._jitter(img, torch.Generator().manual_seed(4))
    assert torch.allclose(out, expected, atol=1e-6)
    # "random": the order is a permutation drawn first, then the factors
    perm = torch.randperm(3, generator=torch.Generator().manual_seed(4)).tolist()
    assert perm != [0, 1, 2]
    assert not torch.allclose(Transform(40, True, "random")._jitter(img, torch.Generator().manual_seed(4)), out)
