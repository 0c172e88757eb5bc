"""The runs contract of every trainer (README, "Runs, checkpoints and resume").

A finished run is never rewritten (refused without a flag, skipped by --resume, rerun by
--overwrite); --resume refuses a checkpoint written under other settings, naming the keys, and a
corrupt checkpoint, naming the file; an unwritable --out is refused before any work; a diverged
run stops with one line naming experiment, method, epoch and step, keeps its last good checkpoint
and writes no results file; files get the umask's mode; a killed and resumed run equals a straight one.
"""
from __future__ import annotations

import functools
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from common import bench, hypergrad_study
from common.evograd import check_scalar_loss
from common.results import (RunFileError, config_differences, load_checkpoint, remove_stale_temp_files,
                            restore_states, resume_checkpoint, save_checkpoint, write_results)
from common.runtime import CLIError, DivergenceGuard, NonFiniteLossError, finished_runs, run_cli
from cross_domain_fewshot import eval as fewshot_eval
from cross_domain_fewshot import train as fewshot_train
from cross_domain_fewshot.data import write_embedded_dataset
from label_noise_mwn import train as mwn_train
from metaxl import train as metaxl_train
from rotation import train as rotation_train

# ------------------------------------------------------------------ common functions


def test_config_differences_name_each_key_and_ignore_the_allowed_ones():
    saved = {"lr": 0.1, "sigma": 1e-3, "milestones": (40, 50), "threads": 1, "out": "a", "width": 1}
    current = {"lr": 0.5, "sigma": 0.1, "milestones": [40, 50], "threads": 4, "out": "b", "depth": 8, "width": 1}
    assert config_differences(saved, current) == ["depth (absent -> 8)", "lr (0.1 -> 0.5)", "sigma (0.001 -> 0.1)"]
    assert config_differences(saved, current, may_change={"lr", "sigma", "depth"}) == ["out (\"a\" -> \"b\")", "threads (1 -> 4)"]


