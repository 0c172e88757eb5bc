"""Figures of the 1-D illustration from its results file.

    python -m illustration_1d.eval --out results/illustration_1d   # newest results file there

Figure 1 (``hypergradients.png/.pdf``): EvoGrad hypergradient mean ± std over trials against
the ground truth (λ − 1)/(λ + 1)³, one panel per K. Figure 2 (``trajectories.png/.pdf``): (x, λ)
trajectories from five starts, EvoGrad (solid) and ground truth (dashed), over the validation
loss (x − 0.5)².
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.plotting import plt, save_figure
from common.runtime import CLIError, DefaultsHelpFormatter, run_cli


def plot_all(results_file: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw both figures from ``results_file`` into ``out_dir``; return the PNG paths."""
    try:
        record = json.loads(Path(results_file).read_text(encoding="utf-8"))
        curves, paths = record["metrics"]["curves"], record["metrics"]["trajectories"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CLIError(f"{results_file} is not an illustration_1d results file ({type(err).__name__}: {err}); "
                       "rerun python -m illustration_1d.train") from None
    out = Path(out_dir)
    return [plot_hypergradients(curves, out / "hypergradients")[0], plot_trajectories(curves, paths, out / "trajectories")[0]]


def headline_figure(records: list[dict], stem: Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Figure 1 of the first run in ``records`` at ``stem`` and its Figure 2 at ``<stem>_trajectories``."""
    metrics = records[0]["metrics"]
    stem = Path(stem)
    return (plot_hypergradients(metrics["curves"], stem, formats)
            + plot_trajectories(metrics["curves"], metrics["trajectories"], stem.with_name(stem.name + "_trajectories"),
                                formats))


def plot_hypergradients(curves: dict, stem: Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Figure 1: EvoGrad's mean ± std over trials against the ground truth, one panel per K."""
    ks = list(curves["per_k"])
    lam, truth = np.array(curves["lambda"]), np.array(curves["truth"])
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.2), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        c = curves["per_k"][k]
        mean, std = np.array(c["mean"]), np.array(c["std"])
        ax.fill_between(lam, mean - std, mean + std, alpha=0.25, color="tab:blue", label="EvoGrad ± std")
        ax.plot(lam, mean, color="tab:blue", label="EvoGrad mean")
        ax.plot(lam, truth, color="black", ls="--", label="ground truth")
        ax.set_title(f"K = {k}  (r = {c['pearson_r']:.3f})")
        ax.set_xlabel("λ")
    axes[0][0].set_ylabel("dL_val / dλ")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, stem, formats)


def plot_trajectories(curves: dict, paths: dict, stem: Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Figure 2: (x, λ) trajectories from five starts over the validation loss, one panel per K."""
    ks = list(curves["per_k"])
    x_grid = np.linspace(-2, 2, 200)
    l_grid = np.linspace(0, 2, 100)
    background = np.tile((x_grid - 0.5) ** 2, (len(l_grid), 1))
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.4), sharey=True, squeeze=False)
    truth_paths = np.array(paths["truth"])
    for ax, k in zip(axes[0], ks):
        ax.contourf(x_grid, l_grid, background, levels=20, cmap="Greys", alpha=0.6)
        evo = np.array(paths[k])
        for s in range(evo.shape[0]):
            color = f"C{s}"
            ax.plot(evo[s, :, 0], evo[s, :, 1], "-o", ms=3, color=color)
            ax.plot(truth_paths[s, :, 0], truth_paths[s, :, 1], "--", color=color, alpha=0.8)
        ax.set_title(f"K = {k}: EvoGrad (solid) vs ground truth (dashed)", fontsize=9)
        ax.set_xlabel("x")
    axes[0][0].set_ylabel("λ")
    return save_figure(fig, stem, formats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m illustration_1d.eval", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out", default="results/illustration_1d", help="folder with the results file")
    parser.add_argument("--results-file", help="a specific results file (default: newest in --out)")
    args = parser.parse_args(argv)
    if args.results_file:
        results_file = Path(args.results_file)
    else:
        files = sorted(Path(args.out).glob("illustration_1d_*.json"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise CLIError(f"no illustration_1d results in {args.out}; run python -m illustration_1d.train first")
        results_file = files[-1]
    if not results_file.is_file():
        raise CLIError(f"results file {results_file} does not exist")
    for fig in plot_all(results_file, args.out):
        print(f"wrote {fig}")


if __name__ == "__main__":
    run_cli(main)
