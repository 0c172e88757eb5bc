"""Peak memory against episode size, from ``common.bench`` outputs, extrapolated to the paper's shape.

    python -m cross_domain_fewshot.memory_fit results/cross_domain_fewshot/bench_*.json \
        --out results/cross_domain_fewshot/memory_fit
    python -m cross_domain_fewshot.memory_fit --measure '{"backbone": "ResNet10", "image_size": 224, \
        "n_way": 5, "n_shot": 5, "n_query": 1}' lft_evograd --append results/cross_domain_fewshot/mem_224.json

``--measure`` runs one method's memory alone (a fresh ``common.bench`` memory worker, one step, no
timing) and appends the row to a bench-format JSON, for episodes too slow to time here.

For every (backbone, method) it fits peak memory (MB above the level before the measured steps)
as a + b·P by least squares, where P is the pixels per episode, n_way·(n_shot + n_query)·side²
(activation memory grows linearly in it), and evaluates the line at the paper's episode
(5-way 5-shot 16 queries at 224×224, P = 5.27 Mpx). The fit comes from small episodes, so the
value at the paper's shape is an EXTRAPOLATION, and on a CPU it is resident memory, not CUDA
memory; the parameters themselves (allocated before the measurement starts) are added to it.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import device as torch_device

from common.bench import measure_memory
from common.plotting import save_figure
from common.results import atomic_write_json
from common.runtime import CLIError, DefaultsHelpFormatter, run_cli
from cross_domain_fewshot.models import build_model

PAPER_PIXELS = 5 * (5 + 16) * 224 ** 2
BUDGET_MB = 12 * 1024


def episode_pixels(config: dict) -> int:
    """Pixels per episode, n_way·(n_shot + n_query)·side²."""
    return config["n_way"] * (config["n_shot"] + config["n_query"]) * config["image_size"] ** 2


def fit_rows(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Least-squares line of peak MB on pixels per episode for each (backbone, method) with ≥ 2 sizes."""
    groups: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row.get("peak_mem_mb") is not None:
            groups[(row["config"]["backbone"], row["method"])].append((episode_pixels(row["config"]), row["peak_mem_mb"]))
    fits = {}
    for key, points in sorted(groups.items()):
        x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
        if len(set(x)) < 2:
            continue
        slope, intercept = np.polyfit(x, y, 1)
        params_mb = sum(p.numel() for p in build_model(key[0], "relationnet_softmax", 224).parameters()) * 4 / 2**20
        predicted = intercept + slope * PAPER_PIXELS + params_mb
        fits[key] = {"points": points, "intercept_mb": intercept, "mb_per_mpx": slope * 1e6, "params_mb": params_mb,
                     "paper_shape_mb": predicted, "fits_12gb": bool(predicted < BUDGET_MB)}
    return fits


def format_fits(fits: dict) -> str:
    lines = ["| backbone | method | points | largest measured episode (Mpx) | intercept MB | MB per Mpx | "
             "params MB | extrapolated peak at 224 px, 5w5s16q (GB) | under 12 GB? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (backbone, method), f in fits.items():
        lines.append(f"| {backbone} | {method} | {len(f['points'])} | {max(p[0] for p in f['points']) / 1e6:.2f} | "
                     f"{f['intercept_mb']:.0f} | {f['mb_per_mpx']:.0f} | {f['params_mb']:.0f} | "
                     f"{f['paper_shape_mb'] / 1024:.1f} | {'yes' if f['fits_12gb'] else 'no'} (extrapolated) |")
    return "\n".join(lines)


def format_measured(rows: list[dict], reference: str = "lft_second_order", other: str = "lft_evograd") -> str:
    """One line per benchmark config: both methods' s/iteration and peak MB side by side, with ratios."""
    by_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_config[json.dumps(row["config"], sort_keys=True)][row["method"]] = row
    lines = ["| backbone | image | queries/class | Mpx/episode | s/it 2nd-order | s/it EvoGrad | time ratio | "
             "peak MB 2nd-order | peak MB EvoGrad | memory ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for methods in by_config.values():
        if reference not in methods or other not in methods:
            continue
        ref, oth, cfg = methods[reference], methods[other], methods[reference]["config"]
        mem = (f"{ref['peak_mem_mb']:.0f} | {oth['peak_mem_mb']:.0f} | {oth['peak_mem_mb'] / ref['peak_mem_mb']:.2f}"
               if ref.get("peak_mem_mb") and oth.get("peak_mem_mb") else "n/a | n/a | n/a")
        times = (f"{ref['time_s']:.2f} | {oth['time_s']:.2f} | {oth['time_s'] / ref['time_s']:.2f}"
                 if ref.get("time_s") and oth.get("time_s") else "not timed | not timed | n/a")
        lines.append(f"| {cfg['backbone']} | {cfg['image_size']} | {cfg['n_query']} | {episode_pixels(cfg) / 1e6:.2f} | "
                     f"{times} | {mem} |")
    return "\n".join(lines)


def plot_fits(fits: dict, stem: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(0, PAPER_PIXELS, 50)
    for (backbone, method), f in fits.items():
        xs, ys = zip(*f["points"])
        line, = ax.plot(np.array(xs) / 1e6, ys, "o")
        ax.plot(grid / 1e6, f["intercept_mb"] + f["mb_per_mpx"] * grid / 1e6, "--", color=line.get_color(),
                label=f"{backbone} {method}")
    ax.axhline(BUDGET_MB, color="k", lw=0.8)
    ax.axvline(PAPER_PIXELS / 1e6, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="pixels per episode (Mpx); dotted: paper shape", ylabel="peak MB above start (CPU RSS)",
           title="measured (dots) and extrapolated (dashed) meta-iteration memory")
    ax.legend(fontsize=7)
    save_figure(fig, stem)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cross_domain_fewshot.memory_fit", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("bench_json", nargs="*", help="files written by python -m common.bench ... --out")
    parser.add_argument("--out", default=None, help="stem for <out>.md and the figure <out>.png/.pdf")
    parser.add_argument("--measure", nargs=2, metavar=("CONFIG_JSON", "METHOD"), help="measure one memory point")
    parser.add_argument("--append", help="with --measure: bench-format JSON file to add the row to")
    args = parser.parse_args(argv)
    if args.measure:
        if not args.append:
            raise CLIError("--measure needs --append FILE")
        config, method = json.loads(args.measure[0]), args.measure[1]
        row = {"config": config, "method": method, "time_s": None,
               **measure_memory("cross_domain_fewshot", config, method, torch_device("cpu"), warmup=0, steps=1)}
        path = Path(args.append)
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        atomic_write_json(path, {"rows": rows + [row]})
        print(json.dumps(row))
        return
    if not args.bench_json:
        raise CLIError("give bench JSON files to fit (or --measure)")
    rows = []
    for path in args.bench_json:
        try:
            rows += json.loads(Path(path).read_text())["rows"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise CLIError(f"cannot read benchmark rows from {path} ({err})") from None
    fits = fit_rows(rows)
    if not fits:
        raise CLIError("no (backbone, method) with memory measured at two or more episode sizes")
    table = format_measured(rows) + "\n\n" + format_fits(fits)
    print(table)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table + "\n")
        plot_fits(fits, Path(args.out))


if __name__ == "__main__":
    run_cli(main)