def test_resume_checkpoint_refuses_other_settings_and_corrupt_files(tmp_path):
    path = tmp_path / "run.pt"
    assert resume_checkpoint(path, {"lr": 0.1}) is None  # nothing to resume: a fresh start
    save_checkpoint(path, {"epoch": 3}, {"lr": 0.1, "threads": 2})
    assert resume_checkpoint(path, {"lr": 0.1, "threads": 8})["epoch"] == 3
    with pytest.raises(RunFileError, match=r"lr \(0.1 -> 0.5\)") as info:
        resume_checkpoint(path, {"lr": 0.5, "threads": 2})
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    good = path.read_bytes()
    for bad, words in ((good[: len(good) // 2], "unreadable"), (b"", "empty"), (b"plain text", "unreadable")):
        path.write_bytes(bad)
        with pytest.raises(RunFileError, match=words) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "delete it" in str(info.value) and "\n" not in str(info.value)


def test_resume_refuses_a_checkpoint_of_another_number_of_processes(tmp_path, monkeypatch):
    from common import results
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"epoch": 1}, {"lr": 0.1})                 # one process
    monkeypatch.setattr(results, "process_count", lambda: 2)         # resumed by torchrun --nproc_per_node 2
    with pytest.raises(RunFileError, match=r"1 process\(es\), this one has 2: .*no torchrun"):
        resume_checkpoint(path, {"lr": 0.1})
    save_checkpoint(path, {"epoch": 2}, {"lr": 0.1})                 # written by 2 processes
    assert torch.load(path, weights_only=False)["config"]["processes"] == 2
    assert resume_checkpoint(path, {"lr": 0.1})["epoch"] == 2


def test_restore_states_turns_a_shape_mismatch_into_one_line(tmp_path):
    state = {"model": nn.Linear(3, 2).state_dict()}
    restore_states(state, {"model": nn.Linear(3, 2), "absent": None}, "c.pt")
    with pytest.raises(RunFileError, match=r"c\.pt does not fit this run \(model: RuntimeError") as info:
        restore_states(state, {"model": nn.Linear(4, 2)}, "c.pt")
    assert "\n" not in str(info.value)
    with pytest.raises(RunFileError, match="optimizer: KeyError"):
        restore_states(state, {"optimizer": nn.Linear(3, 2)}, "c.pt")


def test_files_follow_the_umask_and_stale_temp_files_are_removed(tmp_path):
    old_umask = os.umask(0o027)
    try:
        stale, young = tmp_path / ".r_seed1.json.a1b2c3d4.tmp", tmp_path / ".r_seed2.json.e5f6g7h8.tmp"
        others = [tmp_path / ".hidden.tmp", tmp_path / "notes.tmp"]
        for path in (stale, young, *others):
            path.write_text("x")
        an_hour_ago = time.time() - 3600
        for path in (stale, *others):
            os.utime(path, (an_hour_ago, an_hour_ago))
        result = write_results(tmp_path, experiment="r", method="m", seed=1, config={}, metrics={},
                               efficiency={"meta_step_s": None, "peak_mem_mb": None, "device": "cpu"})
        ckpt = save_checkpoint(tmp_path / "checkpoints" / "r.pt", {"epoch": 1}, {})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(result.stat().st_mode) == 0o640 and stat.S_IMODE(ckpt.stat().st_mode) == 0o640
    assert not stale.exists() and young.exists() and all(p.exists() for p in others)
    assert remove_stale_temp_files(tmp_path, max_age_s=-1.0) == [young]


def test_implausible_metrics_are_warned_about_and_recorded(tmp_path, capsys):
    path = write_results(tmp_path, experiment="rotation", method="evograd", seed=1, config={},
                         metrics={"angle_deg": 3.8e11, "final_train_loss": 0.2},
                         efficiency={"meta_step_s": None, "peak_mem_mb": None, "device": "cpu"},
                         limits={"angle_deg": 360.0, "final_train_loss": 1e3})
    assert json.loads(path.read_text())["warnings"] == ["angle_deg = 3.8e+11 is beyond the plausible range ±360"]
    assert "warning: rotation evograd seed 1: angle_deg = 3.8e+11" in capsys.readouterr().err


def test_divergence_guard_checks_losses_parameters_buffers_and_estimator_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    guard = DivergenceGuard("exp", "meth", 7, [model, None], steps_done=10)
    with guard.step(epoch=3):
        pass
    guard.check(training_loss=0.5, meta_loss=None)
    with pytest.raises(NonFiniteLossError, match=r"exp meth seed 7 diverged at epoch 3 step 11: non-finite meta loss"):
        guard.check(training_loss=torch.tensor(0.5), meta_loss=float("inf"))
    model[1].running_var.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="non-finite buffer Sequential.1.running_var"):
        guard.check(training_loss=0.5)
    with pytest.raises(NonFiniteLossError, match=r"epoch 4 step 12: val_loss_fn returned a non-finite loss \(nan\)"):
        with guard.step(epoch=4):
            check_scalar_loss(torch.tensor(float("nan")), "val_loss_fn")
    with pytest.raises(ValueError, match="must return a scalar"):  # other errors pass through unchanged
        with guard.step(epoch=4):
            check_scalar_loss(torch.zeros(2), "val_loss_fn")


def test_divergence_guard_stops_finite_but_implausible_losses_and_parameters():
    model = nn.Linear(2, 2)
    guard = DivergenceGuard("exp", "meth", 1, [model])
    with guard.step(epoch=1):
        pass
    guard.check(training_loss=9e3, meta_loss=-9e3)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 step 1: meta loss 8\.6e\+10 is beyond the plausible "
                                                 r"bound ±1e\+04; stopped.*\(lower the learning rate\?\)"):
        guard.check(training_loss=0.0, meta_loss=8.6e10)
    with torch.no_grad():
        model.bias[1] = -2e9
    with pytest.raises(NonFiniteLossError, match=r"parameter Linear\.bias reached \|value\| 2e\+09, beyond the "
                                                 r"plausible bound ±1e\+06"):
        guard.check(training_loss=0.5)
    model.bias.data[1] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite parameter Linear.bias"):
        guard.check()


