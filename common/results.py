"""Results files and checkpoints, written atomically (temp file in the same folder + rename).

A results file is one JSON object per run:

    {"experiment": str, "method": str, "seed": int, "setting": str,
     "config": {...every hyperparameter...}, "metrics": {...},
     "efficiency": {"meta_step_s": float|None, "peak_mem_mb": float|None, "device": str},
     "env": {...versions, host, git commit...}}

``setting`` names the variant of the experiment (dataset, noise level, ...) so that reports group
runs by (experiment, setting, method); scalar metrics are tabulated, lists (curves) are kept for
figures.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REQUIRED_KEYS = ("experiment", "method", "seed", "config", "metrics", "efficiency", "env")
EFFICIENCY_KEYS = ("meta_step_s", "peak_mem_mb", "device")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def env_info() -> dict[str, Any]:
    """Versions and machine facts recorded with every run."""
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
    }
    return info


def results_path(out_dir: str | Path, experiment: str, setting: str, method: str, seed: int) -> Path:
    """``OUT/<experiment>[_<setting>]_<method>_seed<seed>.json`` with a filesystem-safe setting."""
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in setting) if setting else ""
    stem = "_".join(x for x in (experiment, safe, method, f"seed{seed}") if x)
    return Path(out_dir) / f"{stem}.json"


def write_results(out_dir: str | Path, *, experiment: str, method: str, seed: int, config: dict,
                  metrics: dict, efficiency: dict, setting: str = "", extra: dict | None = None) -> Path:
    """Write one run's results file atomically and return its path.

    Raises:
        ValueError: if ``efficiency`` lacks one of ``meta_step_s``, ``peak_mem_mb``, ``device``.
    """
    missing = [k for k in EFFICIENCY_KEYS if k not in efficiency]
    if missing:
        raise ValueError(f"efficiency is missing {missing}")
    record = {"experiment": experiment, "method": method, "seed": int(seed), "setting": setting,
              "config": config, "metrics": metrics, "efficiency": efficiency, "env": env_info()}
    record.update(extra or {})
    return atomic_write_json(results_path(out_dir, experiment, setting, method, seed), record)


def load_results(folder: str | Path) -> list[dict]:
    """Every valid results file under ``folder`` (recursively), sorted by path.

    JSON objects without the results keys (benchmark outputs, file lists, data stamps) are
    skipped silently. A file that cannot be a results file's sound copy (not UTF-8, malformed or
    truncated JSON, or a results record whose keys have the wrong types, ``"metrics": null``) is
    skipped with a warning on stderr naming it, so that no run disappears unnoticed.

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
        elif record is not None:
            record["_path"] = str(path)
            records.append(record)
    return records


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


def save_checkpoint(path: str | Path, state: dict, config: dict) -> Path:
    """``torch.save({"config": config, **state})`` atomically (nanoGPT style: config travels along)."""
    path = Path(path)
    _atomic_write(path, lambda handle: torch.save({"config": config, **state}, handle))
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint``.

    Raises:
        FileNotFoundError: if there is none (callers turn this into a CLI error for --resume).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=False)
