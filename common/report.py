"""Turn a results folder into Markdown tables and a figure index.

    python -m common.report RESULTS_DIR [--output RESULTS_DIR/report.md]

Runs are grouped by (experiment, setting, method); every scalar metric and efficiency figure is
shown as mean ± std over seeds (sample std, n−1; "±0" for a single seed is shown as the value
alone). The paper's numbers, where known, are read from one data file,
``common/paper_numbers.json`` (each experiment's entry with its source), and shown in rows
marked "paper" right below ours. Every PNG under the folder is listed at the end. A results file
that cannot be read (malformed, truncated, not UTF-8, ``"metrics": null``) is named in a warning
and skipped; a run found twice (same experiment, setting, method and seed) is counted once.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from common.results import load_results
from common.runtime import CLIError, run_cli

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.json")
EFFICIENCY_COLUMNS = ("meta_step_s", "peak_mem_mb")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: Sequence[float]) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    digits = 2 if abs(mean) >= 1 else 4
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def load_paper_numbers(path: Path = PAPER_NUMBERS) -> dict:
    """``{experiment: {"source": str, "settings": {setting: {method: {metric: str}}}}}`` from ``path``."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def deduplicate(records: list[dict]) -> list[dict]:
    """Keep one record per run (experiment, setting, method, seed): a run found twice (a copied
    file, a folder reported with its parent) would otherwise count as two seeds. The first by path
    is kept; each dropped copy is named in a warning on stderr."""
    kept: dict[tuple, dict] = {}
    for rec in records:
        key = (rec["experiment"], rec.get("setting", ""), rec["method"], rec["seed"])
        if key in kept:
            print(f"warning: {rec.get('_path', 'a results file')} is the same run as "
                  f"{kept[key].get('_path', 'another file')} (experiment {key[0]}, setting {key[1]!r}, "
                  f"method {key[2]}, seed {key[3]}); counting it once", file=sys.stderr)
            continue
        kept[key] = rec
    return list(kept.values())


def build_report(records: list[dict], paper: dict, figures: Sequence[Path] = (), root: Path | None = None) -> str:
    """Markdown report of ``records`` (as from ``load_results``)."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        groups[(rec["experiment"], rec.get("setting", ""))][rec["method"]].append(rec)

    lines = ["# Results", "", f"{len(records)} runs. Mean ± std over seeds (n = number of seeds).", ""]
    for (experiment, setting), by_method in sorted(groups.items()):
        metrics = sorted({k for runs in by_method.values() for r in runs
                          for k, v in r["metrics"].items() if _is_scalar(v)})
        paper_entry = paper.get(experiment, {})
        paper_rows = paper_entry.get("settings", {}).get(setting, {})
        metrics += sorted({k for row in paper_rows.values() for k in row} - set(metrics))
        columns = metrics + list(EFFICIENCY_COLUMNS)
        title = f"## {experiment}" + (f" — {setting}" if setting else "")
        lines += [title, "", "| method | n | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for method in sorted(by_method):
            runs = by_method[method]
            cells = []
            for col in metrics:
                cells.append(format_mean_std([r["metrics"][col] for r in runs if _is_scalar(r["metrics"].get(col))]))
            for col in EFFICIENCY_COLUMNS:
                cells.append(format_mean_std([r["efficiency"][col] for r in runs
                                              if _is_scalar(r["efficiency"].get(col))]))
            lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
            if method in paper_rows:
                paper_cells = [str(paper_rows[method].get(col, "")) for col in columns]
                lines.append(f"| {method} (paper) | | " + " | ".join(paper_cells) + " |")
        for method in sorted(set(paper_rows) - set(by_method)):
            lines.append(f"| {method} (paper) | | " + " | ".join(str(paper_rows[method].get(c, "")) for c in columns) + " |")
        if paper_rows and paper_entry.get("source"):
            lines += ["", f"Paper numbers: {paper_entry['source']}"]
        devices = sorted({r["efficiency"].get("device", "?") for runs in by_method.values() for r in runs})
        lines += ["", f"Efficiency measured on: {', '.join(devices)}. Seconds per meta-iteration after warm-up; "
                  "peak memory above the level before the training loop.", ""]
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            rel = fig.relative_to(root) if root else fig
            lines.append(f"![{fig.stem}]({rel})")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.report", description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", help="folder with results JSON files (searched recursively)")
    parser.add_argument("--output", help="Markdown file to write (default RESULTS_DIR/report.md)")
    args = parser.parse_args(argv)
    root = Path(args.results_dir)
    try:
        records = load_results(root)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if not records:
        raise CLIError(f"no results files in {root}; run an experiment with --out {root} first")
    records = deduplicate(records)
    figures = sorted(root.rglob("*.png"))
    text = build_report(records, load_paper_numbers(), figures, root)
    out = Path(args.output) if args.output else root / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    run_cli(main)