def test_divergence_guard_adds_the_learning_rate_hint_only_where_it_helps():
    guard = DivergenceGuard("exp", "cg", 1, [])
    with pytest.raises(NonFiniteLossError) as info:
        with guard.step(epoch=1):
            raise ValueError("cg: train_loss_fn's Hessian-vector products are non-finite (an overflow in float16 "
                             "autocast: run the estimator in bfloat16 or float32 (--amp bf16 or none))")
    assert "learning rate" not in str(info.value) and str(info.value).endswith("is written")
    with pytest.raises(NonFiniteLossError, match=r"returned a non-finite loss \(nan\).*\(lower the learning rate\?\)"):
        with guard.step(epoch=1):
            check_scalar_loss(torch.tensor(float("nan")), "train_loss_fn")


def test_neumann_overflow_names_its_step_not_the_precision():
    from common.implicit import implicit_hypergrad
    theta = torch.tensor([0.5, -0.5], dtype=torch.float64)
    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    train = lambda p: lam * (p["theta"] ** 2).sum()  # noqa: E731  (H = 2λ I: the series diverges for α > 1)
    val = lambda p: ((p["theta"] - 1.0) ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"Neumann series diverges.*--neumann_alpha") as info:
        implicit_hypergrad({"theta": theta}, [lam], train, val, solver="neumann", neumann_alpha=1e200, neumann_iters=5)
    assert "float16" not in str(info.value)


def test_finished_runs_refuse_skip_or_rerun(tmp_path):
    done, todo = tmp_path / "done.json", tmp_path / "todo.json"
    done.write_text("{}")
    with pytest.raises(CLIError, match="done.json exists.*--resume.*--overwrite"):
        finished_runs([todo, done], resume=False, overwrite=False)
    assert finished_runs([todo, done], resume=True, overwrite=False) == {done}
    assert finished_runs([todo, done], resume=False, overwrite=True) == set()
    with pytest.raises(CLIError, match="contradict"):
        finished_runs([todo], resume=True, overwrite=True)


# ------------------------------------------------------------------ every trainer, in-process


_mwn_data = functools.lru_cache(maxsize=None)(mwn_train.load_dataset)  # the embedded MNIST subset, read once


@pytest.fixture
def cached_mwn_data(monkeypatch):
    monkeypatch.setattr(mwn_train, "load_dataset", _mwn_data)


@pytest.fixture(scope="module")
def fewshot_root(tmp_path_factory):
    return write_embedded_dataset(tmp_path_factory.mktemp("fewshot"), image_size=40,
                                  classes_per_split=(6, 5, 5), images_per_class=8)


@dataclass
class Trainer:
    main: object
    argv: list[str]                   # a tiny run of one method and one seed
    result: str                       # glob of its results file in --out
    checkpoint: str                   # glob of its checkpoint
    changed: list[str]                # flags changing settings ...
    changed_keys: tuple[str, ...]     # ... that the refusal must name


