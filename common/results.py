"""Results files and checkpoints, written atomically (temp file in the same folder + rename).

A results file is one JSON object per run:

    {"experiment": str, "method": str, "seed": int, "setting": str,
     "config": {...every hyperparameter...}, "metrics": {...},
     "efficiency": {"meta_step_s": float|None, "peak_mem_mb": float|None, "device": str},
     "env": {...versions, host, git commit...}}

``setting`` names the variant of the experiment (dataset, noise level, ...) so that reports group
runs by (experiment, setting, method); scalar metrics are tabulated, lists (curves) are kept for
figures.

Guarantees (docs/runs_and_resume.md): files get the mode the umask gives
(``0o666 & ~umask``, not ``mkstemp``'s 0600); a temp file left by a killed write is removed by a
later write into the same folder once it is older than ``STALE_TEMP_AGE_S``; a checkpoint that
cannot be read, or was written under other settings, is a ``RunFileError`` naming the file and
the fix, never a torch traceback.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REQUIRED_KEYS = ("experiment", "method", "seed", "config", "metrics", "efficiency", "env")
EFFICIENCY_KEYS = ("meta_step_s", "peak_mem_mb", "device")
STALE_TEMP_AGE_S = 600.0  # a temp file this old is left by a killed write (a checkpoint takes seconds)
# ``mkstemp(prefix=".<name>.", suffix=".tmp")``: a dot, the target's name, 8 random characters
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# Settings that may differ between a checkpoint and the run resuming it: which runs to do
# (seed, seeds, method, methods, targets, stage), where and how (out, device, threads, download),
# output only (no_figures) and the resume flags themselves. Every other key must match.
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "out", "device", "threads", "download", "no_figures",
                               "seed", "seeds", "method", "methods", "targets", "stage"})


class RunFileError(ValueError):
    """An output folder, checkpoint or results file a run cannot use; the message names it and the fix."""


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: ``0o666 & ~umask``."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temp_files(folder: str | Path, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete our atomic-write temp files (``.<name>.XXXXXXXX.tmp``) in ``folder`` older than ``max_age_s``.

    Younger ones may belong to a write in progress (another run into the same folder) and stay.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not TEMP_NAME.match(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > max_age_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def check_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove it writable by writing a temp file into it.

    Raises:
        RunFileError: if ``folder`` (or a parent) is a file, or the folder cannot be created or written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFileError(f"{folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunFileError(f"{folder} is not a writable folder ({err.strerror or err})") from None
    remove_stale_temp_files(folder)
    return folder


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; non-finite floats become null."""
    path = Path(path)
    text = json.dumps(_finite(obj), indent=1, sort_keys=False) + "\n"
    _atomic_write(path, lambda handle: handle.write(text.encode()))
    return path


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _finite(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _finite(obj.item())
    return obj


DATA_ROOT_FLAGS = ("--data-root", "--data_root")


def portable_command(argv: Iterable[str] | None = None) -> str:
    """The command line that made this process, as a reader can repeat it.

    ``python -m <module> <args>`` (or ``torchrun ... -m`` as ``python -m`` with the same args: the
    world size is in the config), with a ``--data-root`` value written as ``path/to/<its last
    folder>`` so that no path of the machine that ran it ends up in a committed results file.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    args = list(sys.argv[1:] if argv is None else argv)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", Path(sys.argv[0]).name]
    out, skip = [], False
    for token in args:
        if skip:
            out.append("path/to/" + Path(token).name)
            skip = False
            continue
        flag, eq, value = token.partition("=")
        if flag in DATA_ROOT_FLAGS:
            if eq:
                token = f"{flag}=path/to/{Path(value).name}"
            else:
                skip = True
        out.append(token)
    return shlex.join(head + out)


def env_info() -> dict[str, Any]:
    """Versions and machine facts recorded with every run, the command that ran it and the load then."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
        "command": portable_command(),
        # 1-minute load average when the file was written: how busy the machine was (timings)
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    return info


def results_path(out_dir: str | Path, experiment: str, setting: str, method: str, seed: int) -> Path:
    """``OUT/<experiment>[_<setting>]_<method>_seed<seed>.json`` with a filesystem-safe setting."""
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in setting) if setting else ""
    stem = "_".join(x for x in (experiment, safe, method, f"seed{seed}") if x)
    return Path(out_dir) / f"{stem}.json"


