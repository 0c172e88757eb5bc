"""The paper's tables from results files, and every generated table of the docs.

    python -m common.report DIR [--output DIR/report.md]   # report.md, report.html, diagnostics.csv
    python -m common.report --docs [--check]                # refill the docs' generated tables from runs/

For each experiment the report shows the paper's table (rows = methods, columns = the paper's
metrics only: rotation: rotated-test accuracy, rotated back, learned angle; 1-D: Pearson r and MAE
per K; MWN: test accuracy per noise setting; LFT: accuracy per unseen domain; MetaXL: F1 per
target language), mean ± sample std (n − 1) over seeds, the paper's value in a row right below
ours where ``common/paper_numbers.json`` has one (with its source), and an efficiency table from
the same runs: seconds per meta-iteration and peak memory as ratios to the second-order method,
with the device and the machine's load. Every other scalar a run logged (losses, FWT scales,
candidate spreads) goes to ``diagnostics.csv``. ``report.html`` is one self-contained page with
the figures found under DIR inline. A results file that cannot be read is named in the report.

``--docs`` finds every block ``<!-- report: KIND ARGS -->`` ... ``<!-- /report -->`` in the
README, the experiment READMEs, ``docs/`` and ``common/HYPERGRAD_STUDY.md`` and replaces its body
with what the committed results give (kinds: ``headline DIR...``, ``paper EXPERIMENT DIR...``,
``efficiency EXPERIMENT DIR...``, ``study STUDY_JSON [PROBLEM...]``, ``bench BENCH_JSON``); it
also redraws each experiment's headline figure (``<experiment>.eval.headline_figure``) into
``docs/figures/``. ``--check`` changes nothing and exits 1 naming every block that differs, so that
docs and results cannot drift apart (a test runs it).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import importlib
import io
import json
import os
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.memory_model import SHARDED
from common.results import check_writable_dir, load_results, skipped_markdown
from common.runtime import CLIError, run_cli

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.json")
REPO_ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ("README.md", "*/README.md", "docs/*.md", "common/HYPERGRAD_STUDY.md")
MARKER = re.compile(r"(<!-- report: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


# ---------------------------------------------------------------------------------------------
# what each experiment's table looks like
# ---------------------------------------------------------------------------------------------

def _noise_label(match: re.Match) -> str:
    kind = {"unif": "uniform", "flip": "flip", "flip2": "flip (2 classes)"}.get(match["kind"], match["kind"])
    return f"{kind} {100 * float(match['p']):g} %"


@dataclass(frozen=True)
class Spec:
    """How one experiment's paper table is laid out.

    Either ``columns`` (label, metric): one table per setting, a column per metric; or ``metric``
    with ``column_of``: a regex on the setting whose match is the column (noise level, unseen domain,
    target language) and whose removal leaves the table ("family"); or ``per_k``: one row per K.
    """
    title: str
    details: str                                   # link to the experiment's README
    methods: tuple[str, ...]                       # row order (others follow, sorted)
    reference: str | None                          # the second-order method: ratios are to it
    evograd: str
    baseline: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    metric: str | None = None
    metric_label: str = ""
    column_of: str | None = None
    column_label: Callable[[re.Match], str] = lambda m: m.group(1)
    ci_metric: str | None = None                   # a run's own 95 % CI half-width (one seed: acc ± CI)
    per_k: bool = False


SPECS: dict[str, Spec] = {
    "illustration_1d": Spec(
        "1-D illustration", "illustration_1d/README.md", ("evograd",), None, "evograd", per_k=True),
    "rotation": Spec(
        "Rotation (MNIST, LeNet)", "rotation/README.md", ("baseline", "second_order", "evograd"),
        "second_order", "evograd", "baseline",
        columns=(("rotated test acc (%)", "test_acc_rotated"), ("rotated back (%)", "test_acc_rotated_back"),
                 ("learned angle (°)", "angle_deg"))),
    "label_noise_mwn": Spec(
        "Label noise: Meta-Weight-Net", "label_noise_mwn/README.md",
        ("baseline", "mwn_second_order", "mwn_evograd"), "mwn_second_order", "mwn_evograd", "baseline",
        metric="final_test_acc", metric_label="test acc (%)",
        column_of=r"-(?P<kind>unif|flip2|flip)(?P<p>[\d.]+)$", column_label=_noise_label),
    "cross_domain_fewshot": Spec(
        "Cross-domain few-shot: LFT", "cross_domain_fewshot/README.md",
        ("baseline", "lft_second_order", "lft_evograd"), "lft_second_order", "lft_evograd", "baseline",
        metric="test_acc", metric_label="accuracy (%)", column_of=r"unseen=(\S+)", ci_metric="test_ci95"),
    "metaxl": Spec(
        "Cross-lingual NER: MetaXL", "metaxl/README.md", ("joint_training", "metaxl", "metaxl_evograd"),
        "metaxl", "metaxl_evograd", "joint_training",
        metric="test_f1", metric_label="F1", column_of=r"^[^-]+-[^-]+-([^-]+)-"),
}


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _digits(x: float) -> int:
    return 2 if abs(x) >= 1 else 4


def format_mean_std(values: Sequence[float], digits: int | None = None) -> str:
    """``"m ± s"`` (sample std), the mean alone for one value, "" for none."""
    if not values:
        return ""
    mean, std = mean_std(values)
    d = _digits(mean) if digits is None else digits
    return f"{mean:.{d}f}" if std is None else f"{mean:.{d}f} ± {std:.{d}f}"


def _scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_paper_numbers(path: Path = PAPER_NUMBERS) -> dict:
    """``{experiment: {"source": str, "settings": {setting: {method: {metric: str}}}, ...}}``."""
    return json.loads(path.read_text()) if path.is_file() else {}


def deduplicate(records: list[dict]) -> list[dict]:
    """One record per run (experiment, setting, method, seed): a run found twice (a copied file, a
    folder reported with its parent) would otherwise count as two seeds. The first by path is kept;
    each dropped copy is named in a warning on stderr."""
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


@dataclass
class Table:
    """A titled table with notes below it; rendered as Markdown or HTML."""
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    level: int = 3

    def markdown(self, with_title: bool = True) -> str:
        lines = [f"{'#' * self.level} {self.title}", ""] if with_title else []
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"{note}" for note in self.notes]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{_inline_html(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        notes = "".join(f"<p class='note'>{_inline_html(n)}</p>" for n in self.notes)
        return f"<h{self.level}>{_inline_html(self.title)}</h{self.level}><table><tr>{head}</tr>{body}</table>{notes}"


def _inline_html(text: str) -> str:
    """Markdown links and bold in a cell, the rest escaped."""
    out = html.escape(text)
    out = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"<a href='\2'>\1</a>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _method_order(spec: Spec | None, methods) -> list[str]:
    first = [m for m in (spec.methods if spec else ()) if m in methods]
    return first + sorted(set(methods) - set(first))


def _cell(runs: list[dict], metric: str, ci_metric: str | None, n_row: int) -> str:
    values = [r["metrics"][metric] for r in runs if _scalar(r["metrics"].get(metric))]
    if not values:
        return ""
    text = format_mean_std(values)
    if ci_metric and len(values) == 1 and _scalar(runs[0]["metrics"].get(ci_metric)):
        text += f" ± {runs[0]['metrics'][ci_metric]:.2f}"
    return text + (f" (n = {len(values)})" if len(values) != n_row else "")


def _seeds(runs: list[dict]) -> str:
    return str(len({r["seed"] for r in runs}))


def _family_and_column(spec: Spec, setting: str) -> tuple[str, str] | None:
    match = re.search(spec.column_of, setting)
    if not match:
        return None
    before, after = setting[:match.start()], setting[match.end():]
    if not after:
        family = before.rstrip("-_ ")
    elif not before:
        family = after.lstrip("-_ ")
    else:
        family = f"{before}…{after}"
    return family, spec.column_label(match)


def _paper_source(paper_entry: dict) -> list[str]:
    return [f"Paper rows: {paper_entry['source']}"] if paper_entry.get("source") else []


def result_tables(experiment: str, records: list[dict], paper: dict) -> list[Table]:
    """The paper-shaped tables of one experiment's runs (and of paper settings not run here)."""
    spec = SPECS.get(experiment)
    entry = paper.get(experiment, {})
    paper_settings = entry.get("settings", {})
    if spec is None:
        return generic_tables(experiment, records, paper_settings)
    if spec.per_k:
        return [_per_k_table(spec, records, paper_settings, entry)]
    if spec.columns:
        tables = []
        by_setting: dict[str, list[dict]] = defaultdict(list)
        for rec in records:
            by_setting[rec.get("setting", "")].append(rec)
        for setting in sorted(set(by_setting) | set(paper_settings)):
            runs = by_setting.get(setting, [])
            by_method: dict[str, list[dict]] = defaultdict(list)
            for r in runs:
                by_method[r["method"]].append(r)
            prow = paper_settings.get(setting, {})
            rows = []
            for method in _method_order(spec, set(by_method) | set(prow)):
                if method in by_method:
                    n = len(by_method[method])
                    rows.append([method, str(n)] + [_cell(by_method[method], metric, None, n)
                                                    for _, metric in spec.columns])
                if method in prow:
                    rows.append([f"{method} (paper)", ""] + [prow[method].get(metric, "") for _, metric in spec.columns])
            notes = ["Mean ± sample std over seeds; n = seeds."] + (_paper_source(entry) if prow else [])
            if not runs:
                notes.append("Not run here: paper rows only.")
            tables.append(Table(f"{spec.title} — {setting}", ["method", "n"] + [c for c, _ in spec.columns],
                                rows, notes))
        return tables
    return _settings_tables(spec, records, paper_settings, entry)


