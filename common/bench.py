"""Meta-step benchmarks: methods side by side, time interleaved in one process, memory each alone.

Each experiment registers its benchmark in ``<experiment>/bench.py``::

    from common.bench import register_benchmark

    @register_benchmark("rotation", methods=("evograd", "second_order"), reference="second_order",
                        configs=({"width": 1}, {"width": 2}), quick_configs=({"width": 1, "batch": 8},))
    def make_step(method: str, config: dict, device: torch.device) -> Callable[[], None]:
        ...build model and data once...
        return one_meta_step          # a closure that runs one meta-iteration

``python -m common.bench`` finds every ``<folder>/bench.py`` beside ``common/`` (by file, so
``common`` imports no experiment by name) and, per benchmark and config:

* time: builds every method's step, warms each up, then runs ``--reps`` rounds in which every
  method takes one step (rotating the order), so drifts in machine speed hit all methods alike;
* memory: runs each method in its own fresh process (``--memory-worker``), peak measured by
  ``common.profiling.EfficiencyMeter`` (CUDA max allocated, or CPU peak RSS above the level
  before the measured steps);

and prints a Markdown table with ratios to the reference method (usually the second-order one).

``--nproc 1 2`` (data parallelism) instead runs each method of each config under ``torchrun
--standalone --nproc_per_node N`` for every N given, one torchrun after another (not interleaved):
every rank builds the step with 1/N of the config's ``batch``, the ranks meet at a barrier
before and after each step (so a step's time is the slowest rank's), and the table gives seconds
per iteration, the speed-up over the first N, and peak memory per rank (the largest over ranks).
Threads per process follow ``OMP_NUM_THREADS`` (torchrun sets 1 for N > 1 when it is unset).

``--nproc N --fsdp`` runs every method twice under each N: replicated, and sharded (the config
gains ``"fsdp": true``, which the benchmark's ``make_step`` reads to shard its model with
``common.fsdp.shard_model`` before making the optimiser; a method with no sharded estimator fails
its row with the reason). Sharded rows are named ``<method>, sharded``; every data-parallel row
also gives ``peak_mem_mb``, the largest rank's, so ``common.report`` tabulates them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import distributed
from common.memory_model import SHARDED
from common.precision import Precision, add_amp_arg
from common.profiling import EfficiencyMeter, current_rss_mb, peak_rss_mb
from common.results import atomic_write_json, env_info
from common.runtime import (CLIError, DefaultsHelpFormatter, import_experiment_modules, prepare_out_file, run_cli,
                            select_device)

StepFactory = Callable[[str, dict, torch.device], Callable[[], None]]
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    make_step: StepFactory
    methods: tuple[str, ...]
    reference: str
    configs: tuple[dict, ...] = ({},)
    quick_configs: tuple[dict, ...] = field(default=())
    description: str = ""
    extra_methods: tuple[str, ...] = ()   # accepted by --methods, not run by default
    plain: str | None = None   # the method with no meta step: the yardstick of the sharded rows' memory


REGISTRY: dict[str, Benchmark] = {}
T_STEP_ESTIMATORS = ("unrolled", "multistep")  # the estimators that read a config's inner_steps / window


def horizon_options(method: str, config: dict) -> dict:
    """A config's ``inner_steps``/``window`` for the T-step estimators; ``{}`` for every other method."""
    if method not in T_STEP_ESTIMATORS:
        return {}
    return {key: config[key] for key in ("inner_steps", "window") if key in config}


def register_benchmark(name: str, *, methods: Sequence[str], reference: str,
                       configs: Sequence[dict] = ({},), quick_configs: Sequence[dict] = (),
                       description: str = "", extra_methods: Sequence[str] = (), plain: str | None = None
                       ) -> Callable[[StepFactory], StepFactory]:
    """Decorator registering ``make_step(method, config, device) -> step()`` under ``name``.

    ``methods`` run by default; ``extra_methods`` only when named with ``--methods``. ``plain``: the
    method that trains without a meta step, against whose sharded row ``common.report`` sets the
    sharded rows' memory.
    """
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} is not among {list(methods)}")
    if plain is not None and plain not in methods:
        raise ValueError(f"plain method {plain!r} is not among {list(methods)}")

    def decorate(make_step: StepFactory) -> StepFactory:
        REGISTRY[name] = Benchmark(name, make_step, tuple(methods), reference, tuple(configs),
                                   tuple(quick_configs) or tuple(configs), description,
                                   tuple(m for m in extra_methods if m not in methods), plain)
        return make_step
    return decorate


