"""Bad input, table-driven: every row is (entry point, argv, expected exit status, expected words).

Each row runs the entry point's ``main`` in this process through ``common.runtime.run_cli``, as
``python -m <entry point> <argv>`` would, and checks that:

* the exit status is the expected one (2 for bad input, 0 where the tool warns and carries on);
* stderr is exactly one line (no traceback, no usage block) holding every expected word;
* nothing was done first: no results file under ``{tmp}/out`` and no benchmark table printed.

A word starting with ``!`` must not be in the line (a hint given where it does not help).
``{tmp}`` in an argv is the folder of generated bad data (``bad_data`` below): damaged MNIST
``.gz``, CIFAR pickles with float pixels, out-of-range pixels or unknown classes, non-UTF-8 PAN-X
and few-shot file lists, a file list of the wrong types, broken and duplicated results files.
"""
from __future__ import annotations

import gzip
import importlib
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from common.results import save_checkpoint, write_results
from common.runtime import CLIError, run_cli

EFFICIENCY = {"meta_step_s": 0.5, "peak_mem_mb": 10.0, "device": "cpu"}
MWN = ["--quick", "--epochs", "1", "--methods", "baseline"]
FEWSHOT = ["--quick", "--data-root", "{tmp}/fewshot"]
PANX = ["--quick", "--data-root", "{tmp}/panx", "--train_size", "2", "--target_train_size", "1"]

