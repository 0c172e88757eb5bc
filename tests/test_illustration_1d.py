"""The 1-D illustration: vectorised EvoGrad equals the library call and a closed form; CLI smoke."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.evograd import CandidateNoise, evograd_meta_loss
from illustration_1d.train import (evograd_hypergradient, hypergradient_curves, main, parse_args, trajectory,
                                   true_hypergradient)


def test_true_hypergradient_is_the_derivative_of_the_optimal_validation_loss():
    lam = torch.linspace(0.1, 2, 7, dtype=torch.float64, requires_grad=True)
    val_at_optimum = ((1 / (1 + lam) - 0.5) ** 2).sum()
    (grad,) = torch.autograd.grad(val_at_optimum, lam)
    torch.testing.assert_close(true_hypergradient(lam.detach()), grad)


def test_vectorised_hypergradient_matches_closed_form_and_library_call():
    g = torch.Generator().manual_seed(0)
    k, tau, sigma = 5, 0.5, 1.0
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.2, 0.7, 1.1, 1.9], dtype=torch.float64)
    noise = sigma * torch.randn(k, 3, 4, generator=g, dtype=torch.float64)
    got = evograd_hypergradient(x, lam, noise, tau)
    # closed form: dL/dλ = 2(x* − 0.5) Σ_k x_k ∂w_k/∂λ,  ∂w_k/∂λ = −(w_k/τ)(x_k² − Σ_j w_j x_j²)
    cand = x + noise
    loss = (cand - 1) ** 2 + lam * cand ** 2
    w = torch.softmax(-loss / tau, 0)
    merged = (w * cand).sum(0)
    dw = -(w / tau) * (cand ** 2 - (w * cand ** 2).sum(0))
    torch.testing.assert_close(got, 2 * (merged - 0.5) * (cand * dw).sum(0), rtol=1e-12, atol=1e-14)
    # the library call on one (trial, λ) with the noise it draws itself
    lam_leaf = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x0 = torch.tensor(0.3, dtype=torch.float64)
    evograd_meta_loss({"x": x0}, lambda p: (p["x"] - 1) ** 2 + lam_leaf * p["x"] ** 2,
                      lambda p: (p["x"] - 0.5) ** 2, n_candidates=k, sigma=sigma, temperature=tau,
                      noise="gaussian", generator=torch.Generator().manual_seed(9)).backward()
    seeds = torch.randint(0, 2**62, (k,), generator=torch.Generator().manual_seed(9)).tolist()
    eps = torch.stack([CandidateNoise(seeds, sigma, "gaussian").sample(i, [x0])[0] for i in range(k)])
    torch.testing.assert_close(lam_leaf.grad, evograd_hypergradient(x0, torch.tensor(0.7, dtype=torch.float64), eps, tau))


def test_correlation_with_ground_truth_rises_with_k():
    args = parse_args(["--seed", "0"])
    curves = hypergradient_curves(args, torch.Generator().manual_seed(0))["per_k"]
    r = {int(k): c["pearson_r"] for k, c in curves.items()}
    assert r[100] >= 0.97
    assert r[2] < r[10] <= r[100] + 0.01
    assert curves["100"]["mae"] < curves["2"]["mae"]


@pytest.mark.parametrize("order", ["x_first", "hypergrad_first"])
def test_trajectory_order_steps_x_before_the_hypergradient_by_default(order):
    """The authors' notebook steps x first, then takes the hypergradient at the new x (our default)."""
    assert parse_args([]).order == "x_first"
    start = torch.tensor([[-1.8, 0.2], [0.9, 0.8]], dtype=torch.float64)
    seen = []

    def hypergrad(x, lam):  # records where it is taken; returns x so that λ' shows it too
        seen.append(x.clone())
        return x

    path = trajectory(start, 1, 0.1, hypergrad, order)
    x_stepped = start[:, 0] - 0.2 * ((start[:, 0] - 1) + start[:, 1] * start[:, 0])
    x_at = x_stepped if order == "x_first" else start[:, 0]
    torch.testing.assert_close(seen[0], x_at, rtol=0, atol=1e-15)
    torch.testing.assert_close(path[:, 1, 0], x_stepped, rtol=0, atol=1e-15)
    torch.testing.assert_close(path[:, 1, 1], start[:, 1] - 0.1 * x_at, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="order"):
        trajectory(start, 1, 0.1, hypergrad, "sideways")


def test_cli_writes_results_and_figures(tmp_path):
    main(["--quick", "--out", str(tmp_path), "--seed", "1"])
    record = json.loads((tmp_path / "illustration_1d_evograd_seed1.json").read_text())
    assert record["metrics"]["pearson_r_k100"] > 0.9
    assert len(record["metrics"]["trajectories"]["truth"]) == 5
    assert record["config"]["order"] == "x_first" and record["metrics"]["traj_final_lambda_gap_k100"] >= 0
    for name in ("hypergradients", "trajectories"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and (tmp_path / f"{name}.pdf").is_file()
    out = subprocess.run([sys.executable, "-m", "illustration_1d.eval", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "trajectories.png" in out.stdout
    from illustration_1d.eval import headline_figure   # the docs' figure: both figures from one record
    paths = headline_figure([record], tmp_path / "docs" / "headline")
    assert sorted(p.name for p in paths) == ["headline.pdf", "headline.png", "headline_trajectories.pdf",
                                             "headline_trajectories.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("argv,word", [(["--k-values", "1"], "k-values"), (["--trials", "0"], "trials"),
                                       (["--lambda-min", "3"], "lambda-min")])
def test_cli_bad_arguments_exit_cleanly(argv, word):
    out = subprocess.run([sys.executable, "-m", "illustration_1d.train", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and word in out.stderr and "Traceback" not in out.stderr


def test_cli_help():
    for module in ("illustration_1d.train", "illustration_1d.eval", "common.bench", "common.report"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage" in out.stdout