def discover() -> dict[str, Benchmark]:
    """Import every ``<folder>/bench.py`` beside ``common/`` so that it registers itself."""
    import_experiment_modules("bench")
    # Under ``python -m common.bench`` this file is ``__main__``; the benchmarks registered
    # themselves in the importable ``common.bench``, whose registry is the one to read.
    return importlib.import_module("common.bench").REGISTRY


def under_precision(step: Callable[[], None], amp: str, device: torch.device) -> Callable[[], None]:
    """``step`` run as one ``common.precision`` iteration: autocast under ``amp``, fp16's gradient scaler."""
    if amp == "none":
        return step
    precision = Precision(amp, device)

    def step_under_amp() -> None:
        with precision.iteration():
            step()
    return step_under_amp


def time_methods(bench: Benchmark, config: dict, methods: Sequence[str], device: torch.device,
                 warmup: int, reps: int, amp: str = "none") -> dict[str, list[float]]:
    """Seconds per step of each method, interleaved: every round runs every method once."""
    steps = {m: under_precision(bench.make_step(m, config, device), amp, device) for m in methods}
    for m in methods:
        for _ in range(warmup):
            steps[m]()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(reps):
        order = list(methods[r % len(methods):]) + list(methods[: r % len(methods)])
        for m in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            steps[m]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[m].append(time.perf_counter() - t0)
    return times


def memory_worker(name: str, config: dict, method: str, device: torch.device, warmup: int, steps: int,
                  amp: str = "none") -> dict:
    """Run in a fresh process: peak memory of ``steps`` meta steps of one method."""
    bench = discover()[name]
    step = under_precision(bench.make_step(method, config, device), amp, device)
    meter = EfficiencyMeter(device, warmup=warmup)
    for _ in range(warmup + steps):
        with meter.step():
            step()
    total = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb())
    # solo_time_s: the measured steps of this process alone (not interleaved with other methods)
    return {"peak_mem_mb": meter.peak_mem_mb(), "peak_total_mb": total, "solo_time_s": meter.summary()["meta_step_s"],
            "cpu_malloc_mmap_threshold": malloc_mmap_threshold(device)}


def measure_memory(name: str, config: dict, method: str, device: torch.device, warmup: int, steps: int,
                   amp: str = "none") -> dict:
    """Peak memory of one method, measured in its own process."""
    cmd = [sys.executable, "-m", "common.bench", "--memory-worker", name, json.dumps(config), method,
           "--device", device.type, "--warmup", str(warmup), "--reps", str(steps), "--amp", amp]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=worker_env(device))
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"peak_mem_mb": None, "peak_total_mb": None, "solo_time_s": None, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def data_parallel_worker(name: str, config: dict, method: str, device: torch.device, warmup: int,
                         reps: int, amp: str = "none") -> dict | None:
    """Under torchrun: ``reps`` timed iterations of ``method`` on 1/N of ``config['batch']`` per rank.

    Returns (on rank 0; None on the others) the mean seconds per iteration, measured between
    barriers (the slowest rank's), and every rank's peak memory. The steps run in a function of
    their own, so the model is freed before the process group is left (a sharded model holds its
    group, whose gloo threads must end before the interpreter does: ``common.distributed.close_data_parallel``).
    """
    discover()  # the benchmarks' imports before the group exists (see common.distributed.init_data_parallel)
    with distributed.process_group(device) as device:
        return _data_parallel_steps(name, config, method, device, warmup, reps, amp)