CASES = [
    # --- the 1-D illustration: arguments that gave null metrics and a plotting traceback
    ("illustration_1d.train", ["--grid", "1"], 2, ["--grid", "must be >= 2"]),
    ("illustration_1d.train", ["--trials", "1"], 2, ["--trials", "must be >= 2"]),
    ("illustration_1d.train", ["--temperature", "1e-9"], 2, ["--temperature", "[1e-06, 1e+06]"]),
    ("illustration_1d.train", ["--temperature", "1e9"], 2, ["--temperature", "[1e-06, 1e+06]"]),
    ("illustration_1d.train", ["--sigma", "1000", "--temperature", "0.01"], 2,
     ["K = 2", "Pearson r is undefined", "nothing was written"]),
    ("illustration_1d.train", ["--resume", "--overwrite"], 2, ["--resume and --overwrite contradict"]),
    ("illustration_1d.train", ["--traj-lr", "1e6"], 2, ["trajectories diverged", "lower --traj-lr", "nothing was written"]),
    ("illustration_1d.train", ["--data-root", "{tmp}"], 2, ["--data-root is not used"]),
    ("illustration_1d.train", ["--seed", "-1"], 2, ["--seed", "must be >= 0"]),
    ("illustration_1d.eval", ["--results-file", "{tmp}/results_metrics_null/toy_evograd_seed2.json"], 2,
     ["toy_evograd_seed2.json", "is not an illustration_1d results file"]),
    # --- rotation
    ("rotation.train", ["--k", "1"], 2, ["--k/--n-candidates", "must be >= 2"]),
    ("rotation.train", ["--threads", "-1"], 2, ["--threads", "must be > 0"]),
    ("rotation.train", ["--seeds", "1", "-2"], 2, ["--seeds", "must be >= 0"]),
    ("rotation.train", ["--quick", "--seeds", "1", "2", "1"], 2, ["--seeds names seed 1 more than once", "pass it once"]),
    ("label_noise_mwn.train", [*MWN, "--seeds", "3", "3"], 2, ["--seeds names seed 3 more than once"]),
    ("rotation.train", ["--data-root", "{tmp}/mnist_damaged", "--method", "baseline"], 2,
     ["train-images-idx3-ubyte.gz", "cannot decompress", "download it again"]),
    # --- Meta-Weight-Net: optimiser settings, sizes against the data, CIFAR pickles
    ("label_noise_mwn.train", [*MWN, "--momentum", "-0.5"], 2, ["--momentum", "in [0, 1)"]),
    ("label_noise_mwn.train", [*MWN, "--vnet_momentum", "1.5"], 2, ["--vnet_momentum", "in [0, 1)"]),
    ("label_noise_mwn.train", [*MWN, "--weight_decay", "-1"], 2, ["--weight_decay", "must be >= 0"]),
    ("label_noise_mwn.train", [*MWN, "--vnet_weight_decay", "-1"], 2, ["--vnet_weight_decay", "must be >= 0"]),
    ("label_noise_mwn.train", [*MWN, "--threads", "-2"], 2, ["--threads", "must be > 0"]),
    ("label_noise_mwn.train", [*MWN, "--momentum", "0"], 2, ["--momentum 0 needs --no_nesterov"]),
    ("label_noise_mwn.train", [*MWN, "--milestones", "-3"], 2, ["--milestones", "must be > 0"]),
    ("label_noise_mwn.train", [*MWN, "--corruption_seed", "-1"], 2, ["--corruption_seed", "must be >= 0"]),
    ("label_noise_mwn.train", [*MWN, "--n_candidates", "1"], 2, ["--n_candidates", "must be >= 2"]),
    ("label_noise_mwn.train", [*MWN, "--train_size", "100000"], 2,
     ["--train_size 100000 is larger than the 4186 noisy training images", "--num_meta 100"]),
    ("label_noise_mwn.train", [*MWN, "--num_meta", "4280"], 2, ["--num_meta 4280", "428 clean images per class"]),
    ("label_noise_mwn.train", ["--dataset", "cifar10", "--data-root", "{tmp}/cifar_float", "--out", "{tmp}/out"], 2,
     ["data_batch_1", "pixel data of type float64", "expected integers 0..255"]),
    ("label_noise_mwn.train", ["--dataset", "cifar10", "--data-root", "{tmp}/cifar_range", "--out", "{tmp}/out"], 2,
     ["data_batch_1", "pixel values in 300..300", "expected 0..255"]),
    ("label_noise_mwn.train", ["--dataset", "cifar10", "--data-root", "{tmp}/cifar_classes", "--out", "{tmp}/out"], 2,
     ["test_batch", "labels in 3..12 name unknown classes", "0..9"]),
    ("label_noise_mwn.train", ["--dataset", "cifar10", "--data-root", "{tmp}/cifar_foreign", "--out", "{tmp}/out"], 2,
     ["data_batch_1 is not an official CIFAR pickle", "no_such_module_here", "download the archive again"]),
    ("label_noise_mwn.eval", ["{tmp}/rotation.pt"], 2,
     ["rotation.pt is not a label_noise_mwn checkpoint", "['base_channels', 'data_root', 'dataset'", "another experiment's"]),
    ("label_noise_mwn.eval", ["{tmp}/garbage.pt"], 2,
     ["garbage.pt is unreadable", "pass a checkpoint that python -m label_noise_mwn.train wrote"]),
    # --- cross-domain few-shot: arguments, then file lists read before any stage
    ("cross_domain_fewshot.train", ["--quick", "--n-candidates", "1"], 2, ["--n-candidates", "must be >= 2"]),
    ("cross_domain_fewshot.train", ["--quick", "--threads", "-1"], 2, ["--threads", "must be >= 0"]),
    ("cross_domain_fewshot.train", ["--quick", "--fwt-weight-decay", "-1"], 2, ["--fwt-weight-decay", "must be >= 0"]),
    ("cross_domain_fewshot.train", ["--quick", "--aux-weight", "-1"], 2, ["--aux-weight", "must be >= 0"]),
    ("cross_domain_fewshot.train", ["--quick", "--n-way", "1"], 2, ["--n-way", "must be >= 2"]),
    ("cross_domain_fewshot.train", [*FEWSHOT, "--testset", "cars"], 2, ["cars", "novel.json", "not UTF-8", "!queries"]),
    ("cross_domain_fewshot.train", [*FEWSHOT, "--testset", "places"], 2,
     ["places", "novel.json", "image_names must be a list of strings", "found 5", "!queries"]),
    ("cross_domain_fewshot.train", [*FEWSHOT, "--testset", "plantae"], 2,
     ["plantae", "novel.json", "image_labels must be a list of integers", "found 'a'", "!queries"]),
    ("cross_domain_fewshot.train", ["--quick", "--data-root", "{tmp}/fewshot_sound", "--testset", "cub",
                                    "--test-queries", "11"], 2,
     ["cub", "novel.json", "only 0 classes have >= 16 images", "--test-queries 11 queries per class: lower it"]),
    ("cross_domain_fewshot.train", [*FEWSHOT, "--testset", "cub"], 2, ["cub", "novel.json", "not found"]),
    ("cross_domain_fewshot.train", [*FEWSHOT, "--stage", "train", "--n-way", "6"], 2,
     ["only 5 classes have images", "6-way"]),
    # --- MetaXL: every target's data before the first trains
    ("metaxl.train", [*PANX, "--targets", "qu", "gn"], 2, ["gn", "not found"]),
    ("metaxl.train", [*PANX, "--targets", "qu", "--train_size", "5"], 2,
     ["--train_size 5 is larger than the 2 training sentences of en"]),
    ("metaxl.train", [*PANX, "--targets", "qu", "--target_train_size", "3"], 2,
     ["--target_train_size 3 is larger than the 1 training sentences of qu"]),
    ("metaxl.train", [*PANX, "--targets", "qu", "mi"], 2, ["dev-mi.tsv:2", "not UTF-8"]),
    ("metaxl.train", ["--quick", "--weight_decay", "-1"], 2, ["--weight_decay", "must be >= 0"]),
    ("metaxl.train", ["--quick", "--n_candidates", "1"], 2, ["--n_candidates", "must be >= 2"]),
    ("metaxl.train", ["--quick", "--transfer_layer", "-1"], 2, ["--transfer_layer", "must be >= 0"]),
    ("metaxl.train", ["--quick", "--warmup_ratio", "1"], 2, ["--warmup_ratio", "in [0, 1)"]),
    ("metaxl.train", ["--quick", "--methods", "metaxl_evograd", "--evograd_estimator", "evograd_batched"], 2,
     ["--evograd_estimator evograd_batched cannot run MetaXL", "dropout", "evograd_low_memory"]),
    ("metaxl.train", ["--quick", "--fsdp", "--methods", "metaxl"], 2,
     ["--fsdp: metaxl with --metaxl_estimator second_order", "cannot run on an FSDP-sharded model",
      "finite_difference"]),
    ("metaxl.train", ["--quick", "--fsdp", "--methods", "metaxl_evograd", "--candidate_encoder", "shared"], 2,
     ["--fsdp runs metaxl_evograd's encoder for every candidate", "--candidate_encoder shared"]),
    ("metaxl.train", ["--quick", "--fsdp", "--methods", "joint_training"], 2,
     ["--fsdp shards the model over processes", "torchrun"]),
    ("metaxl.train", ["--quick", "--train_size", "999999"], 2,
     ["--train_size 999999 is more than the embedded generated data", "20000 or less", "--data-root"]),
    ("metaxl.candidate_study", ["--out", "{tmp}/garbage.pt/study.json"], 2, ["--out", "garbage.pt", "is a file"]),
    ("metaxl.candidate_study", ["--out", "{tmp}"], 2, ["--out", "is a folder", "pass a file name"]),
    ("common.memory_model", ["{tmp}/no_such_bench.json"], 2, ["no_such_bench.json", "not a common.bench --out file"]),
    # --- the hypergradient study: shared flags it does not use
    ("common.hypergrad_study", ["--quick", "--seeds", "1", "2"], 2, ["one seed", "--seeds [1, 2]"]),
    ("common.hypergrad_study", ["--quick", "--resume", "--overwrite"], 2, ["--resume and --overwrite contradict"]),
    ("common.hypergrad_study", ["--quick", "--data-root", "{tmp}"], 2, ["--data-root is not used"]),
    ("common.hypergrad_study", ["--quick", "--draws", "0"], 2, ["--draws", "must be > 0"]),
    ("common.hypergrad_study", ["--from-json", "{tmp}/results_truncated/b/toy_evograd_seed2.json"], 2,
     ["--from-json", "toy_evograd_seed2.json is not readable JSON", "study.json files"]),
    ("common.hypergrad_study", ["--from-json", "{tmp}/results_no_env/toy_evograd_seed1.json"], 2,
     ["--from-json", "toy_evograd_seed1.json is a results file", "study.json files"]),
    # --- the GPU benchmark: --out checked before the plan runs
    ("common.gpu_bench", ["--device", "cpu", "--quick", "--out", "{tmp}/garbage.pt"], 2, ["--out", "is a file"]),
    ("common.gpu_bench", ["--device", "cpu", "--quick", "--out", "{tmp}/garbage.pt/below"], 2,
     ["--out", "garbage.pt", "not a writable folder"]),
    # --- benchmarks: every request checked before the first runs
    ("common.bench", ["rotation", "illustration_1d", "--config", "2", "--methods", "evograd", "second_order",
                      "--no-memory", "--reps", "1", "--warmup", "0"], 2,
     ["--config [2] out of range for illustration_1d", "0..1"]),
    ("common.bench", ["illustration_1d", "metaxl", "--quick", "--methods", "evograd", "--no-memory", "--reps", "1",
                      "--warmup", "0"], 2, ["benchmark metaxl has no method(s) ['evograd']"]),
    # --- the report: broken files named and skipped, runs counted once
    ("common.report", ["{tmp}/results_truncated"], 0, ["results_truncated", "truncated JSON"]),
    ("common.report", ["{tmp}/results_not_utf8"], 0, ["results_not_utf8", "not UTF-8"]),
    ("common.report", ["{tmp}/results_metrics_null"], 0, ["toy_evograd_seed2.json", "metrics is null"]),
    ("common.report", ["{tmp}/results_no_env"], 0, ["toy_evograd_seed3.json", "results file without ['env']"]),
    ("common.report", ["{tmp}/results_twice"], 0, ["copy", "same run as", "seed 2", "counting it once"]),
    ("common.report", ["{tmp}/empty"], 2, ["no results files"]),
    ("common.report", [], 2, ["the following arguments are required: results_dir"]),
]


