"""The rotation experiment's paper-style table and figures from results files.

    python -m rotation.eval results/rotation [--setting mnist]          # table + angle plot
    python -m rotation.eval results/rotation --bench results/rotation/bench.json   # scaling plot

The table gives mean ± std over seeds (sample std, n−1; the original notebook printed numpy's
population std) of accuracy on the rotated test set, on the test set rotated back by −30°, and
the final learned angle, per method. The angle plot shows the learned angle after every
iteration for every seed. ``--bench`` plots seconds per meta-iteration and peak memory against
LeNet's parameter count from a ``python -m common.bench rotation --out FILE`` run.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt

from common.plotting import save_figure
from common.results import load_results, skipped_markdown
from common.runtime import CLIError, DefaultsHelpFormatter, run_cli
from rotation.model import LeNet, n_parameters

EXPERIMENT = "rotation"
TABLE_METRICS = (("test_acc_rotated", "rotated test acc (%)"), ("test_acc_rotated_back", "rotated back acc (%)"),
                 ("angle_deg", "learned angle (°)"))


def load_runs(folder: str | Path, setting: str | None = None,
              skipped: list[tuple[Path, str]] | None = None) -> list[dict]:
    """Rotation results files under ``folder``, optionally of one setting; files that cannot be read
    go to ``skipped`` as (path, why)."""
    try:
        records = load_results(folder, skipped)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return [r for r in records if r["experiment"] == EXPERIMENT and (setting is None or r.get("setting") == setting)]


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary_table(runs: list[dict]) -> str:
    """Markdown table: one row per (setting, method), mean ± std over seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run.get("setting", ""), run["method"])].append(run)
    lines = ["| setting | method | seeds | " + " | ".join(label for _, label in TABLE_METRICS)
             + " | s / iteration | peak MB |", "|---|---|---|" + "---|" * (len(TABLE_METRICS) + 2)]
    for (setting, method), group in sorted(groups.items()):
        cells = [_mean_std([r["metrics"][key] for r in group if key in r["metrics"]]) for key, _ in TABLE_METRICS]
        speed = [r["efficiency"]["meta_step_s"] for r in group if r["efficiency"].get("meta_step_s") is not None]
        memory = [r["efficiency"]["peak_mem_mb"] for r in group if r["efficiency"].get("peak_mem_mb") is not None]
        speed_cell = f"{statistics.fmean(speed):.4f}" if speed else "–"
        memory_cell = f"{statistics.fmean(memory):.0f}" if memory else "–"
        lines.append(f"| {setting} | {method} | {len(group)} | " + " | ".join(cells) + f" | {speed_cell} | {memory_cell} |")
    return "\n".join(lines)