def implausible_metrics(metrics: Mapping[str, Any], limits: Mapping[str, float]) -> list[str]:
    """One warning per scalar metric named in ``limits`` with ``|value| > limit`` (finite but absurd).

    A learned rotation of 3.8e11° or an FWT scale of 1e8 is finite, so no divergence check stops the
    run; its results file carries these warnings instead, and the run prints them.
    """
    warnings = []
    for key, limit in limits.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > limit:
            warnings.append(f"{key} = {value:.4g} is beyond the plausible range ±{limit:g}")
    return warnings


def write_results(out_dir: str | Path, *, experiment: str, method: str, seed: int, config: dict,
                  metrics: dict, efficiency: dict, setting: str = "", extra: dict | None = None,
                  limits: Mapping[str, float] | None = None) -> Path:
    """Write one run's results file atomically and return its path.

    ``limits`` maps metric names to plausible bounds of their absolute value; a metric beyond its
    bound is printed as a warning on stderr and listed under ``"warnings"`` in the file.

    Raises:
        ValueError: if ``efficiency`` lacks one of ``meta_step_s``, ``peak_mem_mb``, ``device``.
    """
    missing = [k for k in EFFICIENCY_KEYS if k not in efficiency]
    if missing:
        raise ValueError(f"efficiency is missing {missing}")
    record = {"experiment": experiment, "method": method, "seed": int(seed), "setting": setting,
              "config": config, "metrics": metrics, "efficiency": efficiency, "env": env_info()}
    warnings = implausible_metrics(metrics, limits or {})
    for warning in warnings:
        print(f"warning: {experiment} {method} seed {seed}: {warning} (recorded in the results file)",
              file=sys.stderr)
    if warnings:
        record["warnings"] = warnings
    record.update(extra or {})
    return atomic_write_json(results_path(out_dir, experiment, setting, method, seed), record)


def load_results(folder: str | Path, skipped: list[tuple[Path, str]] | None = None) -> list[dict]:
    """Every valid results file under ``folder`` (recursively), sorted by path.

    JSON objects without the results keys (benchmark outputs, file lists, data stamps) are
    skipped silently. A file that cannot be a results file's sound copy (not UTF-8, malformed or
    truncated JSON, or a results record whose keys have the wrong types, ``"metrics": null``) is
    skipped with a warning on stderr naming it, so that no run disappears unnoticed; a list passed
    as ``skipped`` also receives ``(path, why)`` for each, for a report to show.

    Raises:
        ValueError: if ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"results folder {folder} does not exist")
    records = []
    for path in sorted(folder.rglob("*.json")):
        record, problem = _read_results_file(path)
        if problem:
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
            if skipped is not None:
                skipped.append((path, problem))
        elif record is not None:
            record["_path"] = str(path)
            records.append(record)
    return records


def skipped_markdown(skipped: Sequence[tuple[Path, str]], heading: str) -> list[str]:
    """Markdown lines listing the files ``load_results`` skipped, under ``heading``; [] when none."""
    if not skipped:
        return []
    return [heading, ""] + [f"- `{path}`: {why}" for path, why in skipped] + [""]


RESULTS_TYPES = {"experiment": str, "method": str, "seed": int, "config": dict, "metrics": dict, "efficiency": dict}


def _read_results_file(path: Path) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a results file, ``(None, None)`` for other JSON, ``(None, why)`` if broken."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        return None, f"cannot read it ({err.strerror or err})"
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte at offset {err.start})"
    except json.JSONDecodeError as err:
        return None, f"malformed or truncated JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    if not isinstance(record, dict) or not {"experiment", "method", "seed", "metrics"} <= set(record):
        return None, None
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return None, f"results file without {missing}"
    wrong = [f"{k} is {json.dumps(record[k])[:40]}" for k, kind in RESULTS_TYPES.items()
             if not isinstance(record[k], kind) or (kind is int and isinstance(record[k], bool))]
    if not isinstance(record.get("setting", ""), str):
        wrong.append(f"setting is {json.dumps(record['setting'])[:40]}")
    if wrong:
        return None, "results file with " + ", ".join(wrong)
    return record, None


def process_count() -> int:
    """The number of processes of this run: the torchrun world size, 1 without a process group."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_checkpoint(path: str | Path, state: dict, config: dict) -> Path:
    """``torch.save({"config": config, **state})`` atomically (nanoGPT style: config travels along).

    The config gains ``processes`` (``process_count()``): a resume checks it (``resume_checkpoint``).
    """
    path = Path(path)
    config = {**config, "processes": process_count()}
    _atomic_write(path, lambda handle: torch.save({"config": config, **state}, handle))
    return path