TRAINERS = {
    "rotation": Trainer(rotation_train.main, ["--quick", "--epochs", "1", "--batch-size", "2048", "--threads", "1",
                                              "--method", "evograd"],
                        "rotation_*_evograd_seed1.json", "checkpoints/rotation_*_evograd_seed1.pt",
                        ["--meta-lr", "0.5", "--width", "2"], ("meta_lr", "width")),
    "label_noise_mwn": Trainer(mwn_train.main, ["--quick", "--train_size", "60", "--num_meta", "20", "--batch_size", "20",
                                                "--meta_batch_size", "10", "--device", "cpu", "--seed", "3",
                                                "--epochs", "1", "--methods", "mwn_evograd"],
                               "label_noise_mwn_*_mwn_evograd_seed3.json", "checkpoints/*_mwn_evograd_seed3.pt",
                               ["--lr", "0.5", "--sigma", "0.1"], ("lr", "sigma")),
    "metaxl": Trainer(metaxl_train.main, ["--model", "tiny", "--train_size", "24", "--target_train_size", "12",
                                          "--epochs", "1", "--batch_size", "6", "--lr", "1e-3", "--meta_lr", "1e-3",
                                          "--bottle_size", "8", "--max_seq_length", "32", "--eval_max_seq_length", "32",
                                          "--transfer_layer", "4", "--targets", "qu", "--seed", "3", "--no_figures",
                                          "--methods", "metaxl_evograd"],
                      "metaxl_*_metaxl_evograd_seed3.json", "checkpoints/metaxl_*_metaxl_evograd_seed3.pt",
                      ["--meta_lr", "0.5"], ("meta_lr",)),
    "cross_domain_fewshot": Trainer(fewshot_train.main, ["--width", "4", "--image-size", "16", "--n-shot", "1",
                                                         "--n-query", "2", "--epochs", "1", "--episodes-per-epoch", "2",
                                                         "--val-episodes", "2", "--test-episodes", "5", "--test-queries", "2", "--aux-batch",
                                                         "4", "--seed", "3", "--threads", "1", "--pretrain-epochs", "1",
                                                         "--pretrain-batch", "16", "--methods", "lft_evograd"],
                                    "cross_domain_fewshot_*_lft_evograd_seed3.json", "checkpoints/lft_evograd_*.pt",
                                    ["--fwt-lr", "0.5"], ("fwt_lr",)),
}


def _argv(name: str, out: Path, fewshot_root: Path, *extra: str) -> list[str]:
    data = ["--data-root", str(fewshot_root)] if name == "cross_domain_fewshot" else []
    return [*TRAINERS[name].argv, *data, "--out", str(out), *extra]


