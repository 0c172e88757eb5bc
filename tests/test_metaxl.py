"""MetaXL: PAN-X reader, label alignment, seqeval F1, RTN hypergradients, CLI smoke runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

os.environ["HF_HUB_OFFLINE"] = "1"

from common.results import load_checkpoint  # noqa: E402
from common.runtime import CLIError, DataError, run_cli  # noqa: E402
from metaxl import eval as metaxl_eval  # noqa: E402
from metaxl import train as metaxl_train  # noqa: E402
from metaxl.data import (IGNORE_INDEX, LABEL_TO_ID, LABELS, align_labels, build_vocab, collate, encode,  # noqa: E402
                         input_format, load_language, loader_batches, read_panx, split_batch, subsample,
                         word_level_tokenizer, write_synthetic_panx)
from metaxl.model import (RepresentationTransformation, StepConfig, build_optimizer, build_tagger,  # noqa: E402
                          evaluate, metaxl_evograd_meta_step, metaxl_meta_step, tagger_loss, tiny_config,
                          train_iteration, transformed, use_input_format)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------

def test_read_panx_strips_language_prefix_and_splits_sentences(tmp_path):
    path = tmp_path / "train"
    path.write_text("qu:Lima\tB-LOC\nqu:llaqta\tO\n\n\nqu:Ana\tB-PER\nqu:Quispe\tI-PER\n")
    assert read_panx(path, "qu") == [(["Lima", "llaqta"], ["B-LOC", "O"]), (["Ana", "Quispe"], ["B-PER", "I-PER"])]


@pytest.mark.parametrize("line", ["qu:Lima B-LOC", "qu:Lima\tB-XYZ", "\tO", "qu:Lima\tO\textra"])
def test_read_panx_rejects_malformed_line_with_its_number(tmp_path, line):
    path = tmp_path / "train"
    path.write_text(f"qu:a\tO\n{line}\n")
    with pytest.raises(DataError, match=r"train:2: malformed line"):
        read_panx(path, "qu")


def test_read_panx_empty_and_missing_files(tmp_path):
    (tmp_path / "empty").write_text("\n\n")
    with pytest.raises(DataError, match="holds no sentence"):
        read_panx(tmp_path / "empty")
    with pytest.raises(DataError, match="not found.*--data-root"):
        read_panx(tmp_path / "nope")


def test_synthetic_files_are_deterministic_and_read_back(tmp_path):
    sizes = {"en": {"train": 30}, "qu": {"train": 10, "dev": 5, "test": 5}}
    write_synthetic_panx(tmp_path / "a", "en", "qu", sizes)
    write_synthetic_panx(tmp_path / "b", "en", "qu", sizes)
    assert (tmp_path / "a/qu/train").read_bytes() == (tmp_path / "b/qu/train").read_bytes()
    target = load_language(tmp_path / "a", "qu")
    assert [len(target[s]) for s in ("train", "dev", "test")] == [10, 5, 5]
    assert len(load_language(tmp_path / "a", "en", ("train",))["train"]) == 30
    words, tags = target["train"][0]
    assert all(not w.startswith("qu:") for w in words) and any(t.startswith("B-") for t in tags)


# ---------------------------------------------------------------------------------------------
# sub-word alignment and F1
# ---------------------------------------------------------------------------------------------

def test_align_labels_first_subtoken_only():
    # <s> Lima(2 pieces) llaqta </s> Quispe(3 pieces) </s>
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert align_labels(word_ids, [5, 0, 1]) == [-100, 5, -100, 0, 1, -100, -100, -100]


def test_encode_aligns_with_a_real_wordpiece_tokenizer():
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "li": 4, "##ma": 5, "ana": 6, "##s": 7}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    (item,) = encode(tok, [(["lima", "anas", "ana"], ["B-LOC", "B-PER", "O"])], max_length=16)
    assert item.input_ids == [0, 4, 5, 6, 7, 6, 2]
    assert item.labels == [-100, LABEL_TO_ID["B-LOC"], -100, LABEL_TO_ID["B-PER"], -100, LABEL_TO_ID["O"], -100]
    (cut,) = encode(tok, [(["lima", "anas", "ana"], ["B-LOC", "B-PER", "O"])], max_length=4)
    assert cut.input_ids == [0, 4, 5, 2] and cut.n_words == 3


def test_collate_pads_with_ignored_labels():
    batch = collate(encode(word_level_tokenizer(build_vocab([(["a", "b"], ["O", "O"])])),
                           [(["a", "b"], ["O", "B-PER"]), (["a"], ["B-LOC"])], 8), pad_id=1)
    assert batch["input_ids"].tolist() == [[0, 4, 5, 2], [0, 4, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 0, 1, -100], [-100, 5, -100, -100]]


class _FixedTagger(torch.nn.Module):
    """Predicts fixed tags per token position (for checking evaluate's F1 bookkeeping)."""

    def __init__(self, tags_per_row):
        super().__init__()
        self.tags = tags_per_row

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(LABEL_TO_ID))
        for i, tags in enumerate(self.tags):
            for j, tag in enumerate(tags[: input_ids.shape[1] - 2]):  # words that fit between <s> and </s>
                logits[i, j + 1, LABEL_TO_ID[tag]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_evaluate_entity_f1_on_hand_made_cases():
    gold = [(["ana", "quispe", "in", "lima"], ["B-PER", "I-PER", "O", "B-LOC"]),
            (["bank", "of", "peru"], ["B-ORG", "I-ORG", "I-ORG"])]
    tok = word_level_tokenizer(build_vocab(gold))
    # sentence 1: PER right, LOC missed; sentence 2: ORG span cut short (wrong) -> 1 of 3 gold, 1 of 2 predicted
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "I-ORG", "O"]]
    scores = evaluate(_FixedTagger(predicted), tok, gold, max_length=16, batch_size=2, device=torch.device("cpu"))
    assert scores["precision"] == pytest.approx(50.0)
    assert scores["recall"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(40.0)
    # truncation to 2 words: cut-off words are predicted O, so LOC is missed and ORG is cut short
    perfect = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    assert evaluate(_FixedTagger(perfect), tok, gold, 16, 2, torch.device("cpu"))["f1"] == pytest.approx(100.0)
    cut = evaluate(_FixedTagger(perfect), tok, gold, 4, 2, torch.device("cpu"))  # 2 words fit
    assert cut["recall"] == pytest.approx(100 / 3) and cut["precision"] == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------
# RTN and the meta steps
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    sentences = [(["w%d" % (i % 7), "x%d" % (i % 5), "y"], ["B-PER", "I-PER", "O"] if i % 2 else ["O", "B-LOC", "O"])
                 for i in range(36)]
    tok = word_level_tokenizer(build_vocab(sentences))
    items = encode(tok, sentences, 16)
    batches = [collate(items[i:i + 12], 1) for i in (0, 12, 24)]
    model = build_tagger(tiny_config(len(tok), 16)).train()
    return model, batches


def test_rtn_shapes_gate_and_xavier_init():
    torch.manual_seed(0)
    rtn = RepresentationTransformation(8, 3)
    assert rtn.down.weight.shape == (3, 8) and rtn.up.weight.shape == (9, 3)
    assert torch.all(rtn.up.bias == 0) and torch.all(rtn.down.bias == 0)
    h = torch.randn(2, 5, 8)
    z = rtn.up(torch.relu(rtn.down(h)))
    assert torch.allclose(rtn(h), h + torch.sigmoid(z[..., 8:]) * z[..., :8], atol=1e-6)


def test_rtn_hook_changes_only_transformed_forward(tiny_setup):
    model, (source, _, _) = tiny_setup
    model.eval()
    rtn = RepresentationTransformation(model.config.hidden_size, 8)
    inputs = {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"]}
    with torch.no_grad():
        plain = model(**inputs).logits
        with transformed(model, rtn, 2):
            moved = model(**inputs).logits
        again = model(**inputs).logits
    model.train()
    assert torch.equal(plain, again) and not torch.allclose(plain, moved)
    with pytest.raises(CLIError, match="transfer_layer"):
        with transformed(model, rtn, 13):
            pass


@pytest.mark.parametrize("layer", [4, 2])
@pytest.mark.parametrize("method", ["metaxl", "metaxl_evograd"])
def test_meta_step_gives_rtn_gradient_and_leaves_main_model_unchanged(tiny_setup, method, layer):
    model, (source, target, meta) = tiny_setup
    torch.manual_seed(1)
    rtn = RepresentationTransformation(model.config.hidden_size, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if method == "metaxl":
        loss = metaxl_meta_step("second_order", model, rtn, source, target, meta, layer, inner_lr=0.5)
    else:
        loss = metaxl_evograd_meta_step("evograd", model, rtn, source, target, meta, layer,
                                        generator=torch.Generator().manual_seed(0))
    assert loss > 0
    for p in rtn.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n


def test_evograd_head_step_matches_manual_evograd(tiny_setup):
    """Running the encoder once and perturbing the head equals EvoGrad on the full forward."""
    from common.evograd import evograd_meta_loss
    from metaxl.model import tagger_loss, training_loss

    model, (source, target, meta) = tiny_setup
    model.eval()  # no dropout: both computations see the same features
    torch.manual_seed(2)
    rtn = RepresentationTransformation(model.config.hidden_size, 8)
    metaxl_evograd_meta_step("evograd", model, rtn, source, target, meta, 4,
                             generator=torch.Generator().manual_seed(5))
    fast = [p.grad.clone() for p in rtn.parameters()]
    rtn.zero_grad()
    head = {n: p.detach() for n, p in model.named_parameters() if n.startswith("classifier.")}
    val = evograd_meta_loss(head, lambda p: training_loss(model, source, target, rtn, 4, params=p),
                            lambda p: tagger_loss(model, meta, p), generator=torch.Generator().manual_seed(5))
    val.backward(inputs=list(rtn.parameters()))
    model.train()
    assert sum(g.abs().sum() for g in fast) > 1e-8  # the comparison is not 0 == 0
    for a, p in zip(fast, rtn.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# defaults that follow the MetaXL/EvoGrad code (CrossLingualLearningMetaXL/ in ondrejbohdal/evograd)
# ---------------------------------------------------------------------------------------------

def test_default_optimisers_are_adam_with_coupled_decay_and_the_rtn_schedule(tiny_setup):
    model, _ = tiny_setup
    args = metaxl_train.parse_args([])
    rtn = RepresentationTransformation(model.config.hidden_size, 8)
    optimizer, _, meta_optimizer, meta_scheduler = metaxl_train.build_optimizers(args, model, rtn, total_steps=100)
    for opt, lr in ((optimizer, 3e-5), (meta_optimizer, 1e-6)):
        assert type(opt) is torch.optim.Adam  # not AdamW
        (group,) = opt.param_groups
        assert group["weight_decay"] == 5e-4 and not group.get("decoupled_weight_decay", False)
        assert group["initial_lr"] == lr
    # RTN lr: linear warm-up over the first 10 % of the steps, then linear decay to 0 at the last
    lrs = []
    for _ in range(100):
        lrs.append(meta_optimizer.param_groups[0]["lr"])
        meta_optimizer.step()
        meta_scheduler.step()
    assert lrs[:10] == pytest.approx([1e-6 * (s + 1) / 10 for s in range(10)])
    assert lrs[10:] == pytest.approx([1e-6 * (100 - s) / 90 for s in range(10, 100)])
    const = metaxl_train.parse_args(["--meta_schedule", "constant"])
    _, _, _, flat = metaxl_train.build_optimizers(const, model, rtn, total_steps=100)
    assert flat.get_last_lr() == [1e-6]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_coupled_decay_moves_a_parameter_without_data_gradient_by_lr(name):
    """Adam: g = wd·θ only, so Adam's step is lr·sign(θ) whatever wd is; AdamW: θ ← θ(1 − lr·wd)."""
    theta = torch.nn.Parameter(torch.tensor([2.0, -0.5]))
    opt = build_optimizer(name, [theta], lr=0.01, weight_decay=5e-4)
    theta.grad = torch.zeros(2)  # an embedding row of a sub-token absent from the batch
    opt.step()
    expected = [1.99, -0.49] if name == "adam" else [2.0 * (1 - 0.01 * 5e-4), -0.5 * (1 - 0.01 * 5e-4)]
    assert theta.detach().tolist() == pytest.approx(expected, abs=1e-6)


def test_target_batch_is_split_six_six_for_meta_methods_and_whole_for_joint_training():
    vocab = build_vocab([(["w%d" % i for i in range(30)], ["O"] * 30)])
    tok = word_level_tokenizer(vocab)
    sentences = [(["w%d" % j for j in range(i % 5 + 1)], ["O"] * (i % 5 + 1)) for i in range(24)]
    batches = [collate(encode(tok, sentences[i:i + 12], 16), 1) for i in (0, 12)]
    first, meta = metaxl_train.target_batches(iter(batches), "half", meta=True)
    assert first["input_ids"].shape[0] == 6 and meta["input_ids"].shape[0] == 6
    assert torch.equal(first["labels"], batches[0]["labels"][:6, : first["labels"].shape[1]])
    assert torch.equal(meta["input_ids"], batches[0]["input_ids"][6:, : meta["input_ids"].shape[1]])
    for part in (first, meta):  # cut to the longest row of the part
        assert part["attention_mask"][:, -1].any()
    whole, none = metaxl_train.target_batches(iter(batches), "half", meta=False)
    assert whole["input_ids"].shape[0] == 12 and none is None
    a, b = metaxl_train.target_batches(iter(batches), "independent", meta=True)
    assert torch.equal(a["input_ids"], batches[0]["input_ids"]) and torch.equal(b["input_ids"], batches[1]["input_ids"])
    assert metaxl_train.parse_args([]).target_split == "half"
    with pytest.raises(ValueError, match="non-empty"):
        split_batch(batches[0], 12)


def test_training_feeds_six_target_and_six_meta_sentences(tmp_path, monkeypatch):
    seen = []

    def record(method, model, rtn, opt, sched, meta_opt, source, target, meta, cfg, generator=None, meta_sched=None):
        seen.append((method, source["input_ids"].shape[0], target["input_ids"].shape[0],
                     None if meta is None else meta["input_ids"].shape[0], cfg.candidate_encoder))
        return {"train_loss": 1.0, "meta_loss": 1.0}

    monkeypatch.setattr(metaxl_train, "train_iteration", record)
    argv = [a for a in TINY_RUN] + ["--out", str(tmp_path), "--methods", "joint_training", "metaxl_evograd"]
    argv[argv.index("--batch_size") + 1] = "12"
    metaxl_train.main(argv)
    assert seen == [("joint_training", 12, 12, None, "per_candidate"), ("joint_training", 12, 12, None, "per_candidate"),
                    ("metaxl_evograd", 12, 6, 6, "per_candidate"), ("metaxl_evograd", 12, 6, 6, "per_candidate")]


def _sentences(n):
    return [([f"s{i}"], ["O"]) for i in range(n)]


def test_subsample_is_the_seeded_random_draw_of_the_metaxl_code():
    import numpy as np

    pool = _sentences(50)
    picked = subsample(pool, 10)  # defaults: random, seed 42
    np.random.seed(42)  # the MetaXL code's recipe (mtrain.py read_data), global NumPy RNG
    reference = [pool[i] for i in np.random.choice(np.arange(0, 50), 10, replace=False)]
    assert picked == reference and picked != pool[:10]
    assert subsample(pool, 10) == picked and subsample(pool, 10, seed=43) != picked
    assert subsample(pool, 10, "first") == pool[:10]
    assert subsample(pool, 80) == pool  # all of them, in file order
    with pytest.raises(ValueError, match="subsampling"):
        subsample(pool, 10, "last")


def test_load_data_subsamples_the_same_sentences_in_every_run(tmp_path):
    write_synthetic_panx(tmp_path, "en", "qu", {"en": {"train": 40}, "qu": {"train": 30, "dev": 5, "test": 5}})
    args = metaxl_train.parse_args(["--data-root", str(tmp_path), "--train_size", "10", "--target_train_size", "8",
                                    "--targets", "qu"])
    runs = [metaxl_train.load_data(args, "qu", tmp_path) for _ in range(2)]
    assert runs[0]["source"] == runs[1]["source"] and runs[0]["target"] == runs[1]["target"]
    full = load_language(tmp_path, "qu")
    assert runs[0]["target"] == subsample(full["train"], 8, "random", 42) != full["train"][:8]
    assert len(runs[0]["source"]) == 10 and len(set(map(str, runs[0]["source"]))) == 10


class _CountCalls:
    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


@pytest.mark.parametrize("encoder, passes", [("per_candidate", 2 * 3 + 1), ("shared", 3)])
def test_candidate_encoder_passes(encoder, passes):
    torch.manual_seed(0)
    sentences = [(["a", "b", "c"], ["B-PER", "I-PER", "O"])] * 18
    tok = word_level_tokenizer(build_vocab(sentences))
    source, target, meta = (collate(encode(tok, sentences[:k], 8), 1) for k in (6, 6, 6))
    model = build_tagger(tiny_config(len(tok), 8)).train()
    calls = _CountCalls(model.roberta)
    rtn = RepresentationTransformation(model.config.hidden_size, 4)
    metaxl_evograd_meta_step("evograd", model, rtn, source, target, meta, 4, candidate_encoder=encoder,
                             n_candidates=3, generator=torch.Generator().manual_seed(0))
    assert calls.n == passes  # K x (source, target) + meta, or source + target + meta


def test_candidate_encoders_agree_without_dropout_and_differ_with_it(tiny_setup):
    model, (source, target, meta) = tiny_setup
    rtn = RepresentationTransformation(model.config.hidden_size, 8)
    grads = {}
    for mode in ("eval", "train"):
        getattr(model, mode)()
        for encoder in ("per_candidate", "shared"):
            rtn.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            metaxl_evograd_meta_step("evograd", model, rtn, source, target, meta, 4, candidate_encoder=encoder,
                                     generator=torch.Generator().manual_seed(1))
            grads[mode, encoder] = torch.cat([p.grad.flatten() for p in rtn.parameters()])
    model.train()
    assert torch.allclose(grads["eval", "per_candidate"], grads["eval", "shared"], rtol=1e-5, atol=1e-10)
    assert not torch.allclose(grads["train", "per_candidate"], grads["train", "shared"], rtol=1e-2)
    assert metaxl_train.parse_args([]).candidate_encoder == "per_candidate"


# ---------------------------------------------------------------------------------------------
# CLI smoke tests
# ---------------------------------------------------------------------------------------------

def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EVOGRAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def test_train_help_and_bad_arguments_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as help_exit:
        metaxl_train.main(["--help"])
    assert help_exit.value.code == 0 and "--bottle_size" in capsys.readouterr().out
    for argv, message in ((["--quick", "--transfer_layer", "20", "--methods", "metaxl"], "transfer_layer must be in 0..4"),
                          (["--quick", "--data-root", str(tmp_path / "no_panx")], "not found"),
                          (["--quick", "--warmup_ratio", "1.5"], "warmup_ratio"),
                          (["--quick", "--batch_size", "1"], "--target_split half needs --batch_size >= 2"),
                          (["--quick", "--meta_weight_decay", "-1"], "--meta_weight_decay: must be >= 0")):
        with pytest.raises(SystemExit) as bad_exit:
            run_cli(metaxl_train.main, [*argv, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert bad_exit.value.code == 2 and message in err and err.strip().count("\n") == 0, err
    no_ckpt = _run("metaxl.eval", "--checkpoint", str(tmp_path / "none.pt"))  # the real entry point
    assert no_ckpt.returncode == 2 and "no checkpoint" in no_ckpt.stderr


TINY_RUN = ["--model", "tiny", "--train_size", "24", "--target_train_size", "12", "--epochs", "1", "--batch_size", "6",
            "--lr", "1e-3", "--meta_lr", "1e-3", "--bottle_size", "8", "--max_seq_length", "32",
            "--eval_max_seq_length", "32", "--transfer_layer", "4", "--targets", "qu", "--seed", "3", "--no_figures"]


def test_tiny_run_of_each_method_writes_valid_results_and_eval_reads_checkpoint(tmp_path):
    metaxl_train.main([*TINY_RUN, "--out", str(tmp_path)])
    for method in ("joint_training", "metaxl", "metaxl_evograd"):
        record = json.loads((tmp_path / f"metaxl_synthetic-en-qu-tiny_{method}_seed3.json").read_text())
        assert record["method"] == method and record["seed"] == 3 and record["config"]["target"] == "qu"
        assert 0 <= record["metrics"]["test_f1"] <= 100 and record["metrics"]["best_epoch"] == 1
        assert record["efficiency"]["meta_step_s"] > 0 and record["config"]["n_source_sentences"] == 24
        config = record["config"]
        assert (config["optimizer"], config["weight_decay"], config["meta_weight_decay"], config["meta_schedule"],
                config["target_split"], config["subsample"], config["data_seed"], config["candidate_encoder"]) == (
            "adam", 5e-4, 5e-4, "warmup_linear", "half", "random", 42, "per_candidate")
    ckpt = tmp_path / "checkpoints" / "metaxl_synthetic-en-qu-tiny_metaxl_evograd_seed3.pt"
    state = load_checkpoint(ckpt)
    for name in ("optimizer", "meta_optimizer"):  # what the run really used, as saved with the model
        (group,) = state[name]["param_groups"]
        assert group["weight_decay"] == 5e-4 and not group.get("decoupled_weight_decay", False)
    assert state["meta_scheduler"]["last_epoch"] == 4  # 24 source sentences / batch 6, one epoch
    scores = metaxl_eval.main(["--checkpoint", str(ckpt), "--split", "test", "--out", str(tmp_path / "eval.json")])
    assert scores["f1"] == pytest.approx(record["metrics"]["test_f1"])
    assert json.loads((tmp_path / "eval.json").read_text())["f1"] == pytest.approx(scores["f1"])


def test_resume_continues_from_the_epoch_checkpoint(tmp_path, capsys, monkeypatch):
    argv = [*TINY_RUN, "--methods", "metaxl_evograd", "--out", str(tmp_path), "--epochs", "2"]
    real_save = metaxl_train.save_checkpoint

    def save_then_stop(*args, **kwargs):  # a run killed after its first epoch's checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(metaxl_train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        metaxl_train.main(argv)
    monkeypatch.setattr(metaxl_train, "save_checkpoint", real_save)
    metaxl_train.main([*argv, "--resume"])
    assert "resumed metaxl_evograd seed 3" in capsys.readouterr().out
    record = json.loads((tmp_path / "metaxl_synthetic-en-qu-tiny_metaxl_evograd_seed3.json").read_text())
    assert [h["epoch"] for h in record["metrics"]["history"]] == [1, 2]
    assert record["efficiency"]["resumed_at_epoch"] == 1


def test_candidate_study_smoke_and_bad_input(tmp_path, capsys):
    from metaxl import candidate_study

    out = tmp_path / "study.json"
    result = candidate_study.main(["--draws", "2", "--warm_steps", "1", "--out", str(out)])
    assert json.loads(out.read_text())["draws"] == 2 and result["rtn_parameters"] == 64 * 32 + 32 + 32 * 65 + 65
    assert -1 <= result["paired_cosine_mean"] <= 1 and result["train_loss_spread"]["dropout"] > 0
    assert result["mean_norm_relative_to_per_candidate"]["per_candidate"] == pytest.approx(1.0)
    with pytest.raises(SystemExit) as bad:
        run_cli(candidate_study.main, ["--draws", "1"])
    assert bad.value.code == 2 and "--draws must be >= 2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the authors' input, joint loss, target batches and evaluation alignment
# ---------------------------------------------------------------------------------------------

def _positions_seen(model, batch):
    seen = []
    handle = model.roberta.embeddings.position_embeddings.register_forward_hook(
        lambda _mod, inputs, _out: seen.append(inputs[0].clone()))
    try:
        tagger_loss(model, batch)
    finally:
        handle.remove()
    return seen[0]


def test_authors_input_format_is_the_default_with_unk_specials_pad_0_and_positions_from_0():
    sentences = [(["ana", "in", "lima"], ["B-PER", "O", "B-LOC"]), (["lima"], ["B-LOC"])]
    tok = word_level_tokenizer(build_vocab(sentences))
    assert metaxl_train.parse_args([]).input_format == "authors"
    authors = input_format(tok, "authors")
    unk = tok.unk_token_id
    # [CLS], [SEP] and [OOV] are not in the vocabulary (nor in XLM-R's): all three become <unk>
    assert (authors.start_id, authors.end_id, authors.empty_word_id, authors.pad_id) == (unk, unk, unk, 0)
    items = encode(tok, sentences, 16, authors)
    assert items[0].input_ids == [unk, tok.convert_tokens_to_ids("ana"), tok.convert_tokens_to_ids("in"),
                                  tok.convert_tokens_to_ids("lima"), unk]
    assert items[0].labels == [IGNORE_INDEX, LABEL_TO_ID["B-PER"], 0, LABEL_TO_ID["B-LOC"], IGNORE_INDEX]
    batch = collate(items, authors)
    assert batch["input_ids"][1].tolist() == [unk, tok.convert_tokens_to_ids("lima"), unk, 0, 0]  # pad id 0
    assert batch["position_ids"].tolist() == [list(range(5))] * 2
    # truncation cuts the whole sequence, [SEP] included, as the authors' tokenizer does
    assert encode(tok, sentences[:1], 3, authors)[0].input_ids == items[0].input_ids[:3]
    # xlmr: <s> ... </s>, pad id 1, no explicit positions (the model counts from padding_idx + 1 = 2)
    xlmr = input_format(tok, "xlmr")
    plain = collate(encode(tok, sentences, 16, xlmr), xlmr)
    assert plain["input_ids"][1].tolist() == [0, tok.convert_tokens_to_ids("lima"), 2, 1, 1]
    assert "position_ids" not in plain
    model = build_tagger(tiny_config(len(tok), 16)).eval()
    assert _positions_seen(model, batch)[0].tolist() == [0, 1, 2, 3, 4]
    assert _positions_seen(model, plain)[0].tolist() == [2, 3, 4, 5, 6]
    assert _positions_seen(model, plain)[1].tolist() == [2, 3, 4, 1, 1]
    # the authors' position 1 (the first word) trains: RoBERTa's pad position row is freed
    use_input_format(model, authors)
    model.train()
    tagger_loss(model, batch).backward()
    assert model.roberta.embeddings.position_embeddings.weight.grad[1].abs().sum() > 0


def test_joint_loss_is_the_halved_sum_without_clipping_by_default(tiny_setup):
    model, batches = tiny_setup
    assert metaxl_train.parse_args([]).joint_loss == "half" and StepConfig().joint_loss == "half"
    grads = {}
    for joint_loss in ("half", "sum_clipped"):
        clone = build_tagger(tiny_config(model.config.vocab_size, 16)).eval()
        clone.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(clone.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        cfg = StepConfig(transfer_layer=4, max_grad_norm=1e-3, joint_loss=joint_loss)
        out = train_iteration("joint_training", clone, None, opt, sched, None, batches[0], batches[1], None, cfg)
        full = (tagger_loss(clone, batches[0]) + tagger_loss(clone, batches[1])).item()
        assert out["train_loss"] == pytest.approx(full / 2 if joint_loss == "half" else full, rel=1e-5)
        grads[joint_loss] = torch.cat([p.grad.flatten() for p in clone.parameters() if p.grad is not None])
    total = grads["half"].norm()
    assert total > 1e-2  # not clipped to 1e-3
    clone = build_tagger(tiny_config(model.config.vocab_size, 16)).eval()
    clone.load_state_dict(model.state_dict())
    (tagger_loss(clone, batches[0]) + tagger_loss(clone, batches[1])).mul(0.5).backward()
    expected = torch.cat([p.grad.flatten() for p in clone.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["half"], expected, rtol=1e-4, atol=1e-7)
    assert grads["sum_clipped"].norm() == pytest.approx(1e-3, rel=1e-3)


def test_short_target_batches_reiterate_the_shuffled_loader_without_drop_last():
    assert metaxl_train.parse_args([]).target_batches == "loader"
    items = encode(word_level_tokenizer(build_vocab(_sentences(100))), _sentences(100), 8)
    stream = loader_batches(items, 12, seed=3, pad=1)
    sizes, passes, current = [], [], []
    for _ in range(27):
        batch = next(stream)
        sizes.append(batch["input_ids"].shape[0])
        current += batch["input_ids"][:, 1].tolist()
        if len(current) == 100:
            passes.append(current)
            current = []
    assert sizes == ([12] * 8 + [4]) * 3  # 8 full batches and one of 4, then a new pass
    assert all(sorted(p) == sorted(passes[0]) for p in passes) and len(set(passes[0])) == 100
    assert passes[0] != passes[1]  # reshuffled every pass
    resumed = loader_batches(items, 12, seed=3, pad=1, start=10)  # resumes inside the second pass
    fresh = loader_batches(items, 12, seed=3, pad=1)
    for _ in range(10):
        next(fresh)
    for _ in range(12):
        assert torch.equal(next(resumed)["input_ids"], next(fresh)["input_ids"])
    # the short batch of 4 is split 2/2 for the meta methods; a batch of one sentence skips the iteration
    short = collate(items[:4], 1)
    first, meta = metaxl_train.target_batches(iter([short]), "half", meta=True)
    assert (first["input_ids"].shape[0], meta["input_ids"].shape[0]) == (2, 2)
    assert metaxl_train.target_batches(iter([collate(items[:1], 1)]), "half", meta=True) == (None, None)


class _IdTagger(torch.nn.Module):
    """Predicts the tag stored for each input id (an id without one: O)."""

    def __init__(self, tag_of_id):
        super().__init__()
        self.tag_of_id = tag_of_id

    def forward(self, input_ids, attention_mask, position_ids=None):
        logits = torch.zeros(*input_ids.shape, len(LABELS))
        for (i, j), token in zip(torch.cartesian_prod(torch.arange(input_ids.shape[0]),
                                                      torch.arange(input_ids.shape[1])).tolist(),
                                 input_ids.flatten().tolist()):
            logits[i, j, LABEL_TO_ID[self.tag_of_id.get(token, "O")]] = 1.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("name", ["authors", "xlmr"])
def test_a_word_without_sub_tokens_keeps_later_predictions_aligned(name):
    # " " has no sub-token under whitespace splitting (as a zero-width or control character under XLM-R's)
    gold = [(["ana", " ", "quispe", "in", "lima"], ["B-PER", "O", "B-PER", "O", "B-LOC"])]
    tok = word_level_tokenizer(build_vocab([(["ana", "quispe", "in", "lima"], ["O"] * 4)]))
    assert tok([" "], add_special_tokens=False)["input_ids"] == [[]]
    fmt = input_format(tok, name)
    item = encode(tok, gold, 16, fmt)[0]
    if name == "authors":  # the empty word stands as [OOV] (<unk>) and keeps its label
        assert item.input_ids[2] == tok.unk_token_id and item.labels[2] == LABEL_TO_ID["O"]
        assert item.label_words == [0, 1, 2, 3, 4]
    else:
        assert item.label_words == [0, 2, 3, 4]
    tagger = _IdTagger({tok.convert_tokens_to_ids(w): t for w, t in zip(*gold[0]) if w != " "})
    assert evaluate(tagger, tok, gold, 16, 1, torch.device("cpu"), fmt)["f1"] == pytest.approx(100.0)
