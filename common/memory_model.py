"""The largest model each method fits on a device: a linear memory model, fitted to measured rows.

A model, not a measurement. From two rows of ``common.bench --nproc N --fsdp`` that differ only
in the model's size (parameter counts P_1 < P_2), each method's cost per parameter is the slope of
its peak memory per rank (process total),

    a = (m_2 − m_1) / (P_2 − P_1)      bytes per parameter per rank, measured under N ranks
    α = a · N  (sharded rows)  or  a  (replicated rows)      bytes per parameter of the whole model

and the largest model that fits in M bytes per device on D devices is

    P_max = M · D / α  (sharded: every device holds 1/D of θ and of everything sized like θ)
    P_max = M / α      (replicated: every device holds all of it)

What the model leaves out: the memory that does not grow with P (the framework's own, the
activations of the per-device batch, which the slope also picks up where they grow with the
model's width) and, for sharded rows, the one FSDP unit gathered whole while it runs, which does
not shrink with D (a model of many small units makes it small). P_max is thus an upper limit
for a batch whose activations are small next to the parameters.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.runtime import CLIError, DefaultsHelpFormatter, run_cli

GB = 1e9
MEMORIES_GB = (12, 80)
DEVICES = (1, 8, 64)


def bytes_per_parameter(rows: Sequence[Mapping], parameters: Mapping[str, int]) -> dict[str, float]:
    """α (bytes per parameter of the whole model) of every method label, from two sizes of one benchmark.

    ``rows``: ``common.bench --nproc --fsdp`` rows (``method``, ``sharded``, ``processes``,
    ``config``, ``peak_total_mb``); ``parameters``: the whole model's parameter count of each
    config (its JSON, ``json.dumps(config, sort_keys=True)``). Rows that failed are skipped.

    Raises:
        ValueError: unless every method has rows at exactly two configs of different sizes.
    """
    by_method: dict[str, list[tuple[int, float, int, bool]]] = {}
    for row in rows:
        if row.get("peak_total_mb") is None or json.dumps(row["config"], sort_keys=True) not in parameters:
            continue
        size = parameters[json.dumps(row["config"], sort_keys=True)]
        by_method.setdefault(row["method"], []).append((size, row["peak_total_mb"] * 2**20, row["processes"],
                                                        bool(row.get("sharded"))))
    alphas = {}
    for method, points in by_method.items():
        if len(points) != 2 or points[0][0] == points[1][0]:
            raise ValueError(f"{method}: needs rows at two model sizes, got sizes {[p[0] for p in points]}")
        (p1, m1, n, sharded), (p2, m2, _, _) = sorted(points)
        alphas[method] = (m2 - m1) / (p2 - p1) * (n if sharded else 1)
    return alphas


def largest_model(alpha: float, memory_bytes: float, devices: int, sharded: bool) -> float:
    """P_max = M·D/α sharded, M/α replicated (parameters)."""
    if alpha <= 0 or memory_bytes <= 0 or devices < 1:
        raise ValueError(f"alpha, memory and devices must be positive, got {alpha}, {memory_bytes}, {devices}")
    return memory_bytes * (devices if sharded else 1) / alpha


SHARDED = ", sharded"  # the suffix of a sharded row's method label (common.bench writes it, common.report reads it)


def capacity_table(alphas: Mapping[str, float], methods: Sequence[str],
                   memories_gb: Sequence[float] = MEMORIES_GB, devices: Sequence[int] = DEVICES) -> str:
    """Markdown: for each method, α and P_max (millions of parameters) per device memory and device count.

    A sharded method on 1 device is its replicated run (nothing to shard over): that cell uses the
    replicated row's α, or shows "—" without one. An α measured under N ranks charges every device
    N/D times the memory that does not shrink with D, so P_max is not extrapolated to D = 1 from it.
    """
    head = [f"{m:g} GB × {d}" for m in memories_gb for d in devices]
    lines = ["| method | bytes / parameter (α) | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for method in methods:
        alpha, sharded = alphas[method], method.endswith(SHARDED)
        alone = alphas.get(method[:-len(SHARDED)]) if sharded else alpha
        cells = [("—" if alone is None else f"{largest_model(alone, m * GB, 1, False) / 1e6:,.0f} M") if d == 1 else
                 f"{largest_model(alpha, m * GB, d, sharded) / 1e6:,.0f} M" for m in memories_gb for d in devices]
        lines.append(f"| {method} | {alpha:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.memory_model", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("bench_json", help="rows of python -m common.bench BENCHMARK --nproc N --fsdp --out FILE "
                                           "at two model sizes")
    parser.add_argument("--benchmark", default="label_noise_mwn", help="the benchmark whose rows to read")
    parser.add_argument("--methods", nargs="+", default=["mwn_second_order", "mwn_evograd, sharded"],
                        help="method labels of the rows to tabulate")
    args = parser.parse_args(argv)
    print(capacity_of_file(Path(args.bench_json), args.benchmark, args.methods))


def capacity_of_file(path: Path, benchmark: str, methods: Sequence[str]) -> str:
    """``capacity_table`` of the rows of ``benchmark`` in a ``common.bench --out`` file (also ``common.report``'s
    ``capacity`` block); ``CLIError`` naming the file if it cannot."""
    try:
        rows = [r for r in json.loads(Path(path).read_text())["rows"] if r["benchmark"] == benchmark]
    except (OSError, ValueError, KeyError) as err:
        raise CLIError(f"{path}: not a common.bench --out file ({type(err).__name__}: {err})") from None
    sizes = {json.dumps(r["config"], sort_keys=True): r.get("parameters") for r in rows if r.get("parameters")}
    try:
        alphas = bytes_per_parameter(rows, sizes)
        missing = [m for m in methods if m not in alphas]
        if missing:
            raise ValueError(f"no measured rows for {missing}; the file has {sorted(alphas)}")
    except ValueError as err:
        raise CLIError(f"{path}: {err}") from None
    return capacity_table(alphas, methods)


if __name__ == "__main__":
    run_cli(main)
