"""Every paper-shape benchmark on one CUDA GPU, methods side by side: one JSON and one Markdown table.

    python -m common.gpu_bench --out results/gpu_bench                  # make gpu-bench (CUDA)
    python -m common.gpu_bench --budget-s 300 --out results/gpu_bench   # drop the slowest configs first
    python -m common.gpu_bench --device cpu --quick --out results/gpu_bench_cpu   # the CPU form (tests)

A thin wrapper over ``common.bench``: the configurations and methods are the experiments' own
registered benchmarks (``<folder>/bench.py``); this module only picks which (``PLAN``), budgets
them, and writes the results in one place.

* Time: for each configuration every method's step is built in this process and the methods take
  turns, ``--reps`` rounds after ``--warmup`` untimed steps each, with ``torch.cuda.synchronize``
  before and after every timed step (``common.bench.time_methods``).
* Memory: each method runs alone in its own process (``--memory-worker``). On CUDA one process per
  (benchmark, method) measures that method's configurations one after another, freeing everything
  and calling ``torch.cuda.reset_peak_memory_stats`` between them; the peak is
  ``torch.cuda.max_memory_allocated``: tensors only, the CUDA context (some hundreds of MiB,
  outside the allocator) is not counted. On the CPU (the test form) peak resident memory can only
  grow, so each (configuration, method) gets its own process.
* Budget: every configuration has a guessed cost (``Job.est_step_s``, seconds per step on an
  H100-class card, times the steps it takes, plus process start-up); with ``--budget-s`` the
  most expensive configurations are dropped first until the estimate fits, and, while running,
  a configuration whose (rescaled) estimate no longer fits in the time left is skipped. Both
  lists are printed and written to the JSON.

Output (``--out DIR``): ``gpu_bench.json`` (rows, plan, skipped, environment: torch, CUDA, card)
and ``gpu_bench.md``: per benchmark, seconds per iteration and peak MiB with ratios to the
benchmark's reference (second-order) method and, for LFT, whether the method fits a 12 GB card
(peak allocation ≤ 12,288 MiB, CUDA context excluded).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.bench import Benchmark, time_methods
from common.profiling import EfficiencyMeter, peak_rss_mb
from common.results import atomic_write_json, env_info
from common.runtime import CLIError, prepare_out, DefaultsHelpFormatter, run_cli, select_device

REPO_ROOT = Path(__file__).resolve().parent.parent
BUDGET_12GB_MIB = 12 * 1024
STARTUP_S = {"cuda": 15.0, "cpu": 5.0}   # guessed start-up of one memory process (imports, CUDA context)
FIT_BENCHMARKS = ("cross_domain_fewshot",)  # whose table says what fits under 12 GB (the paper's claim)


@dataclass(frozen=True)
class Job:
    """One configuration of a registered benchmark and the methods to run side by side on it.

    ``est_step_s`` is a guess of one step's seconds on an H100-class GPU, used only to order the
    configurations and to fit them into ``--budget-s`` (not a measurement).
    """

    benchmark: str
    config_index: int
    methods: tuple[str, ...]
    est_step_s: float


ROTATION_METHODS = ("second_order", "evograd", "evograd_low_memory", "evograd_batched")
MWN_METHODS = ("mwn_second_order", "baseline", "mwn_evograd", "finite_difference", "evograd_batched")
MWN_K_METHODS = ("mwn_second_order", "mwn_evograd", "evograd_batched")
LFT_METHODS = ("lft_second_order", "lft_evograd")
METAXL_METHODS = ("metaxl", "joint_training", "metaxl_evograd")

PLAN: tuple[Job, ...] = (
    # LFT at the paper's episode (224 px, 5-way 5-shot, 16 queries, two episodes): ResNet10/18/34
    Job("cross_domain_fewshot", 0, LFT_METHODS, 0.25),
    Job("cross_domain_fewshot", 1, LFT_METHODS, 0.35),
    Job("cross_domain_fewshot", 2, LFT_METHODS, 0.6),
    # MWN ResNet-32 at CIFAR shapes (batch 100): widths 1, 2, 4 at K = 2; width 1 at K = 5, 10
    Job("label_noise_mwn", 0, MWN_METHODS, 0.06),
    Job("label_noise_mwn", 1, MWN_METHODS, 0.08),
    Job("label_noise_mwn", 2, MWN_METHODS, 0.12),
    Job("label_noise_mwn", 4, MWN_K_METHODS, 0.1),
    Job("label_noise_mwn", 5, MWN_K_METHODS, 0.16),
    # MetaXL: XLM-R base (random init), batch 12, length 200
    Job("metaxl", 0, METAXL_METHODS, 0.4),
    # rotation LeNet: widths 1, 2, 4, 8, 16 at K = 2; width 1 at K = 5, 10; width 4 at K = 5, 10
    *(Job("rotation", i, ROTATION_METHODS, 0.02) for i in range(5)),
    Job("rotation", 5, ROTATION_METHODS, 0.04), Job("rotation", 6, ROTATION_METHODS, 0.07),
    Job("rotation", 8, ROTATION_METHODS, 0.05), Job("rotation", 9, ROTATION_METHODS, 0.08),
)


def quick_plan() -> tuple[Job, ...]:
    """The CPU form: each benchmark's first quick config, with all the methods the plan runs on it."""
    jobs: dict[str, Job] = {}
    for job in PLAN:
        methods = jobs[job.benchmark].methods if job.benchmark in jobs else ()
        merged = methods + tuple(m for m in job.methods if m not in methods)
        jobs[job.benchmark] = Job(job.benchmark, 0, merged, 0.05)
    return tuple(jobs.values())