def _data_parallel_steps(name: str, config: dict, method: str, device: torch.device, warmup: int, reps: int,
                         amp: str) -> dict | None:
    """The body of ``data_parallel_worker``, inside its process group."""
    n = distributed.world_size()
    before_build_mb = current_rss_mb()  # CPU: the process before the model exists (the group joined)
    raw_step = discover()[name].make_step(method, {**config, "batch": config["batch"] // n}, device)
    step = under_precision(raw_step, amp, device)
    meter = EfficiencyMeter(device, warmup=warmup)
    for _ in range(warmup + reps):
        distributed.barrier()
        with meter.step():
            step()
            distributed.barrier()
    total = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    # what the model, its optimiser and the steps hold at the peak: CUDA's allocated bytes, or on CPU the resident
    # set above the process before the model was built (the model's build itself is not in the peak: reset at start)
    model = total if device.type == "cuda" else total - before_build_mb
    mine = {"peak_mem_mb": meter.peak_mem_mb(), "peak_total_mb": total, "peak_model_mb": model}
    ranks = [mine] * n
    if n > 1:
        torch.distributed.all_gather_object(ranks, mine)
    if not distributed.is_main_process():
        return None
    return {"processes": n, "batch_per_rank": config["batch"] // n,
            # the whole model's parameter count, where make_step's closure gives it (``step.parameters``)
            "parameters": getattr(raw_step, "parameters", None), "time_s": meter.summary()["meta_step_s"],
            "time_std_s": statistics.stdev(meter.times) if len(meter.times) > 1 else 0.0,
            "peak_mem_mb_per_rank": [r["peak_mem_mb"] for r in ranks],
            "peak_total_mb_per_rank": [r["peak_total_mb"] for r in ranks],
            "peak_model_mb_per_rank": [r["peak_model_mb"] for r in ranks],
            "cpu_malloc_mmap_threshold": malloc_mmap_threshold(device)}


CPU_MMAP_THRESHOLD = 131072  # bytes: glibc's initial threshold, here fixed
MMAP_THRESHOLD_VAR = "MALLOC_MMAP_THRESHOLD_"


def malloc_mmap_threshold(device: torch.device) -> str | None:
    """The glibc threshold this CPU worker ran under (``worker_env``), recorded in its row; None on CUDA."""
    return os.environ.get(MMAP_THRESHOLD_VAR) if device.type == "cpu" else None


def worker_env(device: torch.device) -> dict[str, str]:
    """The environment of a measuring subprocess. On CPU, glibc's malloc serves every block of 128 KiB or
    more by its own mmap and returns it when freed (``MALLOC_MMAP_THRESHOLD_`` fixed: by default the
    threshold rises after large frees, and freed tensors then stay in the resident set, so a peak RSS
    read more of the allocator's history than of the tensors alive). A value already set is kept."""
    env = dict(os.environ)
    if device.type == "cpu":
        env.setdefault(MMAP_THRESHOLD_VAR, str(CPU_MMAP_THRESHOLD))
    return env


def measure_data_parallel(name: str, config: dict, method: str, nproc: int, device: torch.device, warmup: int,
                          reps: int, amp: str = "none") -> dict:
    """One ``torchrun --standalone --nproc_per_node nproc`` of ``data_parallel_worker``.

    A failed launch is tried once more (unless the worker refused its arguments: a method with no
    sharded estimator fails the same way every time): one launch in a full test run failed once and not again
    (the cause is not known; ``torchrun --standalone`` picks free ports by binding and releasing
    them, which another process can take in between). The row then records the first attempt's
    error as ``retried_after``; a failure on both attempts is the row's ``error``.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "common.bench", "--dp-worker", name, json.dumps(config), method,
           "--device", device.type, "--warmup", str(warmup), "--reps", str(reps), "--amp", amp]
    env = worker_env(device)
    row, first_error = _launch(cmd, env)
    if row is not None or _refused(first_error):
        return row or {"processes": nproc, "time_s": None, "error": first_error}
    row, error = _launch(cmd, env)
    if row is not None:
        return {**row, "retried_after": first_error}
    return {"processes": nproc, "time_s": None, "error": error, "retried_after": first_error}


def _refused(error: str | None) -> bool:
    """A worker's refusal of its method or config (``ValueError: ...``, e.g. no sharded estimator): the same on
    every try."""
    return error is not None and error.startswith("ValueError:")


def _launch(cmd: list[str], env: dict[str, str] | None = None) -> tuple[dict | None, str | None]:
    """Run one torchrun command: (the worker's JSON row, None), or (None, its first error line)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    # the first worker's one-line error or exception line (torchrun's own summary comes last)
    # (a worker's traceback lines start with "[rank<r>]: " once torchrun has collected them)
    stderr = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in proc.stderr.splitlines()]
    errors = [line for line in stderr if line.startswith("error:") or re.match(r"[\w.]*(Error|Exception)\b", line)]
    error = (errors or [line for line in stderr if line.strip()] or ["(no output)"])[0][:200]
    if lines and proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # rank 0 printed its row, every step measured; a worker then aborted while exiting: the row stands,
        # the abort is noted. A safety net: the cause seen on CPU gloo (the group's threads outliving it,
        # common.distributed.close_data_parallel) is fixed, and no other is known; nccl is untested here
        return {**json.loads(lines[-1]), "aborted_at_exit": error}, None
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1]), None
    return None, error


def format_data_parallel_table(rows: list[dict]) -> str:
    """Markdown table of one config under 1..N processes, speed-up over each method's first row."""
    lines = ["| method | processes | batch per rank | s / iteration | speed-up | peak MB per rank (above start) | "
             "peak MB per rank (model and step) | peak MB per rank (process total) |", "|---" * 8 + "|"]
    first: dict[str, float | None] = {}
    for r in rows:
        base = first.setdefault(r["method"], r.get("time_s"))
        if r.get("time_s") is None:
            lines.append(f"| {r['method']} | {r['processes']} | | failed: {r.get('error', '')} | | | | |")
            continue
        speedup = base / r["time_s"] if base else None
        lines.append(f"| {r['method']} | {r['processes']} | {r['batch_per_rank']} | "
                     f"{r['time_s']:.4g} ± {r['time_std_s']:.2g} | {_fmt(speedup)} | "
                     f"{_fmt(max(x or 0.0 for x in r['peak_mem_mb_per_rank']), 4)} | "
                     f"{_fmt(r.get('peak_model_mb'), 4)} | "
                     f"{_fmt(max(x or 0.0 for x in r['peak_total_mb_per_rank']), 4)} |")
    return "\n".join(lines)


def run_data_parallel(bench: Benchmark, configs: Sequence[dict], methods: Sequence[str], nprocs: Sequence[int],
                      device: torch.device, warmup: int, reps: int, amp: str = "none",
                      fsdp: bool = False) -> list[dict]:
    """Every (config, method, N) under torchrun, and with ``fsdp`` each sharded too; prints a table per config."""
    results = []
    for config in configs:
        rows = [_data_parallel_row(bench.name, config, m, n, device, warmup, reps, amp, sharded)
                for m in methods for sharded in ((False, True) if fsdp else (False,)) for n in nprocs]
        print(f"\n### {bench.name} {json.dumps(config)}  (device {device}, torchrun, {reps} reps per run, "
              f"runs one after another)\n")
        print(format_data_parallel_table(rows), flush=True)
        results.extend(rows)
    return results


def _data_parallel_row(name: str, config: dict, method: str, nproc: int, device: torch.device, warmup: int,
                       reps: int, amp: str, sharded: bool) -> dict:
    """One row of ``run_data_parallel``; ``peak_mem_mb``/``peak_total_mb``: the largest rank's."""
    row = measure_data_parallel(name, {**config, "fsdp": True} if sharded else config, method, nproc, device,
                                warmup, reps, amp)
    for key in ("peak_mem_mb", "peak_total_mb", "peak_model_mb"):
        per_rank = [x for x in row.get(f"{key}_per_rank", []) if x is not None]
        row[key] = max(per_rank) if per_rank else None
    return {"benchmark": name, "config": config, "method": method + SHARDED if sharded else method,
            "sharded": sharded, "device": str(device), "reps": reps, "amp": amp, **row}


def check_data_parallel_plan(plan: Sequence[tuple[Benchmark, tuple[str, ...], list[dict]]], nprocs: Sequence[int],
                             device: torch.device) -> None:
    """CLIError unless every config has a ``batch`` that every N divides, and N GPUs exist on CUDA."""
    if device.type == "cuda" and max(nprocs) > torch.cuda.device_count():
        raise CLIError(f"--nproc {max(nprocs)} needs {max(nprocs)} GPUs; this machine has "
                       f"{torch.cuda.device_count()}")
    for bench, _, configs in plan:
        for config in configs:
            if "batch" not in config:
                raise CLIError(f"--nproc: benchmark {bench.name} config {json.dumps(config)} has no 'batch' to share")
            bad = [n for n in nprocs if config["batch"] % n]
            if bad:
                raise CLIError(f"--nproc {bad}: {bench.name}'s batch {config['batch']} does not split evenly over "
                               f"{bad[0]} processes; choose --nproc values that divide it")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def format_table(rows: list[dict], reference: str) -> str:
    """Markdown table of one benchmark config, ratios to ``reference``."""
    ref = next((r for r in rows if r["method"] == reference), None)
    # data-parallel rows also give the model's own peak (model, optimiser and step: ``data_parallel_worker``),
    # the figure comparable with CUDA's allocated bytes; their memory ratio is then of that
    model = any(r.get("peak_model_mb") is not None for r in rows)
    key = "peak_model_mb" if model else "peak_mem_mb"
    lines = ["| method | s / meta-step | time ratio | peak MB (above start) | "
             + ("peak MB (model and step) | " if model else "") + "memory ratio | peak MB (process total) |",
             "|---" * (7 if model else 6) + "|"]
    for r in rows:
        if r["time_s"] is not None:
            t_ratio = r["time_s"] / ref["time_s"] if ref and ref["time_s"] else None
            timing = f"{r['time_s']:.4g} ± {r['time_std_s']:.2g}"
        else:  # --no-time: each method's own memory process, not interleaved
            solo, ref_solo = r.get("solo_time_s"), (ref or {}).get("solo_time_s")
            t_ratio = solo / ref_solo if solo is not None and ref_solo else None
            timing = (f"{solo:.4g} (alone)" if solo is not None else
                      "refused (the reason is in the file)" if _refused(r.get("error")) else
                      "failed (the error is in the file)" if r.get("error") else "not timed")
        m_ratio = r[key] / ref[key] if ref and r.get(key) is not None and ref.get(key) else None
        lines.append(f"| {r['method']} | {timing} | {_fmt(t_ratio)} | {_fmt(r.get('peak_mem_mb'), 4)} | "
                     + (f"{_fmt(r.get('peak_model_mb'), 4)} | " if model else "")
                     + f"{_fmt(m_ratio)} | {_fmt(r.get('peak_total_mb'), 4)} |")
    return "\n".join(lines)


def run_benchmark(bench: Benchmark, configs: Sequence[dict], methods: Sequence[str], device: torch.device,
                  warmup: int, reps: int, memory: bool, mem_steps: int, timing: bool = True,
                  amp: str = "none") -> list[dict]:
    """Time and/or memory of ``methods`` for each config; prints a table per config.

    ``timing=False`` skips the one process that holds every method (for configs where all
    methods together do not fit in memory); memory is still measured per method, each alone.
    """
    results = []
    for config in configs:
        times = time_methods(bench, config, methods, device, warmup, reps, amp) if timing else {}
        rows = []
        for m in methods:
            row = {"benchmark": bench.name, "config": config, "method": m,
                   "time_s": statistics.mean(times[m]) if timing else None,
                   "time_std_s": (statistics.stdev(times[m]) if len(times[m]) > 1 else 0.0) if timing else None,
                   "reps": reps if timing else 0, "device": str(device), "amp": amp}
            if memory:
                row.update(measure_memory(bench.name, config, m, device, warmup, mem_steps, amp))
            rows.append(row)
        how = f"{reps} interleaved reps" if timing else f"each method alone, {mem_steps} measured steps"
        precision = "" if amp == "none" else f", autocast {amp}"
        print(f"\n### {bench.name} {json.dumps(config)}  (device {device}{precision}, {how}, ratios to {bench.reference})\n")
        print(format_table(rows, bench.reference), flush=True)
        results.extend(rows)
    return results


def plan_benchmark(bench: Benchmark, methods: Sequence[str] | None, indices: Sequence[int] | None,
                   quick: bool) -> tuple[Benchmark, tuple[str, ...], list[dict]]:
    """``(bench, methods, configs)`` to run, from ``--methods``/``--config``/``--quick``.

    Raises:
        CLIError: naming the benchmark, for a method it lacks or a config index out of range.
    """
    methods = tuple(methods or bench.methods)
    known = bench.methods + bench.extra_methods
    bad = [m for m in methods if m not in known]
    if bad:
        raise CLIError(f"benchmark {bench.name} has no method(s) {bad}; it has {list(known)}")
    configs = bench.quick_configs if quick else bench.configs
    if indices:
        out_of_range = [i for i in indices if not 0 <= i < len(configs)]
        if out_of_range:
            raise CLIError(f"--config {out_of_range} out of range for {bench.name}: its "
                           f"{'quick ' if quick else ''}configs are 0..{len(configs) - 1}")
        configs = [configs[i] for i in indices]
    return bench, methods, list(configs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.bench", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all registered)")
    parser.add_argument("--list", action="store_true", help="list registered benchmarks and exit")
    parser.add_argument("--methods", nargs="+", help="subset of methods (default: the benchmark's)")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' small configs")
    parser.add_argument("--config", type=int, nargs="+", help="indices of configs to run (default: all)")
    parser.add_argument("--reps", type=int, default=10, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--mem-steps", type=int, default=3, help="measured steps in each memory process")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    parser.add_argument("--no-time", action="store_true",
                        help="skip the interleaved timing process: each method runs alone in its memory "
                             "process, which also reports its own (not interleaved) seconds per step; for "
                             "configs too big for all methods in one process")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_amp_arg(parser)  # --amp none|bf16|fp16, as the trainers'
    parser.add_argument("--out", help="write all rows to this JSON file")
    parser.add_argument("--nproc", type=int, nargs="+",
                        help="data parallel: run each method under torchrun with each of these numbers of processes "
                             "(e.g. 1 2), every rank on 1/N of the batch; seconds per iteration and peak memory per rank")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --nproc: every method also with its model sharded over the processes (FSDP2, "
                             "common.fsdp), rows '<method>, sharded'")
    parser.add_argument("--memory-worker", nargs=3, metavar=("NAME", "CONFIG_JSON", "METHOD"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--dp-worker", nargs=3, metavar=("NAME", "CONFIG_JSON", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.mem_steps < 1:
        raise CLIError("--reps and --mem-steps must be >= 1 and --warmup >= 0")
    if args.no_time and args.no_memory:
        raise CLIError("--no-time and --no-memory together leave nothing to measure")
    if args.nproc and min(args.nproc) < 1:
        raise CLIError(f"--nproc takes numbers of processes >= 1, got {args.nproc}")
    if args.fsdp and not args.nproc:
        raise CLIError("--fsdp shards the model over processes: give their numbers with --nproc (e.g. --nproc 2)")
    device = select_device(args.device)
    if args.out and not args.memory_worker:
        prepare_out_file(args.out)  # before the benchmarks: an unwritable --out would lose every measurement

    if args.dp_worker:
        name, config, method = args.dp_worker
        row = data_parallel_worker(name, json.loads(config), method, device, args.warmup, args.reps, args.amp)
        if row is not None:
            print(json.dumps(row))
        return
    if args.memory_worker:
        name, config, method = args.memory_worker
        print(json.dumps(memory_worker(name, json.loads(config), method, device, args.warmup, args.reps, args.amp)))
        return

    registry = discover()
    if args.list:
        for b in registry.values():
            extra = f" (also: {', '.join(b.extra_methods)})" if b.extra_methods else ""
            print(f"{b.name}: methods {', '.join(b.methods)}{extra} (reference {b.reference}); "
                  f"{len(b.configs)} configs. {b.description}")
        return
    unknown = [n for n in args.names if n not in registry]
    if unknown:
        raise CLIError(f"unknown benchmark(s) {unknown}; registered: {sorted(registry)}")
    plan = [plan_benchmark(registry[name], args.methods, args.config, args.quick)
            for name in args.names or sorted(registry)]  # every request checked before any runs
    all_rows = []
    if args.nproc:
        check_data_parallel_plan(plan, args.nproc, device)
    for bench, methods, configs in plan:
        if args.nproc:
            all_rows += run_data_parallel(bench, configs, methods, args.nproc, device, args.warmup, args.reps, args.amp,
                                          args.fsdp)
            continue
        all_rows += run_benchmark(bench, configs, methods, device, args.warmup, args.reps,
                                  not args.no_memory, args.mem_steps, timing=not args.no_time, amp=args.amp)
    if args.out:
        atomic_write_json(args.out, {"rows": all_rows, "env": env_info(), "argv": list(argv or sys.argv[1:])})


if __name__ == "__main__":
    run_cli(main)