def _cli(capsys, main, argv) -> tuple[int, str]:
    """Exit code and the one ``error:`` line of a refused run (asserting it is one line, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return info.value.code, errors[0]


def _one(folder: Path, pattern: str) -> Path:
    found = list(folder.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_resume_contract_of_each_trainer(name, tmp_path, capsys, fewshot_root, cached_mwn_data):
    trainer, out = TRAINERS[name], tmp_path / "out"
    argv = _argv(name, out, fewshot_root)
    old_umask = os.umask(0o022)
    try:
        trainer.main(argv)
    finally:
        os.umask(old_umask)
    if name == "cross_domain_fewshot":  # 2 meta-iterations, both warm-up: no time, and it says why (no "nan s")
        assert "(no s/meta-iteration: too few meta-iterations to time" in capsys.readouterr().out
    result, ckpt = _one(out, trainer.result), _one(out, trainer.checkpoint)
    assert stat.S_IMODE(result.stat().st_mode) == 0o644 and stat.S_IMODE(ckpt.stat().st_mode) == 0o644
    finished = result.read_bytes()
    first = json.loads(finished)
    assert first["efficiency"]["resumed_at_epoch"] is None and first["efficiency"]["timed_steps"] >= 0

    # a finished run is never rewritten: refused without a flag, skipped by --resume
    code, error = _cli(capsys, trainer.main, argv)
    assert code == 2 and "exists: that run is finished" in error and "--overwrite" in error
    every_result = {path: path.read_bytes() for path in out.glob("*.json")}  # few-shot: pretrain's too
    trainer.main([*argv, "--resume"])
    assert {path: path.read_bytes() for path in out.glob("*.json")} == every_result
    code, error = _cli(capsys, trainer.main, [*argv, "--resume", "--overwrite"])
    assert code == 2 and "contradict" in error

    # an unfinished run (no results file) resumed under other settings: refused, naming the keys
    result.unlink()
    code, error = _cli(capsys, trainer.main, [*argv, "--resume", *trainer.changed])
    assert code == 2 and str(ckpt) in error and all(f"{key} (" in error for key in trainer.changed_keys), error
    assert not result.exists()

    # a corrupt checkpoint: one line naming the file and the fix
    good = ckpt.read_bytes()
    for bad in (good[: len(good) // 2], b"", b"not a torch file"):
        ckpt.write_bytes(bad)
        code, error = _cli(capsys, trainer.main, [*argv, "--resume"])
        assert code == 2 and str(ckpt) in error and "delete it" in error, error
    assert not result.exists()
    if name == "cross_domain_fewshot":  # the standalone eval reads the same checkpoint
        code, error = _cli(capsys, fewshot_eval.main, ["--checkpoint", str(ckpt)])
        assert code == 2 and str(ckpt) in error and "not a torch file" in error and "--resume" not in error
    ckpt.write_bytes(good)

    # a checkpoint of a 2-process (torchrun) run resumed by one process: refused, naming the world size
    state = torch.load(ckpt, weights_only=False)
    assert state["config"]["processes"] == 1
    state["config"]["processes"] = 2
    torch.save(state, ckpt)
    code, error = _cli(capsys, trainer.main, [*argv, "--resume"])
    assert code == 2 and str(ckpt) in error and "2 process(es), this one has 1" in error, error
    assert not result.exists()
    ckpt.write_bytes(good)

    # --overwrite reruns the finished run from scratch: a new file, the same (seeded) metrics
    result.write_bytes(finished)
    inode = result.stat().st_ino
    trainer.main([*argv, "--overwrite"])
    assert result.stat().st_ino != inode
    assert json.loads(result.read_text())["metrics"] == first["metrics"]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_unwritable_out_is_refused_before_any_work(name, tmp_path, capsys, fewshot_root, cached_mwn_data):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in (a_file, a_file / "below"):
        code, error = _cli(capsys, TRAINERS[name].main, _argv(name, out, fewshot_root))
        assert code == 2 and f"--out {out}" in error and "writable folder" in error, error
    assert sorted(tmp_path.iterdir()) == [a_file]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        code, error = _cli(capsys, rotation_train.main, [*TRAINERS["rotation"].argv, "--out", str(tmp_path)])
    finally:
        tmp_path.chmod(0o755)
    assert code == 2 and "not a writable folder" in error


def test_bench_and_study_check_out_before_measuring(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")
    monkeypatch.setattr(bench, "run_benchmark", no_work)
    monkeypatch.setattr(hypergrad_study, "run_problem", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, words in ((tmp_path, "is a folder"), (a_file / "bench.json", "is a file")):
        code, error = _cli(capsys, bench.main, ["--quick", "--out", str(out)])
        assert code == 2 and words in error
    code, error = _cli(capsys, hypergrad_study.main, ["--quick", "--out", str(a_file)])
    assert code == 2 and "is a file" in error
    (tmp_path / "study.json").write_text("{}")  # a finished study: refused, or skipped by --resume
    code, error = _cli(capsys, hypergrad_study.main, ["--quick", "--out", str(tmp_path)])
    assert code == 2 and "study.json exists" in error
    hypergrad_study.main(["--quick", "--out", str(tmp_path), "--resume"])


def test_divergence_stops_naming_the_step_keeps_the_checkpoint_writes_no_results(tmp_path, capsys, monkeypatch,
                                                                                 cached_mwn_data):
    real_lr_at = mwn_train.lr_at
    monkeypatch.setattr(mwn_train, "lr_at", lambda epoch, *args: 1e6 if epoch == 1 else real_lr_at(epoch, *args))
    argv = [*TRAINERS["label_noise_mwn"].argv, "--epochs", "2", "--out", str(tmp_path)]   # epoch 2 at lr 1e6
    code, error = _cli(capsys, mwn_train.main, argv)
    assert code == 2 and "label_noise_mwn mwn_evograd seed 3 diverged at epoch 2 step" in error, error
    assert "beyond the plausible bound" in error and "last good checkpoint is kept" in error
    assert not list(tmp_path.glob("*.json"))
    state = load_checkpoint(_one(tmp_path, TRAINERS["label_noise_mwn"].checkpoint))
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


EXPLODING = {  # finite but meaningless: the runs that used to end with exit 0 and a normal results file
    "rotation": ["--meta-lr", "1e9"],
    "label_noise_mwn": ["--vnet_lr", "1e9"],
    "metaxl": ["--meta_lr", "1e9"],
    "cross_domain_fewshot": ["--fwt-lr", "1e9"],
}


@pytest.mark.parametrize("name", sorted(EXPLODING))
def test_a_finite_explosion_stops_as_a_divergence(name, tmp_path, capsys, fewshot_root, cached_mwn_data):
    code, error = _cli(capsys, TRAINERS[name].main, _argv(name, tmp_path, fewshot_root, *EXPLODING[name]))
    assert code == 2 and "diverged at epoch 1 step" in error and "beyond the plausible bound" in error, error
    assert not list(tmp_path.glob(TRAINERS[name].result))


def test_a_non_finite_loss_inside_an_estimator_is_the_same_one_line(tmp_path, capsys):
    argv = [*TRAINERS["rotation"].argv, "--lr", "1e6", "--out", str(tmp_path)]
    code, error = _cli(capsys, rotation_train.main, argv)
    assert code == 2 and "rotation evograd seed 1 diverged at epoch 1 step 1: train_loss_fn" in error
    assert "non-finite loss" in error and not list(tmp_path.glob("*.json"))


def test_killed_and_resumed_run_equals_a_straight_run(tmp_path, monkeypatch, cached_mwn_data):
    argv = [*TRAINERS["label_noise_mwn"].argv, "--epochs", "2", "--milestones", "1"]
    mwn_train.main([*argv, "--out", str(tmp_path / "straight")])
    real_save = mwn_train.save_checkpoint

    def save_then_stop(*args, **kwargs):  # killed right after its first epoch's checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(mwn_train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        mwn_train.main([*argv, "--out", str(tmp_path / "split")])
    monkeypatch.setattr(mwn_train, "save_checkpoint", real_save)
    mwn_train.main([*argv, "--out", str(tmp_path / "split"), "--resume"])
    straight, resumed = (json.loads(_one(tmp_path / run, "label_noise_mwn_*.json").read_text())
                         for run in ("straight", "split"))
    epoch_s = ("epoch_s_per_epoch",)  # wall-clock seconds differ; every other metric is bit-identical
    assert {k: v for k, v in resumed["metrics"].items() if k not in epoch_s} == \
        {k: v for k, v in straight["metrics"].items() if k not in epoch_s}
    assert resumed["efficiency"]["resumed_at_epoch"] == 1 and straight["efficiency"]["resumed_at_epoch"] is None


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_only_metaxl_draws_from_the_global_generators_while_it_trains(name, tmp_path, monkeypatch, fewshot_root,
                                                                       cached_mwn_data):
    """A resumed run gets back its own generators (batches, augmentation, noise) from the checkpoint; torch's,
    NumPy's and Python's global generators are seeded, read by the model's initialisation, and then left alone
    by every trainer but MetaXL (XLM-R's dropout), whose checkpoint therefore keeps every rank's torch state
    (under torchrun ranks whose shards differ in size draw different amounts). So the global states at the end
    of epochs 1 and 2 are the same, and which of them a resumed rank gets back cannot matter."""
    import importlib
    import random

    import numpy as np

    trainer_module = importlib.import_module(TRAINERS[name].main.__module__)
    real_save, states = trainer_module.save_checkpoint, {}

    def save_and_note(path, *args, **kwargs):
        states.setdefault(Path(path).name, []).append(
            (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_and_note)
    TRAINERS[name].main(_argv(name, tmp_path / "out", fewshot_root, "--epochs", "2"))
    trained = [s for path, s in states.items() if not path.startswith("pretrain_")]  # few-shot's 1-epoch stage
    assert len(trained) == 1 and len(trained[0]) == 2, states.keys()
    (torch_1, numpy_1, python_1), (torch_2, numpy_2, python_2) = trained[0]
    assert np.array_equal(numpy_1, numpy_2) and python_1 == python_2
    assert torch.equal(torch_1, torch_2) == (name != "metaxl")