def load_benchmark(name: str) -> Benchmark:
    """Import ``<name>/bench.py`` (found by file, beside ``common/``) and return its registration."""
    if not (REPO_ROOT / name / "bench.py").is_file():
        raise CLIError(f"no benchmark file {name}/bench.py in {REPO_ROOT.name}: an incomplete checkout?")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    importlib.import_module(f"{name}.bench")
    return importlib.import_module("common.bench").REGISTRY[name]


def job_cost_s(job: Job, warmup: int, reps: int, mem_steps: int) -> float:
    """Estimated seconds of one job: timed rounds plus each method's memory run (start-up not included)."""
    return job.est_step_s * len(job.methods) * (warmup + reps + warmup + mem_steps)


def select_jobs(jobs: Sequence[Job], budget_s: float | None, warmup: int, reps: int, mem_steps: int,
                startup_s: float) -> tuple[list[Job], list[Job]]:
    """(kept, skipped): the cheapest jobs first while the estimate fits ``budget_s``; plan order kept.

    A benchmark's first kept job also pays the start-up of its memory processes (one per method).
    """
    if budget_s is None:
        return list(jobs), []
    kept_ids, paid, total = set(), set(), 0.0
    for i in sorted(range(len(jobs)), key=lambda i: job_cost_s(jobs[i], warmup, reps, mem_steps)):
        job = jobs[i]
        cost = job_cost_s(job, warmup, reps, mem_steps)
        if job.benchmark not in paid:
            cost += startup_s * len(job.methods)
        if total + cost <= budget_s:
            kept_ids.add(i)
            paid.add(job.benchmark)
            total += cost
    return ([j for i, j in enumerate(jobs) if i in kept_ids], [j for i, j in enumerate(jobs) if i not in kept_ids])


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def memory_worker(name: str, method: str, configs: list[dict], device: torch.device, warmup: int,
                  steps: int) -> list[dict]:
    """In a fresh process: peak memory of ``method`` on each config in turn (see the module docstring)."""
    bench = load_benchmark(name)
    rows = []
    for config in configs:
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        try:
            step = bench.make_step(method, config, device)
            meter = EfficiencyMeter(device, warmup=warmup)
            for _ in range(warmup + steps):
                with meter.step():
                    step()
            total = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
            rows.append({"peak_mem_mb": meter.peak_mem_mb(), "peak_total_mb": total, "before_build_mb": before_mb,
                         "solo_time_s": meter.summary()["meta_step_s"]})
            del step, meter
        except torch.cuda.OutOfMemoryError as err:
            rows.append({"error": f"CUDA out of memory: {str(err).splitlines()[0]}"})
    return rows