NO_OUT = ("common.report", "common.bench", "label_noise_mwn.eval", "common.memory_model")  # entry points without --out


# ---------------------------------------------------------------------------------------------
# generated bad data
# ---------------------------------------------------------------------------------------------

def _damaged_gzip(path: Path) -> None:
    """A gzip file whose header is sound but whose deflate stream is not (reserved block type)."""
    payload = bytearray(gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 60000, 28, 28) + bytes(4096)))
    payload[10:30] = b"\xff" * 20
    path.write_bytes(bytes(payload))


def _cifar(root: Path, data: np.ndarray, labels: list, test_labels: list | None = None) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    good = np.zeros((2, 3072), np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = ({b"data": data, b"labels": labels} if name == "data_batch_1" else
                 {b"data": good, b"labels": test_labels if name == "test_batch" and test_labels else [0, 1]})
        with (base / name).open("wb") as handle:
            pickle.dump(entry, handle)


def _file_list(path: Path, n_classes: int = 5, per_class: int = 11, **override) -> None:
    """A few-shot file list with empty image files (lists are checked, images not read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"img/{c}_{i}.jpg" for c in range(n_classes) for i in range(per_class)]
    (path.parent / "img").mkdir(exist_ok=True)
    for name in names:
        (path.parent / name).touch()
    content = {"label_names": [f"class{c}" for c in range(n_classes)], "image_names": names,
               "image_labels": [c for c in range(n_classes) for _ in range(per_class)], **override}
    path.write_text(json.dumps(content))


def _results(folder: Path, seed: int = 1, **fields) -> Path:
    return write_results(folder, experiment="toy", method="evograd", seed=seed, config={},
                         metrics={"acc": 90.0 + seed}, efficiency=EFFICIENCY, **fields)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_data")
    (tmp / "mnist_damaged").mkdir()
    _damaged_gzip(tmp / "mnist_damaged" / "train-images-idx3-ubyte.gz")

    _cifar(tmp / "cifar_float", np.full((2, 3072), 0.5), [0, 1])
    _cifar(tmp / "cifar_range", np.full((2, 3072), 300, np.int64), [0, 1])
    _cifar(tmp / "cifar_classes", np.zeros((2, 3072), np.uint8), [0, 1], test_labels=[3, 12])
    _cifar(tmp / "cifar_foreign", np.zeros((2, 3072), np.uint8), [0, 1])
    (tmp / "cifar_foreign" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"cno_such_module_here\nThing\n.")

    fewshot = tmp / "fewshot"
    for domain in ("miniImagenet", "cub", "cars", "places", "plantae"):
        _file_list(fewshot / domain / "base.json")
    _file_list(fewshot / "miniImagenet" / "val.json")
    (fewshot / "cars" / "novel.json").write_bytes(b'{"label_names": ["caf\xe9"]}')   # Latin-1, not UTF-8
    _file_list(fewshot / "places" / "novel.json", image_names=5)
    _file_list(fewshot / "plantae" / "novel.json", image_labels=["a"])                 # cub/novel.json: none
    for domain in ("miniImagenet", "cub", "cars", "places", "plantae"):               # sound lists, small classes
        _file_list(tmp / "fewshot_sound" / domain / "base.json")
    _file_list(tmp / "fewshot_sound" / "miniImagenet" / "val.json")
    _file_list(tmp / "fewshot_sound" / "cub" / "novel.json")

    panx = tmp / "panx"
    panx.mkdir()
    (panx / "train-en.tsv").write_text("en:John\tB-PER\nen:runs\tO\n\nen:Paris\tB-LOC\n")
    for lang in ("qu", "mi"):
        for split in ("train", "dev", "test"):
            (panx / f"{split}-{lang}.tsv").write_text(f"{lang}:Juan\tB-PER\n{lang}:x\tO\n")
    (panx / "dev-mi.tsv").write_bytes(b"mi:a\tO\nmi:caf\xe9\tO\n")                     # line 2 is Latin-1

    _results(tmp / "results_truncated" / "a")
    whole = _results(tmp / "results_truncated" / "b", seed=2)
    whole.write_text(whole.read_text()[:120])
    _results(tmp / "results_not_utf8")
    (tmp / "results_not_utf8" / "latin1.json").write_bytes(b'{"experiment": "caf\xe9"}')
    _results(tmp / "results_metrics_null")
    broken = _results(tmp / "results_metrics_null", seed=2)
    broken.write_text(json.dumps({**json.loads(broken.read_text()), "metrics": None}))
    _results(tmp / "results_no_env")
    broken = _results(tmp / "results_no_env", seed=3)
    broken.write_text(json.dumps({k: v for k, v in json.loads(broken.read_text()).items() if k != "env"}))
    first = _results(tmp / "results_twice", seed=2)
    (tmp / "results_twice" / "copy").mkdir()
    shutil.copy(first, tmp / "results_twice" / "copy" / first.name)
    (tmp / "empty").mkdir()
    save_checkpoint(tmp / "rotation.pt", {"model": {}, "transformer": {}}, {"lr": 1e-3, "width": 1, "seed": 1})
    (tmp / "garbage.pt").write_bytes(b"not a torch file")
    return tmp


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry,argv,code,words", CASES,
                         ids=[f"{e}:{' '.join(a)[:60]}" for e, a, _, _ in CASES])
def test_bad_input_is_one_line_and_a_status(entry, argv, code, words, bad_data, tmp_path, capsys):
    argv = [a.replace("{tmp}/out", str(tmp_path / "out")).replace("{tmp}", str(bad_data)) for a in argv]
    out = tmp_path / "out"
    if entry not in NO_OUT and "--out" not in argv:
        argv += ["--out", str(out)]
    main = importlib.import_module(entry).main
    with pytest.raises(SystemExit) as done:
        run_cli(main, argv)
        raise SystemExit(0)   # main returned normally
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert done.value.code == code, captured.err
    assert len(err_lines) == 1, captured.err                      # one line: no traceback, no usage
    assert all(word[1:] not in err_lines[0] if word.startswith("!") else word in err_lines[0]  # "!": absent
               for word in words), (words, err_lines[0])
    assert "### " not in captured.out                             # no benchmark table before the error
    assert not (out.exists() and list(out.rglob("*.json")))       # no results file before the error


def test_report_counts_a_run_found_twice_once(bad_data, capsys):
    """The duplicate row above warns; here the table shows one run per seed, not two (no ± 0.00)."""
    from common.report import main
    run_cli(main, [str(bad_data / "results_twice"), "--output", str(bad_data / "twice.md")])
    text = (bad_data / "twice.md").read_text()
    assert "1 runs." in text and "| evograd | 1 | 92.00 |" in text, text
    capsys.readouterr()


def test_rotation_quick_runs_the_seeds_asked_for(tmp_path, capsys, monkeypatch):
    """``--quick --seeds 1 2`` used to run seed 1 alone, silently; the default stays one seed."""
    from rotation import train

    def stop(*args, **kwargs):
        raise CLIError("stopped before training")
    monkeypatch.setattr(train, "train_run", stop)
    for argv, seeds in ((["--seeds", "1", "2"], "seeds [1, 2]"), ([], "seeds [1]")):
        with pytest.raises(SystemExit):
            run_cli(train.main, ["--quick", *argv, "--out", str(tmp_path)])
        assert seeds + "," in capsys.readouterr().out