RESTART_FIX = "delete it; --resume then starts that run over (finished runs are kept)"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", fix: str = RESTART_FIX) -> dict:
    """Load a checkpoint written by ``save_checkpoint``; ``fix`` ends the error message (what to do).

    Raises:
        FileNotFoundError: if there is none (callers turn this into a CLI error for --resume).
        RunFileError: if it is empty, truncated or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise RunFileError(f"checkpoint {path} is empty (0 bytes): {fix}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 (torch raises RuntimeError, EOFError, UnpicklingError, ...)
        reason = (str(err).strip().splitlines() or [""])[0][:120]
        raise RunFileError(f"checkpoint {path} is unreadable (truncated or not a torch file: "
                           f"{type(err).__name__}: {reason}): {fix}") from None
    if not isinstance(state, dict):
        raise RunFileError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint: {fix}")
    return state


def _short(value: Any) -> str:
    text = json.dumps(_finite(value), sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       may_change: Iterable[str] = RESUME_MAY_CHANGE) -> list[str]:
    """Keys whose values differ between two configs (compared as JSON), each as ``key (old -> new)``.

    A key present on one side only differs too (shown as ``absent``); keys in ``may_change`` are ignored.
    """
    allowed = set(may_change)
    absent = object()
    diffs = []
    for key in sorted(set(saved) | set(current), key=str):
        if key in allowed:
            continue
        old, new = saved.get(key, absent), current.get(key, absent)
        as_json = [None if v is absent else json.dumps(_finite(v), sort_keys=True) for v in (old, new)]
        if (old is absent) != (new is absent) or as_json[0] != as_json[1]:
            show = ["absent" if v is absent else _short(v) for v in (old, new)]
            diffs.append(f"{key} ({show[0]} -> {show[1]})")
    return diffs


def resume_checkpoint(path: str | Path, config: Mapping[str, Any], map_location: str | torch.device = "cpu",
                      may_change: Iterable[str] = ()) -> dict | None:
    """The checkpoint to resume from, or None if there is none; it must have been written under ``config``.

    Keys in ``RESUME_MAY_CHANGE`` and in ``may_change`` may differ; any other difference refuses the resume.

    Raises:
        RunFileError: if the checkpoint is unreadable or its config differs (the message names the keys).
    """
    path = Path(path)
    if not path.is_file():
        return None
    state = load_checkpoint(path, map_location)
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        raise RunFileError(f"checkpoint {path} carries no config to check the resume against: {RESTART_FIX}")
    # batches are sharded over the processes and every rank keeps its own generators: a run resumed
    # under another world size would continue a different run and mix the two
    saved_processes, processes = saved.get("processes", 1), process_count()
    if saved_processes != processes:
        raise RunFileError(f"--resume: checkpoint {path} was written by a run of {saved_processes} process(es), "
                           f"this one has {processes}: resume it with the same number of processes "
                           f"({'torchrun --nproc_per_node ' + str(saved_processes) if saved_processes != 1 else 'no torchrun'}), "
                           "or delete it to start that run over")
    diffs = config_differences(saved, config, RESUME_MAY_CHANGE | set(may_change) | {"processes"})
    if diffs:
        raise RunFileError(f"--resume: checkpoint {path} was written with other settings: {', '.join(diffs)}; "
                           "rerun with the checkpoint's settings, or delete it to start that run over")
    return state


def restore_states(state: Mapping[str, Any], objects: Mapping[str, Any], path: str | Path) -> None:
    """``obj.load_state_dict(state[name])`` for every ``name, obj`` (None objects are skipped).

    Raises:
        RunFileError: if the checkpoint lacks an entry or its tensors do not fit (shape, keys).
    """
    for name, obj in objects.items():
        if obj is None:
            continue
        try:
            obj.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            raise RunFileError(f"checkpoint {path} does not fit this run ({name}: {type(err).__name__}: {reason}): "
                               f"{RESTART_FIX}") from None


def note_resume(efficiency: dict, resumed_at_epoch: int) -> dict:
    """Add ``resumed_at_epoch`` (None for a run trained in one go) to ``efficiency`` and return it.

    After a resume the meter saw only the epochs after ``resumed_at_epoch``: ``timed_steps`` counts
    the steps behind ``meta_step_s`` and ``peak_mem_mb`` is the peak of those epochs alone.
    """
    efficiency["resumed_at_epoch"] = resumed_at_epoch or None
    return efficiency