def measure_memory(name: str, method: str, configs: list[dict], device: torch.device, warmup: int, steps: int,
                   timeout_s: float | None) -> list[dict]:
    """``memory_worker`` in its own process; one error row per config if it fails or times out."""
    cmd = [sys.executable, "-m", "common.gpu_bench", "--memory-worker", name, method, json.dumps(configs),
           "--device", device.type, "--warmup", str(warmup), "--mem-steps", str(steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [{"error": f"memory process timed out after {timeout_s:.0f} s"}] * len(configs)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return [{"error": tail}] * len(configs)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(x: float | None, ref: float | None) -> str:
    return "n/a" if x is None or not ref else f"{x / ref:.2f}"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _peak(row: dict, cuda: bool) -> float | None:
    """CUDA: the whole allocation peak (what must fit on the card); CPU: resident peak above the start."""
    return row.get("peak_total_mb") if cuda else row.get("peak_mem_mb")


def format_markdown(rows: list[dict], references: dict[str, str], device: torch.device, env: dict,
                    skipped: list[str]) -> str:
    """One table per benchmark: s / it and peak MiB with ratios to its reference method."""
    cuda = device.type == "cuda"
    where = (f"{env.get('cuda_device', 'CUDA')}, torch {torch.__version__}, CUDA {torch.version.cuda}" if cuda
             else f"CPU, torch {torch.__version__}")
    lines = [f"# GPU benchmark ({where})", "",
             "Seconds per iteration: methods interleaved in one process, synchronised around each step. "
             + ("Peak MiB: `torch.cuda.max_memory_allocated` of each method alone in its own process "
                "(tensors only; the CUDA context is not included)." if cuda else
                "Peak MiB: resident memory above the level before the first step, each method alone in its own "
                "process (the CPU form: not CUDA numbers)."),
             f"12 GB = {BUDGET_12GB_MIB:,} MiB.", ""]
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        ref = references[name]
        fit = name in FIT_BENCHMARKS
        lines += [f"## {name} (ratios to {ref})", "",
                  "| config | method | s / it | time ratio | peak MiB | memory ratio |" + (" fits 12 GB |" if fit else ""),
                  "|---|---|---|---|---|---|" + ("---|" if fit else "")]
        bench_rows = [r for r in rows if r["benchmark"] == name]
        for config_index in dict.fromkeys(r["config_index"] for r in bench_rows):
            group = [r for r in bench_rows if r["config_index"] == config_index]
            base = next((r for r in group if r["method"] == ref), {})
            for r in group:
                peak = _peak(r, cuda)
                cells = [f"{config_index}: {json.dumps(r['config'])}", r["method"], _num(r.get("time_s"), ".4g"),
                         _ratio(r.get("time_s"), base.get("time_s")),
                         r["error"] if r.get("error") else _num(peak, ",.0f"), _ratio(peak, _peak(base, cuda))]
                if fit:
                    cells.append("n/a" if peak is None or not cuda else ("yes" if peak <= BUDGET_12GB_MIB else "**no**"))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if skipped:
        lines += ["Skipped (time budget): " + "; ".join(skipped), ""]
    return "\n".join(lines)


def describe(job: Job) -> str:
    return f"{job.benchmark} config {job.config_index}"


def run(jobs: Sequence[Job], device: torch.device, budget_s: float | None, warmup: int, reps: int,
        mem_steps: int, quick: bool, on_benchmark_done: Callable[[list[dict], list[str]], None] | None = None
        ) -> tuple[list[dict], list[str]]:
    """Time every kept job (in this process) and measure its memory (other processes); rows and skips.

    ``on_benchmark_done(rows, skipped)`` is called after each benchmark (to save partial results).
    """
    startup_s = STARTUP_S[device.type]
    kept, dropped = select_jobs(jobs, budget_s, warmup, reps, mem_steps, startup_s)
    skipped = [f"{describe(j)} (estimated {job_cost_s(j, warmup, reps, mem_steps):.0f} s)" for j in dropped]
    if skipped:
        print("skipping, slowest first to go, to fit --budget-s:\n  " + "\n  ".join(skipped), flush=True)
    start, estimated_done, spent_done = time.perf_counter(), 0.0, 0.0
    rows: list[dict] = []
    for name in dict.fromkeys(j.benchmark for j in kept):
        bench = load_benchmark(name)
        configs = bench.quick_configs if quick else bench.configs
        bench_rows: dict[str, list[dict]] = {}   # method -> its rows, in job order
        for job in (j for j in kept if j.benchmark == name):
            elapsed = time.perf_counter() - start
            scale = max(1.0, spent_done / estimated_done) if estimated_done else 1.0
            estimate = job_cost_s(job, warmup, reps, mem_steps) * scale
            if budget_s is not None and elapsed + estimate > budget_s:
                skipped.append(f"{describe(job)} (ran out of budget: {elapsed:.0f} s spent, ~{estimate:.0f} s needed)")
                print(f"skipping {skipped[-1]}", flush=True)
                continue
            config = configs[job.config_index]
            t0 = time.perf_counter()
            try:
                times = time_methods(bench, config, job.methods, device, warmup, reps)
            except Exception as err:  # one failing config (say out of memory) must not lose the others
                first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
                skipped.append(f"{describe(job)} (failed: {type(err).__name__}: {first_line})")
                print(f"skipping {skipped[-1]}", flush=True)
                free_memory(device)
                continue
            free_memory(device)
            for m in job.methods:
                bench_rows.setdefault(m, []).append(
                    {"benchmark": name, "config_index": job.config_index, "config": config, "method": m,
                     "time_s": statistics.mean(times[m]),
                     "time_std_s": statistics.stdev(times[m]) if len(times[m]) > 1 else 0.0,
                     "reps": reps, "device": str(device)})
            print(f"timed {describe(job)} in {time.perf_counter() - t0:.1f} s: "
                  + ", ".join(f"{m} {statistics.mean(times[m]):.4g} s" for m in job.methods), flush=True)
            spent_done += (time.perf_counter() - t0) * 2   # the memory runs take about as long again
            estimated_done += job_cost_s(job, warmup, reps, mem_steps)
        for method, method_rows in bench_rows.items():
            per_process = [method_rows] if device.type == "cuda" else [[r] for r in method_rows]
            for group in per_process:
                left = None if budget_s is None else max(budget_s - (time.perf_counter() - start), 30.0)
                results = measure_memory(name, method, [r["config"] for r in group], device, warmup, mem_steps, left)
                for r, mem in zip(group, results):
                    r.update(mem)
            print(f"memory {name} {method}: " + ", ".join(
                f"config {r['config_index']} {_num(r.get('peak_total_mb'), ',.0f')} MiB" for r in method_rows), flush=True)
        rows += [r for job in kept if job.benchmark == name for m in job.methods
                 for r in bench_rows.get(m, []) if r["config_index"] == job.config_index]
        if on_benchmark_done is not None:
            on_benchmark_done(rows, skipped)
    return rows, skipped


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.gpu_bench", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (the point of this command) or cpu (with --quick: the test form)")
    parser.add_argument("--quick", action="store_true", help="each benchmark's tiny quick config instead of the plan")
    parser.add_argument("--only", nargs="+", metavar="BENCHMARK", help="run only these benchmarks of the plan")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget in seconds: drop the most expensive configurations first to fit it")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (time and memory)")
    parser.add_argument("--mem-steps", type=int, default=2, help="measured steps in each memory run")
    parser.add_argument("--out", default="results/gpu_bench", help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--memory-worker", nargs=3, metavar=("NAME", "METHOD", "CONFIGS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.mem_steps < 1:
        raise CLIError("--reps and --mem-steps must be >= 1 and --warmup >= 0")
    if args.budget_s is not None and args.budget_s <= 0:
        raise CLIError(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device visible to torch (install the CUDA build of torch); "
                       "for the CPU form run --device cpu --quick")
    device = select_device(args.device)
    if args.memory_worker:
        name, method, configs = args.memory_worker
        print(json.dumps(memory_worker(name, method, json.loads(configs), device, args.warmup, args.mem_steps)))
        return
    out = prepare_out(args.out)  # a file, a path under a file or an unwritable folder: refused before any work
    jobs = quick_plan() if args.quick else PLAN
    if args.only:
        unknown = sorted(set(args.only) - {j.benchmark for j in jobs})
        if unknown:
            raise CLIError(f"--only: {unknown} not in the plan; choose from {sorted({j.benchmark for j in jobs})}")
        jobs = tuple(j for j in jobs if j.benchmark in args.only)
    benches = {name: load_benchmark(name) for name in dict.fromkeys(j.benchmark for j in jobs)}
    for job in jobs:   # the plan against the registrations, before any work
        bench = benches[job.benchmark]
        configs = bench.quick_configs if args.quick else bench.configs
        bad = [m for m in job.methods if m not in bench.methods + bench.extra_methods]
        if job.config_index >= len(configs) or bad:
            raise CLIError(f"{describe(job)}: not registered by {job.benchmark}/bench.py (methods {bad})")
    started = time.perf_counter()
    env = env_info()
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
    references = {name: bench.reference for name, bench in benches.items()}

    def save(rows: list[dict], skipped: list[str]) -> str:
        markdown = format_markdown(rows, references, device, env, skipped)
        atomic_write_json(out / "gpu_bench.json", {
            "rows": rows, "skipped": skipped, "plan": [asdict(j) for j in jobs], "references": references,
            "memory": "cuda_max_allocated_mib_context_excluded" if device.type == "cuda" else "cpu_peak_rss_mb",
            "budget_12gb_mib": BUDGET_12GB_MIB, "wall_s": time.perf_counter() - started, "env": env,
            "argv": list(argv if argv is not None else sys.argv[1:])})
        (out / "gpu_bench.md").write_text(markdown + "\n")
        return markdown

    rows, skipped = run(jobs, device, args.budget_s, args.warmup, args.reps, args.mem_steps, args.quick, save)
    print("\n" + save(rows, skipped))
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