def _settings_tables(spec: Spec, records: list[dict], paper_settings: dict, entry: dict) -> list[Table]:
    cells: dict[str, dict[str, dict[str, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    columns: dict[str, list[str]] = defaultdict(list)
    for rec in records:
        where = _family_and_column(spec, rec.get("setting", ""))
        if where is None:  # e.g. LFT's pretraining runs: diagnostics only
            continue
        family, column = where
        cells[family][rec["method"]][column].append(rec)
        if column not in columns[family]:
            columns[family].append(column)
    paper_cells: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for setting, by_method in paper_settings.items():
        where = _family_and_column(spec, setting)
        if where is None:
            continue
        family, column = where
        if column not in columns[family]:
            columns[family].append(column)
        for method, values in by_method.items():
            if spec.metric in values:
                paper_cells[family][method][column] = values[spec.metric]
    tables = []
    for family in sorted(columns):
        cols = columns[family]  # in the order of the settings' names (records come sorted by path)
        ours, theirs = cells.get(family, {}), paper_cells.get(family, {})
        rows = []
        for method in _method_order(spec, set(ours) | set(theirs)):
            if method in ours:
                n = max(len(v) for v in ours[method].values())
                rows.append([method, str(n)] + [_cell(ours[method].get(c, []), spec.metric, spec.ci_metric, n)
                                                for c in cols])
            if method in theirs:
                rows.append([f"{method} (paper)", ""] + [theirs[method].get(c, "") for c in cols])
        notes = ["Mean ± sample std over seeds; n = seeds."]
        if spec.ci_metric:
            notes[0] += " With one seed: accuracy ± the 95 % confidence interval over its test episodes."
        notes += _paper_source(entry) if theirs else []
        if not ours:
            notes.append("Not run here: paper rows only.")
        tables.append(Table(f"{spec.title} — {family}: {spec.metric_label}", ["method", "n"] + cols, rows, notes))
    return tables


def _per_k_table(spec: Spec, records: list[dict], paper_settings: dict, entry: dict) -> Table:
    ks = sorted({int(m.group(1)) for r in records for key in r["metrics"]
                 if (m := re.fullmatch(r"pearson_r_k(\d+)", key))})
    prow = paper_settings.get("", {}).get(spec.evograd, {})
    rows = []
    for k in ks:
        n = len([r for r in records if _scalar(r["metrics"].get(f"pearson_r_k{k}"))])
        rows.append([str(k), str(n), _cell(records, f"pearson_r_k{k}", None, n), _cell(records, f"mae_k{k}", None, n),
                     prow.get(f"pearson_r_k{k}", ""), prow.get(f"mae_k{k}", "")])
    notes = ["EvoGrad's hypergradient against the true one over a grid of λ; mean ± sample std over seeds."]
    return Table(spec.title, ["K", "n", "Pearson r", "MAE", "Pearson r (paper)", "MAE (paper)"], rows,
                 notes + (_paper_source(entry) if prow else []))


def generic_tables(experiment: str, records: list[dict], paper_settings: dict) -> list[Table]:
    """Every scalar metric, one table per setting: for experiments without a paper layout."""
    tables = []
    by_setting: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        by_setting[rec.get("setting", "")][rec["method"]].append(rec)
    for setting, by_method in sorted(by_setting.items()):
        metrics = sorted({k for runs in by_method.values() for r in runs for k, v in r["metrics"].items()
                          if _scalar(v)})
        rows = []
        for method in sorted(by_method):
            n = len(by_method[method])
            rows.append([method, str(n)] + [_cell(by_method[method], m, None, n) for m in metrics])
            prow = paper_settings.get(setting, {}).get(method)
            if prow:
                rows.append([f"{method} (paper)", ""] + [prow.get(m, "") for m in metrics])
        tables.append(Table(f"{experiment}" + (f" — {setting}" if setting else ""), ["method", "n"] + metrics, rows))
    return tables


def _mean_of(runs: list[dict], key: str) -> float | None:
    values = [r["efficiency"][key] for r in runs if _scalar(r["efficiency"].get(key))]
    return statistics.fmean(values) if values else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def efficiency_table(experiment: str, records: list[dict]) -> Table | None:
    """Seconds per meta-iteration and peak memory of the same runs, as ratios to second-order."""
    spec = SPECS.get(experiment)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if rec["efficiency"].get("meta_step_s") is not None or rec["efficiency"].get("peak_mem_mb") is not None:
            by_method[rec["method"]].append(rec)
    if not by_method:
        return None
    reference = by_method.get(spec.reference, []) if spec and spec.reference else []
    ref_t, ref_m = _mean_of(reference, "meta_step_s"), _mean_of(reference, "peak_mem_mb")
    rows = []
    for method in _method_order(spec, by_method):
        runs = by_method[method]
        t, m = _mean_of(runs, "meta_step_s"), _mean_of(runs, "peak_mem_mb")
        rows.append([method, str(len(runs)), "" if t is None else f"{t:.3g}", _ratio(t, ref_t),
                     "" if m is None else f"{m:.4g}", _ratio(m, ref_m)])
    runs = [r for rs in by_method.values() for r in rs]
    devices = sorted({str(r["efficiency"].get("device", "?")) for r in runs})
    gpus = sorted({r["env"].get("gpu") for r in runs if r.get("env", {}).get("gpu")})
    loads = [r["env"]["load_avg_1min"] for r in runs if _scalar(r.get("env", {}).get("load_avg_1min"))]
    kinds = sorted({str(r["efficiency"].get("memory_kind")) for r in runs if r["efficiency"].get("memory_kind")})
    note = (f"Device: {', '.join(devices + gpus)}. Mean over the runs of each run's seconds per meta-iteration "
            f"(after warm-up) and peak memory ({', '.join(kinds) or 'above the level before training'}).")
    if loads:
        note += f" Load average when the runs ended: {min(loads):.1f}–{max(loads):.1f}."
    note += " Ratios are to " + (f"`{spec.reference}`." if spec and spec.reference else "nothing (no second-order run).")
    note += " For interleaved, quieter timings see `python -m common.bench`."
    ref_label = "× second-order"
    return Table(f"{SPECS[experiment].title if spec else experiment}: cost of the same runs",
                 ["method", "runs", "s / iteration", ref_label, "peak MB", ref_label], rows, [note])


def headline_table(records: list[dict], paper: dict, link_prefix: str = "") -> Table:
    """One row per (experiment, table, column): baseline, second-order and EvoGrad, ours and the
    paper's, and EvoGrad's time and memory as ratios to second-order from the same runs."""
    by_exp: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_exp[rec["experiment"]].append(rec)
    rows = []
    for experiment in (e for e in SPECS if e in by_exp):
        spec, runs = SPECS[experiment], by_exp[experiment]
        eff = efficiency_table(experiment, runs)
        t_ratio, m_ratio = next(((r[3], r[5]) for r in (eff.rows if eff else []) if r[0] == spec.evograd), ("", ""))
        link = f"[{spec.title}]({link_prefix}{spec.details})"
        for table in result_tables(experiment, runs, paper):
            if spec.per_k:  # the first K: EvoGrad only, no second-order to compare with
                k, n, r, _, paper_r = table.rows[0][:5]
                rows.append([link, "", f"Pearson r, K = {k}", "", "", r, paper_r, "", "", n])
                continue
            ours = {row[0]: row for row in table.rows}
            if spec.evograd not in ours:  # a paper setting not run here
                continue
            setting = table.title.split(" — ", 1)[1].split(":")[0]
            for col in [2] if spec.columns else range(2, len(table.header)):  # the first metric, or every column
                what = table.header[col] + ("" if spec.columns else f" ({spec.metric_label})")
                cells = [ours[m][col] if m in ours else "" for m in
                         (spec.baseline, spec.reference, spec.evograd, f"{spec.evograd} (paper)")]
                rows.append([link, setting, what] + cells + [t_ratio, m_ratio, ours[spec.evograd][1]])
    header = ["experiment", "setting", "metric", "baseline", "second-order", "EvoGrad", "EvoGrad (paper)",
              "EvoGrad time ÷ 2nd-order", "EvoGrad memory ÷ 2nd-order", "seeds"]
    return Table("Results at a glance", header, rows, [
        "Ours: mean ± sample std over seeds from the committed results files; paper: the published value "
        "where the setting is the paper's (sources in `common/paper_numbers.json`). Time and memory: the "
        "same runs, EvoGrad's mean ÷ second-order's mean (each experiment's page gives the device and load)."])


def study_tables(study_json: Path, problems: Sequence[str] = ()) -> list[Table]:
    """The estimator study's tables, one per problem, from its ``study.json``."""
    if not Path(study_json).is_file():
        raise CLIError(f"{study_json}: no such study file; write it with python -m common.hypergrad_study "
                       f"--out {Path(study_json).parent}")
    hypergrad_study = importlib.import_module("common.hypergrad_study")
    rows_by_problem = hypergrad_study.load_rows([study_json])
    tables = []
    for problem in problems or sorted(rows_by_problem):
        if problem not in rows_by_problem:
            raise CLIError(f"{study_json} has no problem {problem!r}; it has {sorted(rows_by_problem)}")
        text = hypergrad_study.format_table(rows_by_problem[problem])
        lines = text.splitlines()
        tables.append(Table(problem, _split_row(lines[0]), [_split_row(line) for line in lines[2:]], level=4))
    return tables


def bench_tables(bench_json: Path) -> list[Table]:
    """``common.bench`` output: one table per (benchmark, config), ratios to its reference method."""
    if not Path(bench_json).is_file():
        raise CLIError(f"{bench_json}: no such benchmark file; write it with python -m common.bench --out {bench_json}")
    bench = importlib.import_module("common.bench")
    data = json.loads(Path(bench_json).read_text())
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in data["rows"]:
        groups[(row["benchmark"], json.dumps(row.get("config", {}), sort_keys=True))].append(row)
    registry = bench.discover()
    tables = []
    for (name, config), rows in groups.items():
        # ratios to the benchmark's registered reference (the second-order method) when it was run
        reference = rows[0].get("reference") or (registry[name].reference if name in registry else None)
        if reference not in {r["method"] for r in rows}:
            reference = rows[0]["method"]
        lines = bench.format_table(rows, reference).splitlines()
        env = data.get("env", {})
        load = env.get("load_avg_1min")
        note = (f"`{name}` config {config}; ratios to `{reference}`; device {rows[0].get('device', env.get('gpu') or 'cpu')}, "
                f"torch {env.get('torch', '?')}, {env.get('torch_threads', '?')} thread(s)"
                + (f", load average {load} when it ended" if load is not None else "")
                + f"; command: `{env.get('command') or 'python -m common.bench'}`.")
        tables.append(Table(f"{name}", _split_row(lines[0]), [_split_row(line) for line in lines[2:]], [note], level=4))
        plain = registry[name].plain + SHARDED if name in registry and registry[name].plain else None
        yardstick = next((r for r in rows if r["method"] == plain and r.get("peak_model_mb")), None)
        if yardstick is not None:
            tables.append(sharded_memory_table(name, config, rows, yardstick))
    return tables


def sharded_memory_table(name: str, config: str, rows: list[dict], plain: dict) -> Table:
    """Every measured row against the plain sharded training iteration (``plain``): the sharded memory target."""
    body = []
    for r in rows:
        if r.get("peak_model_mb") is None:
            continue
        body.append([r["method"], f"{r['peak_model_mb']:.4g}", f"{r['peak_model_mb'] / plain['peak_model_mb']:.3g}",
                     f"{r['time_s']:.4g}", f"{r['time_s'] / plain['time_s']:.3g}"])
    threshold = plain.get("cpu_malloc_mmap_threshold")
    note = (f"`{name}` config {config}, {plain['processes']} processes: each row's peak per rank (the larger rank's) "
            f"of what the model, its optimiser and the iteration hold (CUDA's allocated bytes; on CPU the resident "
            f"set above the process before the model was built"
            + (f", glibc's MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "")
            + f"), against `{plain['method']}`, a plain sharded training iteration of the same model.")
    return Table(f"{name}: memory against plain sharded training",
                 ["method", "peak MB per rank (model and step)", f"ratio to `{plain['method']}`", "s / iteration",
                  "time ratio"], body, [note], level=4)


def _split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def diagnostics_csv(records: list[dict]) -> str:
    """Every scalar metric and efficiency figure of every run, one line each (long format)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["experiment", "setting", "method", "seed", "field", "value", "file"])
    for rec in records:
        for group in ("metrics", "efficiency"):
            for key, value in sorted(rec.get(group, {}).items()):
                if _scalar(value):
                    writer.writerow([rec["experiment"], rec.get("setting", ""), rec["method"], rec["seed"],
                                     f"{group}.{key}", repr(value), rec.get("_path", "")])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# the report of a folder
# ---------------------------------------------------------------------------------------------

def report_sections(records: list[dict], paper: dict) -> list[tuple[str, list[Table]]]:
    """[(experiment title, [result tables..., efficiency table])], experiments in the paper's order."""
    by_exp: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_exp[rec["experiment"]].append(rec)
    order = [e for e in SPECS if e in by_exp] + sorted(set(by_exp) - set(SPECS))
    sections = []
    for experiment in order:
        tables = result_tables(experiment, by_exp[experiment], paper)
        eff = efficiency_table(experiment, by_exp[experiment])
        sections.append((SPECS[experiment].title if experiment in SPECS else experiment,
                         tables + ([eff] if eff else [])))
    return sections


def build_report(records: list[dict], paper: dict, figures: Sequence[Path] = (), root: Path | None = None,
                 skipped: Sequence[tuple[Path, str]] = (), link_prefix: str = "") -> str:
    """Markdown report of ``records`` (as from ``load_results``); ``link_prefix`` leads from the
    report's folder to the repository root (the headline rows link to the experiment pages)."""
    lines = ["# Results", "", f"{len(records)} runs. Mean ± sample std over seeds (n = number of seeds); every "
             "other logged scalar is in `diagnostics.csv`.", ""]
    lines += skipped_markdown(skipped, "**Skipped files** (not in any table):")
    if any(r["experiment"] in SPECS for r in records):
        lines += [headline_table(records, paper, link_prefix).markdown(), ""]
    for title, tables in report_sections(records, paper):
        lines += [f"## {title}", ""] + [t.markdown() + "\n" for t in tables]
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}]({f.relative_to(root) if root else f})" for f in figures] + [""]
    return "\n".join(lines)


HTML_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
              "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
              "text-align:left}th{background:#f3f3f3}.note{color:#555;font-size:90%}img{max-width:100%}")


def build_html(records: list[dict], paper: dict, figures: Sequence[Path] = (),
               skipped: Sequence[tuple[Path, str]] = (), link_prefix: str = "") -> str:
    """One self-contained page: the same tables, the figures inline (base64 PNG)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>EvoGrad reproduction: results</title>"
             f"<style>{HTML_STYLE}</style></head><body><h1>Results</h1>",
             f"<p>{len(records)} runs. Mean ± sample std over seeds; every other logged scalar is in "
             "diagnostics.csv.</p>"]
    if skipped:
        parts.append("<p><b>Skipped files</b> (not in any table):</p><ul>" + "".join(
            f"<li><code>{html.escape(str(p))}</code>: {html.escape(w)}</li>" for p, w in skipped) + "</ul>")
    if any(r["experiment"] in SPECS for r in records):
        parts.append(headline_table(records, paper, link_prefix).html())
    for title, tables in report_sections(records, paper):
        parts.append(f"<h2>{html.escape(title)}</h2>" + "".join(t.html() for t in tables))
    if figures:
        parts.append("<h2>Figures</h2>")
        for fig in figures:
            data = base64.b64encode(fig.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(fig.stem)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(fig.stem)}</figcaption></figure>")
    return "".join(parts) + "</body></html>\n"


# ---------------------------------------------------------------------------------------------
# the docs' generated blocks
# ---------------------------------------------------------------------------------------------

def _records(dirs: Sequence[str], root: Path) -> list[dict]:
    records = []
    for d in dirs:
        folder = root / d
        if not folder.is_dir():
            raise CLIError(f"generated block names {d}, which does not exist; commit its results or fix the block")
        records += load_results(folder)
    return deduplicate(records)


def render_block(args: str, root: Path = REPO_ROOT, link_prefix: str = "") -> str:
    """The Markdown body of one ``<!-- report: ARGS -->`` block."""
    kind, *rest = args.split()
    paper = load_paper_numbers()
    if kind == "headline":
        return headline_table(_records(rest, root), paper, link_prefix).markdown(with_title=False)
    if kind in ("paper", "efficiency") and rest:
        experiment, dirs = rest[0], rest[1:]
        records = [r for r in _records(dirs, root) if r["experiment"] == experiment]
        if not records:
            raise CLIError(f"generated block '{args}': no {experiment} results in {' '.join(dirs)}")
        if kind == "efficiency":
            eff = efficiency_table(experiment, records)
            return eff.markdown(with_title=False) if eff else ""
        tables = result_tables(experiment, records, paper)
        eff = efficiency_table(experiment, records)
        return "\n\n".join(t.markdown() for t in tables + ([eff] if eff else []))
    if kind == "study" and rest:
        return "\n\n".join(t.markdown() for t in study_tables(root / rest[0], rest[1:]))
    if kind == "bench" and rest:
        return "\n\n".join(t.markdown() for t in bench_tables(root / rest[0]))
    if kind == "capacity" and len(rest) >= 3:  # METHOD+sharded names the sharded row "METHOD, sharded"
        from common.memory_model import capacity_of_file
        return capacity_of_file(root / rest[0], rest[1], [m.replace("+sharded", SHARDED) for m in rest[2:]])
    raise CLIError(f"unknown generated block '<!-- report: {args} -->'; kinds: headline DIR..., paper EXP DIR..., "
                   "efficiency EXP DIR..., study JSON [PROBLEM...], bench JSON, capacity JSON BENCHMARK METHOD...")


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    return sorted({p for pattern in DOC_FILES for p in root.glob(pattern) if p.is_file()})


def fill_docs(root: Path = REPO_ROOT, check: bool = False) -> list[str]:
    """Refill every generated block of the docs; with ``check``, change nothing. Returns the blocks
    (``file: args``) whose text differs from what the committed results give."""
    stale = []
    for path in doc_files(root):
        text = path.read_text()
        prefix = "../" * (len(path.relative_to(root).parts) - 1)

        def fill(match: re.Match) -> str:
            body = render_block(match["args"], root, prefix).rstrip("\n") + "\n"
            if body != match["body"]:
                stale.append(f"{path.relative_to(root)}: {match['args']}")
            return match.group(1) + body + match.group(4)

        new = MARKER.sub(fill, text)
        if new != text and not check:
            path.write_text(new)
    return stale


# (experiment, committed results folder) whose headline figure ``--docs`` redraws into docs/figures
STUDY_FIGURES = "runs/hypergrad_study/study.json"
DOC_FIGURES = (("illustration_1d", "runs/illustration_1d"), ("rotation", "runs/rotation_mnist"),
               ("label_noise_mwn", "runs/label_noise_mwn_mnist"))


def draw_doc_figures(root: Path = REPO_ROOT) -> list[Path]:
    """Each experiment's headline figure from its committed runs (``<experiment>.eval.headline_figure``)."""
    written = []
    for experiment, folder in DOC_FIGURES:
        records = _records([folder], root)
        draw = importlib.import_module(f"{experiment}.eval").headline_figure
        written += draw(records, root / "docs" / "figures" / f"{experiment}_headline", formats=("png",))
    study_json = root / STUDY_FIGURES
    if study_json.is_file():   # the estimator study's two figures, from its committed study.json
        hypergrad_study = importlib.import_module("common.hypergrad_study")
        written += hypergrad_study.draw_figures(hypergrad_study.load_rows([study_json]), root / "docs" / "figures",
                                                prefix="hypergrad_", formats=("png",))
    return written   # the docs show PNGs; PDFs stay with the runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.report", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("results_dir", nargs="?", help="folder with results JSON files (searched recursively)")
    parser.add_argument("--output", help="Markdown file to write; report.html and diagnostics.csv go beside it "
                        "(default: RESULTS_DIR/report.md)")
    parser.add_argument("--docs", action="store_true", help="refill the docs' generated tables from the committed "
                        "results and redraw the headline figures")
    parser.add_argument("--check", action="store_true", help="with --docs: change nothing, exit 1 if any "
                        "generated table differs from the committed results")
    args = parser.parse_args(argv)
    if args.docs:
        if args.results_dir or args.output:
            raise CLIError("--docs reads the folders its blocks name; leave out RESULTS_DIR and --output")
        stale = fill_docs(check=args.check)
        if args.check:
            for block in stale:
                print(f"stale: {block}", file=sys.stderr)
            if stale:
                raise SystemExit(1)
            print(f"every generated table of {len(doc_files())} docs matches the committed results")
            return
        figures = draw_doc_figures()
        print(f"refilled {len(stale)} block(s); drew {len(figures)} figure file(s)")
        return
    if args.check:
        raise CLIError("--check goes with --docs")
    if not args.results_dir:
        raise CLIError("the following arguments are required: results_dir (or --docs)")
    root = Path(args.results_dir)
    out = Path(args.output) if args.output else root / "report.md"
    if out.is_dir():
        raise CLIError(f"--output {out} is a folder; give a file name such as {out / 'report.md'}")
    try:
        check_writable_dir(out.parent)
    except ValueError as err:
        raise CLIError(f"--output {out}: {err}") from None
    skipped: list[tuple[Path, str]] = []
    try:
        records = load_results(root, skipped)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if not records:
        raise CLIError(f"no results files in {root}; run an experiment with --out {root} first")
    records = deduplicate(records)
    figures = sorted(root.rglob("*.png"))
    paper = load_paper_numbers()
    link_prefix = Path(os.path.relpath(REPO_ROOT, out.parent.resolve())).as_posix() + "/"
    text = build_report(records, paper, figures, root, skipped, link_prefix)
    out.write_text(text)
    out.with_suffix(".html").write_text(build_html(records, paper, figures, skipped, link_prefix))
    out.with_name("diagnostics.csv").write_text(diagnostics_csv(records))
    # The tables live in the files; the terminal gets where they are.
    print(f"{len(records)} results files, {len({r.get('experiment') for r in records})} experiment(s)")
    print(f"wrote {out}, {out.with_suffix('.html')} and {out.with_name('diagnostics.csv')}")


if __name__ == "__main__":
    run_cli(main)