def plot_angles(runs: list[dict], stem: str | Path, legend_below: bool = False,
                formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Learned angle (degrees) against iterations, one line per seed, one panel per method; with
    ``legend_below`` each panel's legend goes under its axes, clear of the curves."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if run["metrics"].get("angles_deg"):
            by_method[run["method"]].append(run)
    if not by_method:
        return []
    fig, axes = plt.subplots(1, len(by_method), figsize=(5 * len(by_method), 3.6), squeeze=False, sharey=True)
    for ax, (method, group) in zip(axes[0], sorted(by_method.items())):
        for run in sorted(group, key=lambda r: r["seed"]):
            ax.plot(run["metrics"]["angles_deg"], linewidth=1.2, label=f"seed {run['seed']}")
        target = group[0]["config"].get("rotation_deg", 30.0)
        ax.axhline(target, color="k", linestyle="--", linewidth=0.8, label=f"true {target:g}°")
        ax.set(title=method, xlabel="iteration")
        if legend_below:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
        else:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("learned angle (°)")
    return save_figure(fig, stem, formats)


def headline_figure(records: list[dict], stem: Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """The learned angle over iterations for every seed of each method in ``records`` (results records
    as from ``common.results.load_results``; runs without angles, the baseline's, are left out);
    at ``stem`` in ``formats``."""
    return plot_angles([r for r in records if r.get("experiment") == EXPERIMENT], stem, legend_below=True,
                       formats=formats)


def summarise(folder: str | Path, setting: str | None = None) -> str:
    """Print the table and write ``rotation_<setting>_angles.png/.pdf`` and ``rotation_<setting>_table.md``."""
    skipped: list[tuple[Path, str]] = []
    runs = load_runs(folder, setting, skipped)
    if not runs:
        raise CLIError(f"no rotation results{f' of setting {setting}' if setting else ''} in {folder}")
    table = summary_table(runs)
    if skipped:   # a run that could not be read must not vanish from the table unnoticed
        table += "\n\n" + "\n".join(skipped_markdown(skipped, "Skipped files (not in the table):")).rstrip()
    name = f"rotation_{setting}" if setting else "rotation"
    (Path(folder) / f"{name}_table.md").write_text(table + "\n")
    for path in plot_angles(runs, Path(folder) / f"{name}_angles"):
        print(f"wrote {path}")
    print(table)
    return table


def plot_scaling(bench_file: str | Path, stem: str | Path) -> list[Path]:
    """From a bench JSON file: time and peak memory against parameter count (K = 2), and the time
    ratio to the second-order step (same config, interleaved, so machine-load drift cancels) against K."""
    rows = json.loads(Path(bench_file).read_text())["rows"]
    fig, (ax_time, ax_mem, ax_k) = plt.subplots(1, 3, figsize=(15, 3.8))
    by_width: dict[str, list[tuple[int, float, float | None]]] = defaultdict(list)
    by_k: dict[int, dict[str, float]] = defaultdict(dict)
    for row in rows:
        config = row["config"]
        k, width = config.get("k", 2), config.get("width", 1)
        if k == 2:
            by_width[row["method"]].append((n_parameters(LeNet(width)), row["time_s"], row.get("peak_mem_mb")))
        if width == 1:
            by_k[k][row["method"]] = row["time_s"]
    for method, points in sorted(by_width.items()):
        points.sort()
        ax_time.plot([p for p, _, _ in points], [t for _, t, _ in points], marker="o", label=method)
        mem = [(p, m) for p, _, m in points if m is not None]
        if mem:
            ax_mem.plot(*zip(*mem), marker="o", label=method)
    for method in sorted({m for times in by_k.values() for m in times if m.startswith("evograd")}):
        points = [(k, times[method] / times["second_order"]) for k, times in sorted(by_k.items())
                  if method in times and times.get("second_order")]
        ax_k.plot(*zip(*points), marker="o", label=method)
    ax_k.axhline(1.0, color="k", linestyle="--", linewidth=0.8, label="second_order")
    for ax, ylabel in ((ax_time, "seconds / iteration (K = 2)"), (ax_mem, "peak memory above start, MB (K = 2)")):
        ax.set(xscale="log", yscale="log", xlabel="LeNet parameters", ylabel=ylabel)
        ax.legend(fontsize=8)
    ax_k.set(xlabel="K (EvoGrad candidates), width 1", ylabel="time / second-order time")
    ax_k.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rotation.eval", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("results_dir", help="folder with rotation results JSON files")
    parser.add_argument("--setting", default=None, help="only this setting (mnist, mnist5k, mnist5k-quick)")
    parser.add_argument("--bench", default=None, help="bench JSON (python -m common.bench rotation --out FILE) to plot")
    args = parser.parse_args(argv)
    if args.bench:
        if not Path(args.bench).is_file():
            raise CLIError(f"bench file {args.bench} does not exist")
        for path in plot_scaling(args.bench, Path(args.results_dir) / "rotation_scaling"):
            print(f"wrote {path}")
        return
    summarise(args.results_dir, args.setting)


if __name__ == "__main__":
    run_cli(main)
