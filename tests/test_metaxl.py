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

from common.runtime import CLIError, DataError, run_cli  # noqa: E402
from metaxl import eval as metaxl_eval  # noqa: E402
from metaxl import train as metaxl_train  # noqa: E402
from metaxl.data import (IGNORE_INDEX, LABEL_TO_ID, align_labels, build_vocab, collate, encode,  # noqa: E402
                         load_language, read_panx, word_level_tokenizer, write_synthetic_panx)
from metaxl.model import (RepresentationTransformation, build_tagger, evaluate, metaxl_evograd_meta_step,  # noqa: E402
                          metaxl_meta_step, tiny_config, transformed)

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
    from common.evograd import evograd_meta_loss, functional_forward
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
    for a, p in zip(fast, rtn.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-9)
    assert functional_forward  # imported helper used by training_loss


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
                          (["--quick", "--warmup_ratio", "1.5"], "warmup_ratio")):
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
    ckpt = tmp_path / "checkpoints" / "metaxl_synthetic-en-qu-tiny_metaxl_evograd_seed3.pt"
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
