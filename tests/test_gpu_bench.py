"""common.gpu_bench: the plan against the registered benchmarks, the budget, and its CPU form."""
import json

import pytest

from common.runtime import CLIError
from common.gpu_bench import PLAN, Job, job_cost_s, load_benchmark, main, quick_plan, select_jobs


def test_plan_names_registered_configs_and_methods():
    for job in PLAN:
        bench = load_benchmark(job.benchmark)
        assert job.config_index < len(bench.configs)
        assert set(job.methods) <= set(bench.methods + bench.extra_methods)
        assert bench.reference in job.methods
    lft = [load_benchmark("cross_domain_fewshot").configs[j.config_index] for j in PLAN
           if j.benchmark == "cross_domain_fewshot"]
    assert [c["backbone"] for c in lft] == ["ResNet10", "ResNet18", "ResNet34"]
    assert all((c["image_size"], c["n_way"], c["n_shot"], c["n_query"]) == (224, 5, 5, 16) for c in lft)
    metaxl = load_benchmark("metaxl").configs[next(j.config_index for j in PLAN if j.benchmark == "metaxl")]
    assert metaxl["seq_len"] == 200 and metaxl["size"] == "base"
    assert {j.benchmark for j in quick_plan()} == {j.benchmark for j in PLAN}


def test_budget_drops_the_most_expensive_configs_first():
    jobs = [Job("a", 0, ("x", "y"), 1.0), Job("a", 1, ("x", "y"), 10.0), Job("b", 0, ("x",), 0.5)]
    costs = [job_cost_s(j, 1, 2, 1) for j in jobs]          # 10, 100, 2.5
    assert costs == [10.0, 100.0, 2.5]
    kept, skipped = select_jobs(jobs, None, 1, 2, 1, startup_s=1.0)
    assert kept == jobs and skipped == []
    kept, skipped = select_jobs(jobs, 20.0, 1, 2, 1, startup_s=1.0)   # 2.5 + 1, then 10 + 2: fits; 100 does not
    assert kept == [jobs[0], jobs[2]] and skipped == [jobs[1]]
    kept, skipped = select_jobs(jobs, 5.0, 1, 2, 1, startup_s=1.0)
    assert kept == [jobs[2]] and skipped == [jobs[0], jobs[1]]


def test_cpu_form_writes_json_and_markdown(tmp_path, capsys):
    # one benchmark (two memory processes) keeps this fast; the plan test checks the others' registrations
    main(["--device", "cpu", "--quick", "--only", "cross_domain_fewshot", "--reps", "2", "--warmup", "0",
          "--mem-steps", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = result["rows"]
    assert [(r["benchmark"], r["method"]) for r in rows] == [
        ("cross_domain_fewshot", m) for m in ("lft_second_order", "lft_evograd")]
    for r in rows:
        assert r["time_s"] > 0 and r["reps"] == 2 and "error" not in r, r
        assert r["peak_mem_mb"] is not None and r["peak_total_mb"] > 0
    markdown = (tmp_path / "gpu_bench.md").read_text()
    assert "## cross_domain_fewshot (ratios to lft_second_order)" in markdown and "fits 12 GB" in markdown
    assert "12,288 MiB" in markdown and result["skipped"] == []


def test_cpu_form_budget_skips_and_says_so(tmp_path, capsys):
    main(["--device", "cpu", "--quick", "--only", "rotation", "--budget-s", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["rows"] == [] and result["skipped"] and "rotation config 0" in result["skipped"][0]
    assert "skipping" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--budget-s", "0"], "--budget-s"),
                                           (["--only", "nope", "--quick"], "--only"),
                                           (["--reps", "0"], "--reps")])
def test_bad_arguments_raise_cli_errors(args, message, tmp_path):
    with pytest.raises(CLIError, match=message):
        main(["--device", "cpu", "--out", str(tmp_path), *args])
