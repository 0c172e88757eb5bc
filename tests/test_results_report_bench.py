"""Results files, the report, the efficiency meter and the bench runner."""
import json
import re
import subprocess
import sys

import pytest
import torch

from common import results as results_mod
from common.bench import Benchmark, format_table, run_benchmark
from common.profiling import EfficiencyMeter
from common.report import build_report, format_mean_std, load_paper_numbers
from common.results import atomic_write_json, load_results, write_results

EFF = {"meta_step_s": 0.5, "peak_mem_mb": 10.0, "device": "cpu"}


def test_write_results_is_atomic_and_complete(tmp_path):
    path = write_results(tmp_path, experiment="toy", method="evograd", seed=3, config={"lr": 0.1},
                         metrics={"acc": 90.0, "curve": [1, 2], "bad": float("nan")}, efficiency=EFF, setting="a b")
    record = json.loads(path.read_text())
    assert path.name == "toy_a-b_evograd_seed3.json"
    assert {"experiment", "method", "seed", "setting", "config", "metrics", "efficiency", "env"} <= set(record)
    assert record["metrics"]["bad"] is None and record["env"]["torch"] == torch.__version__
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left
    with pytest.raises(ValueError, match="efficiency"):
        write_results(tmp_path, experiment="toy", method="m", seed=0, config={}, metrics={}, efficiency={})


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = atomic_write_json(tmp_path / "r.json", {"v": 1})

    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(results_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_report_means_stds_and_paper_rows(tmp_path):
    for seed, acc in [(1, 90.0), (2, 92.0), (3, 94.0)]:
        write_results(tmp_path, experiment="rotation", method="evograd", seed=seed, config={},
                      metrics={"test_acc_rotated": acc, "angles": [0.1, 0.2], "final_train_loss": 0.3},
                      efficiency=EFF, setting="mnist")
    (tmp_path / "not_a_result.json").write_text("[1, 2]")
    records = load_results(tmp_path)
    assert len(records) == 3
    paper = {"rotation": {"source": "the paper", "settings": {"mnist": {
        "evograd": {"test_acc_rotated": "98.11 ± 0.32"}, "baseline": {"test_acc_rotated": "81.79 ± 0.64"}}}}}
    text = build_report(records, paper)
    # the paper's columns only: rotated test, rotated back, angle; diagnostics stay out of the table
    assert "| method | n | rotated test acc (%) | rotated back (%) | learned angle (°) |" in text
    assert "| evograd | 3 | 92.00 ± 2.00 |  |  |" in text
    assert "| evograd (paper) |  | 98.11 ± 0.32 |  |  |" in text
    assert "| baseline (paper) |  | 81.79 ± 0.64 |  |  |" in text and "Paper rows: the paper" in text
    assert "angles" not in text and "final_train_loss" not in text
    assert format_mean_std([5.0]) == "5.00"


def _mwn_runs(folder):
    """Two noise settings, three methods, two seeds; second-order twice EvoGrad's time and memory."""
    cost = {"baseline": (0.1, 100.0), "mwn_second_order": (0.8, 400.0), "mwn_evograd": (0.4, 200.0)}
    for setting, base in (("mnist-unif0.6", 80.0), ("mnist-flip0.4", 70.0)):
        for i, method in enumerate(cost):
            for seed in (1, 2):
                t, m = cost[method]
                write_results(folder, experiment="label_noise_mwn", method=method, seed=seed, setting=setting,
                              config={}, metrics={"final_test_acc": base + i + seed, "final_meta_loss": 1.0},
                              efficiency={"meta_step_s": t * seed, "peak_mem_mb": m, "device": "cpu"})


def test_report_settings_become_columns_with_efficiency_ratios(tmp_path):
    from common.report import efficiency_table, headline_table, result_tables
    _mwn_runs(tmp_path)
    records = load_results(tmp_path)
    (table,) = result_tables("label_noise_mwn", records, {})
    assert table.header == ["method", "n", "flip 40 %", "uniform 60 %"]  # in the order of the settings' names
    rows = {row[0]: row for row in table.rows}
    assert [r[0] for r in table.rows] == ["baseline", "mwn_second_order", "mwn_evograd"]
    assert rows["mwn_evograd"] == ["mwn_evograd", "2", "73.50 ± 0.71", "83.50 ± 0.71"]
    eff = {row[0]: row for row in efficiency_table("label_noise_mwn", records).rows}
    assert eff["mwn_evograd"][2:] == ["0.6", "0.50", "200", "0.50"]
    assert eff["mwn_second_order"][3] == "1.00" and eff["baseline"][3] == "0.12"
    head = headline_table(records, {}).rows
    assert head[1][1] == "mnist"  # the setting less its column part
    assert len(head) == 2 and head[1][2:] == ["uniform 60 % (test acc (%))", "81.50 ± 0.71", "82.50 ± 0.71",
                                              "83.50 ± 0.71", "", "0.50", "0.50", "2"]


def test_report_lists_skipped_files_and_writes_html_and_csv(tmp_path):
    _mwn_runs(tmp_path)
    (tmp_path / "broken.json").write_text('{"experiment": "x", "method"')
    (tmp_path / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    out = subprocess.run([sys.executable, "-m", "common.report", str(tmp_path), "--output",
                          str(tmp_path / "rep" / "report.md")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "**Skipped files**" in text and "broken.json" in text and "truncated JSON" in text
    link = re.search(r"\]\(([^)]*label_noise_mwn/README\.md)\)", text)[1]   # the headline row's details
    assert (tmp_path / "rep" / link).resolve().is_file(), link
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "broken.json" in page
    assert "src='data:image/png;base64," in page and "figure.png" not in page.split("<figcaption>")[0]
    rows = (tmp_path / "rep" / "diagnostics.csv").read_text().splitlines()
    assert rows[0] == "experiment,setting,method,seed,field,value,file"
    assert any(",metrics.final_meta_loss,1.0," in row for row in rows) and len(rows) == 1 + 12 * 4


def test_docs_blocks_are_filled_and_checked(tmp_path):
    from common.report import fill_docs
    _mwn_runs(tmp_path / "runs" / "mwn")
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- report: paper label_noise_mwn runs/mwn -->\nold\n<!-- /report -->\nend\n")
    assert fill_docs(tmp_path, check=True) == ["README.md: paper label_noise_mwn runs/mwn"]
    assert "old" in doc.read_text()                                   # --check changes nothing
    fill_docs(tmp_path)
    text = doc.read_text()
    assert text.startswith("intro\n<!-- report: paper label_noise_mwn runs/mwn -->\n### ") and text.endswith(
        "<!-- /report -->\nend\n")
    assert "| mwn_evograd | 2 | 73.50 ± 0.71 | 83.50 ± 0.71 |" in text
    assert fill_docs(tmp_path, check=True) == []
    doc.write_text(text.replace("83.50", "83.49"))                    # a hand edit is drift
    assert fill_docs(tmp_path, check=True) == ["README.md: paper label_noise_mwn runs/mwn"]


def test_committed_docs_match_the_committed_results():
    """Every generated table in the README, the experiment READMEs, docs/ and the study page is what
    ``python -m common.report --docs`` makes from the committed results under runs/."""
    from common.report import fill_docs
    assert fill_docs(check=True) == [], "run python -m common.report --docs and commit the result"


def test_paper_numbers_files_parse():
    paper = load_paper_numbers()
    assert "rotation" in paper
    for entry in paper.values():
        assert entry["source"] and isinstance(entry["settings"], dict)


def test_report_cli(tmp_path):
    write_results(tmp_path, experiment="toy", method="m", seed=0, config={}, metrics={"acc": 1.0}, efficiency=EFF)
    out = subprocess.run([sys.executable, "-m", "common.report", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and (tmp_path / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-m", "common.report", str(empty)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: no results files")
    assert len(out.stderr.strip().splitlines()) == 1


METER_CHECK = """
import json, torch
from common.profiling import EfficiencyMeter
meter = EfficiencyMeter("cpu", warmup=2)
for _ in range(5):
    with meter.step():
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        block += 1
        del block
print(json.dumps(meter.summary()))
"""


def test_efficiency_meter_times_after_warmup_and_sees_memory(repo_root):
    # a fresh interpreter: in a long pytest process freed memory can stay resident and be reused,
    # so the peak-RSS rise of a 64 MB block depends on which tests ran before
    proc = subprocess.run([sys.executable, "-c", METER_CHECK], capture_output=True, text=True, cwd=repo_root,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["timed_steps"] == 3 and summary["meta_step_s"] > 0
    assert summary["peak_mem_mb"] >= 48, summary
    assert summary["device"] == "cpu"


def test_bench_runner_interleaves_and_formats():
    calls = []

    def make_step(method, config, device):
        def step():
            calls.append(method)
        return step
    bench = Benchmark("toy", make_step, ("a", "b"), "b", ({"n": 1},))
    rows = run_benchmark(bench, bench.configs, bench.methods, torch.device("cpu"), warmup=1, reps=3,
                         memory=False, mem_steps=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert [r["method"] for r in rows] == ["a", "b"] and all(r["time_s"] >= 0 for r in rows)
    table = format_table([{"method": "a", "time_s": 2.0, "time_std_s": 0.1, "peak_mem_mb": 50.0},
                          {"method": "b", "time_s": 4.0, "time_std_s": 0.1, "peak_mem_mb": 100.0}], "b")
    assert "| a | 2 ± 0.1 | 0.5 | 50 | 0.5 |" in table
    untimed = format_table([{"method": "a", "time_s": None, "time_std_s": None, "peak_mem_mb": 50.0},
                            {"method": "b", "time_s": None, "time_std_s": None, "peak_mem_mb": 100.0}], "b")
    assert "| a | not timed | n/a | 50 | 0.5 |" in untimed


def test_bench_cli_runs_a_registered_benchmark_with_memory(tmp_path):
    out_file = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "common.bench", "illustration_1d", "--quick", "--reps", "2",
                          "--methods", "evograd", "second_order", "--out", str(out_file)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out_file.read_text())["rows"]
    assert {r["method"] for r in rows} == {"evograd", "second_order"}
    assert all(r["peak_mem_mb"] is not None and r["time_s"] > 0 for r in rows)
    memory_only = subprocess.run([sys.executable, "-m", "common.bench", "illustration_1d", "--quick", "--no-time",
                                  "--methods", "evograd"], capture_output=True, text=True, timeout=300)
    assert memory_only.returncode == 0 and "(alone) |" in memory_only.stdout, memory_only.stderr
    bad = subprocess.run([sys.executable, "-m", "common.bench", "no_such_benchmark"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr


def test_bench_cli_runs_extra_methods_only_when_named():
    def bench_cli(*methods):
        return subprocess.run([sys.executable, "-m", "common.bench", "label_noise_mwn", "--quick", "--no-memory",
                               "--reps", "1", "--warmup", "0", "--methods", *methods],
                              capture_output=True, text=True, timeout=300)
    extra = bench_cli("finite_difference")  # an extra method of the MWN benchmark
    assert extra.returncode == 0 and "| finite_difference |" in extra.stdout, extra.stderr
    unknown = bench_cli("no_such_method")
    assert unknown.returncode == 2 and "has no method(s) ['no_such_method']" in unknown.stderr
    listing = subprocess.run([sys.executable, "-m", "common.bench", "--list"], capture_output=True, text=True)
    mwn_line = next(line for line in listing.stdout.splitlines() if line.startswith("label_noise_mwn:"))
    assert "(also: mwn_evograd_scaled, evograd, " in mwn_line and "finite_difference" in mwn_line


def test_bench_block_takes_ratios_to_the_registered_reference(tmp_path):
    from common.report import bench_tables
    rows = [{"benchmark": "rotation", "config": {"width": 1}, "method": m, "time_s": t, "time_std_s": 0.0, "reps": 2,
             "device": "cpu", "peak_mem_mb": mb, "peak_total_mb": mb + 400} for m, t, mb in
            (("evograd", 0.2, 30.0), ("second_order", 0.1, 60.0))]   # the reference is not the first row
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows, "env": {"torch": "x", "command": "python -m common.bench rotation"}}))
    (table,) = bench_tables(path)
    ratios = {row[0]: (row[2], row[4]) for row in table.rows}
    assert ratios == {"evograd": ("2", "0.5"), "second_order": ("1", "1")}
    assert "ratios to `second_order`" in table.notes[0]


def test_sharded_rows_are_set_against_plain_sharded_training(tmp_path):
    """Data-parallel rows give the model's own peak; the report sets every row against `<plain>, sharded`."""
    from common.report import bench_tables
    rows = [{"benchmark": "label_noise_mwn", "config": {"width": 8}, "method": m, "sharded": m.endswith("sharded"),
             "time_s": t, "time_std_s": 0.0, "reps": 2, "device": "cpu", "processes": 2, "peak_mem_mb": mb - 50,
             "peak_total_mb": mb + 400, "peak_model_mb": mb, "cpu_malloc_mmap_threshold": "131072"}
            for m, t, mb in (("baseline, sharded", 1.0, 200.0), ("mwn_evograd, sharded", 3.0, 210.0),
                             ("mwn_second_order", 2.0, 400.0))]
    rows.append({"benchmark": "label_noise_mwn", "config": {"width": 8}, "method": "mwn_second_order, sharded",
                 "sharded": True, "time_s": None, "error": "ValueError: second_order cannot run sharded",
                 "peak_mem_mb": None, "peak_total_mb": None, "peak_model_mb": None})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows, "env": {"torch": "x"}}))
    main, target = bench_tables(path)
    # the main table's memory ratio is of the model's own peak when the rows give it
    assert "peak MB (model and step)" in main.header
    assert {row[0]: row[main.header.index("memory ratio")] for row in main.rows}["mwn_evograd, sharded"] == "0.525"
    assert {row[0]: row[1] for row in main.rows}["mwn_second_order, sharded"] == "refused (the reason is in the file)"
    assert target.header[2] == "ratio to `baseline, sharded`"
    assert [(row[0], row[2], row[4]) for row in target.rows] == [
        ("baseline, sharded", "1", "1"), ("mwn_evograd, sharded", "1.05", "3"), ("mwn_second_order", "2", "2")]
    assert "MALLOC_MMAP_THRESHOLD_=131072" in target.notes[0]


def test_bench_workers_allocator_and_refusals_not_retried(monkeypatch):
    from common import bench
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert bench.worker_env(torch.device("cpu"))["MALLOC_MMAP_THRESHOLD_"] == "131072"
    assert "MALLOC_MMAP_THRESHOLD_" not in bench.worker_env(torch.device("cuda"))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert bench.worker_env(torch.device("cpu"))["MALLOC_MMAP_THRESHOLD_"] == "65536"  # the user's is kept
    launches = []

    def refuse(cmd, env=None):
        launches.append(cmd)
        return None, "ValueError: second_order cannot run on an FSDP-sharded model"
    monkeypatch.setattr(bench, "_launch", refuse)
    row = bench.measure_data_parallel("label_noise_mwn", {"fsdp": True}, "mwn_second_order", 2, torch.device("cpu"),
                                      1, 1)
    assert len(launches) == 1 and row["error"].startswith("ValueError") and "retried_after" not in row

    def flaky(cmd, env=None):
        launches.append(cmd)
        return (None, "torch.distributed.DistNetworkError: port taken") if len(launches) == 2 else ({"time_s": 1.0}, None)
    monkeypatch.setattr(bench, "_launch", flaky)
    row = bench.measure_data_parallel("label_noise_mwn", {}, "baseline", 2, torch.device("cpu"), 1, 1)
    assert len(launches) == 3 and row["retried_after"].startswith("torch.distributed.DistNetworkError")
