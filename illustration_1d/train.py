"""The paper's 1-D illustration: EvoGrad hypergradients against the ground truth.

Problem (EvoGrad paper, Section 3.2):
    L_train(x, λ) = (x − 1)² + λx²,   L_val(x) = (x − 0.5)²,
    x*(λ) = 1/(1 + λ),                dL_val(x*(λ))/dλ = (λ − 1)/(λ + 1)³   (ground truth).

Figure 1: the EvoGrad hypergradient (mean ± std over trials, x ~ N(0,1), Gaussian noise σ = 1,
τ = 0.5) against the ground truth for λ on a grid in [0.1, 2], for K = 2, 10, 100.
Figure 2: (x, λ) trajectories from five starts, SGD on x and hypergradient descent on λ, EvoGrad
against the ground truth, over the validation loss. Each step, as in the authors' notebook
(``Illustration1d/illustration1D.ipynb``, trajectory cell), first moves x by SGD on L_train at the
current λ and then takes the hypergradient at the new x (``--order x_first``);
``--order hypergrad_first`` takes it at x before the step. The ground-truth path uses its own λ
everywhere (the notebook feeds EvoGrad's λ into the true hypergradient; we do not copy that).

All trials and λ values are one batch: candidates have shape [K, trials, grid] and the weights
are ``common.evograd.candidate_weights`` over dim 0, so the script runs in seconds.

    python -m illustration_1d.train --out results/illustration_1d
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch

from common.evograd import candidate_weights
from common.results import results_path, write_results
from common.runtime import (CLIError, DefaultsHelpFormatter, add_common_args, at_least, finished_runs, in_range,
                            positive, prepare_out, refuse_flags, run_cli, seed_everything, seeds_of, select_device)

STARTS = ((-1.8, 0.2), (-0.9, 1.2), (0.9, 0.8), (1.3, 0.2), (1.5, 1.7))
ORDERS = ("x_first", "hypergrad_first")  # the authors' order first
# Outside this range the softmax weights of the candidates are numerically one-hot (every EvoGrad
# hypergradient exactly 0) or uniform for this problem's losses.
TEMPERATURE_RANGE = (1e-6, 1e6)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m illustration_1d.train", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--k-values", type=int, nargs="+", default=[2, 10, 100], help="numbers of candidates K")
    parser.add_argument("--trials", type=at_least(2), default=100,
                        help="independent draws of x ~ N(0,1) per λ (>= 2: the figure shows their std)")
    parser.add_argument("--grid", type=at_least(2), default=100,
                        help="λ values on the grid (>= 2: Pearson r against the truth needs two)")
    parser.add_argument("--lambda-min", type=float, default=0.1, help="smallest λ of the grid")
    parser.add_argument("--lambda-max", type=float, default=2.0, help="largest λ of the grid")
    parser.add_argument("--sigma", type=positive(float), default=1.0, help="std of the Gaussian perturbations")
    parser.add_argument("--temperature", type=in_range(*TEMPERATURE_RANGE), default=0.5,
                        help="softmax temperature τ, in [1e-6, 1e6]")
    parser.add_argument("--traj-steps", type=positive(int), default=5, help="steps of each trajectory")
    parser.add_argument("--traj-lr", type=positive(float), default=0.1, help="learning rate for x and λ")
    parser.add_argument("--order", choices=ORDERS, default="x_first",
                        help="x_first: step x, then take the hypergradient at the new x (the authors' notebook); "
                             "hypergrad_first: take it at x before the step")
    add_common_args(parser, default_seeds=(0,), default_out="results/illustration_1d")
    refuse_flags(parser, "the toy has no data files", "--data-root")
    args = parser.parse_args(argv)
    if any(k < 2 for k in args.k_values):
        raise CLIError(f"--k-values must all be >= 2, got {args.k_values}")
    if not args.lambda_min < args.lambda_max or args.lambda_min <= -1:
        raise CLIError("need -1 < --lambda-min < --lambda-max")
    if args.quick:  # already seconds; --quick only trims the trials
        args.trials = min(args.trials, 50)
    return args


def train_loss(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(x − 1)² + λx², elementwise."""
    return (x - 1) ** 2 + lam * x ** 2


def val_loss(x: torch.Tensor) -> torch.Tensor:
    """(x − 0.5)², elementwise."""
    return (x - 0.5) ** 2


def true_hypergradient(lam: torch.Tensor) -> torch.Tensor:
    """dL_val(x*(λ))/dλ = (λ − 1)/(λ + 1)³."""
    return (lam - 1) / (lam + 1) ** 3


def evograd_hypergradient(x: torch.Tensor, lam: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """EvoGrad hypergradient for a batch of independent 1-D problems.

    Args:
        x: base parameters, shape [...].
        lam: λ, broadcastable to x.
        noise: ε_k, shape [K, ...].
        temperature: τ.

    Returns:
        dL_val(x*)/dλ with x* = Σ_k softmax(−ℓ/τ)_k (x + ε_k), shape of ``x`` (broadcast with λ).
    """
    lam = (lam * torch.ones_like(x)).detach().requires_grad_()
    candidates = x.detach() + noise                              # [K, ...]
    weights = candidate_weights(train_loss(candidates, lam), temperature)
    merged = (weights * candidates).sum(0)
    (grad,) = torch.autograd.grad(val_loss(merged).sum(), lam)   # problems are independent
    return grad


def hypergradient_curves(args: argparse.Namespace, generator: torch.Generator) -> dict:
    """Figure 1 data: per K, mean and std over trials of the EvoGrad hypergradient on the λ grid."""
    lam = torch.linspace(args.lambda_min, args.lambda_max, args.grid, dtype=torch.float64)
    truth = true_hypergradient(lam)
    curves = {"lambda": lam.tolist(), "truth": truth.tolist(), "per_k": {}}
    for k in args.k_values:
        x = torch.randn(args.trials, args.grid, generator=generator, dtype=torch.float64)
        noise = args.sigma * torch.randn(k, args.trials, args.grid, generator=generator, dtype=torch.float64)
        t0 = time.perf_counter()
        grads = evograd_hypergradient(x, lam, noise, args.temperature)       # [trials, grid]
        seconds = time.perf_counter() - t0
        mean, std = grads.mean(0), grads.std(0)
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant mean: r is NaN, refused in main
            pearson_r = float(np.corrcoef(mean.numpy(), truth.numpy())[0, 1])
        curves["per_k"][str(k)] = {
            "mean": mean.tolist(), "std": std.tolist(),
            "pearson_r": pearson_r,
            "mae": float((mean - truth).abs().mean()),
            "seconds": seconds,
        }
    return curves


TRAJECTORY_LIMIT = 1e6  # the starts lie within a few units of the optimum; a path past this diverged


def trajectory(start: torch.Tensor, steps: int, lr: float, hypergrad_fn, order: str = "x_first") -> torch.Tensor:
    """(x, λ) path of alternating SGD on x and hypergradient descent on λ.

    One step with ``order="x_first"`` (the authors' notebook):
        x' = x − lr · ∂L_train(x, λ)/∂x = x − 2 lr ((x − 1) + λx),   λ' = λ − lr · h(x', λ);
    with ``order="hypergrad_first"``: λ' = λ − lr · h(x, λ), the same x'.

    Args:
        start: [n, 2] starting (x, λ) pairs.
        steps: number of steps.
        lr: learning rate of both updates.
        hypergrad_fn: h(x, λ) -> dL_val/dλ, elementwise over the n paths.
        order: ``x_first`` or ``hypergrad_first``.

    Returns:
        [n, steps + 1, 2] the path, start included.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    x, lam = start[:, 0].clone(), start[:, 1].clone()
    path = [torch.stack([x, lam], 1)]
    for _ in range(steps):
        h = hypergrad_fn(x, lam) if order == "hypergrad_first" else None
        x = x - lr * 2 * ((x - 1) + lam * x)                          # SGD on L_train at the current λ
        if h is None:
            h = hypergrad_fn(x, lam)
        lam = lam - lr * h
        path.append(torch.stack([x, lam], 1))
    return torch.stack(path, 1)


def trajectories(args: argparse.Namespace, generator: torch.Generator) -> dict:
    """Figure 2 data: (x, λ) paths from the five starts, EvoGrad per K and the ground truth."""
    start = torch.tensor(STARTS, dtype=torch.float64)                    # [5, 2]

    def run(hypergrad_fn) -> list:
        return trajectory(start, args.traj_steps, args.traj_lr, hypergrad_fn, args.order).tolist()

    paths = {"truth": run(lambda x, lam: true_hypergradient(lam))}      # its own λ (the notebook uses EvoGrad's)
    for k in args.k_values:
        paths[str(k)] = run(lambda x, lam, k=k: evograd_hypergradient(
            x, lam, args.sigma * torch.randn(k, *x.shape, generator=generator, dtype=x.dtype), args.temperature))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    select_device(args.device)  # the toy runs on the CPU; the flag is validated for uniformity
    prepare_out(args.out)
    finished = finished_runs([results_path(args.out, "illustration_1d", "", "evograd", seed) for seed in seeds_of(args)],
                             args.resume, args.overwrite)
    from illustration_1d.eval import plot_all  # noqa: PLC0415 (keeps matplotlib out of the math's import path)

    for seed in seeds_of(args):
        if results_path(args.out, "illustration_1d", "", "evograd", seed) in finished:
            continue
        generator = seed_everything(seed)
        t0 = time.perf_counter()
        curves = hypergradient_curves(args, generator)
        paths = trajectories(args, generator)
        elapsed = time.perf_counter() - t0
        metrics = {}
        for k, c in curves["per_k"].items():
            if not (np.isfinite(c["pearson_r"]) and np.isfinite(c["mae"])):
                raise CLIError(f"K = {k}: the EvoGrad mean hypergradient is constant over the λ grid, so its "
                               f"Pearson r is undefined (--sigma {args.sigma:g} with --temperature "
                               f"{args.temperature:g} makes the candidate weights one-hot); nothing was written")
            metrics[f"pearson_r_k{k}"] = c["pearson_r"]
            metrics[f"mae_k{k}"] = c["mae"]
            print(f"K = {k:>3}: Pearson r = {c['pearson_r']:.4f}, MAE = {c['mae']:.4f} "
                  f"({args.trials} trials x {args.grid} λ in {c['seconds']:.3f} s)")
        for name, path in paths.items():  # an exploding path: no gap worth reporting
            path = torch.tensor(path)
            if not (torch.isfinite(path).all() and path.abs().max() <= TRAJECTORY_LIMIT):
                who = "the ground truth's" if name == "truth" else f"K = {name}:"
                raise CLIError(f"{who} trajectories diverged (|x| or |λ| beyond {TRAJECTORY_LIMIT:.0e}, or NaN) "
                               f"with --traj-lr {args.traj_lr:g}: lower --traj-lr; nothing was written")
        truth_end = torch.tensor(paths["truth"])[:, -1, 1]
        for k in args.k_values:  # how far EvoGrad's final λ ends from the ground truth's, mean over starts
            gap = (torch.tensor(paths[str(k)])[:, -1, 1] - truth_end).abs().mean().item()
            metrics[f"traj_final_lambda_gap_k{k}"] = gap
            print(f"K = {k:>3}: trajectories ({args.order}), mean |λ_T − λ_T(truth)| = {gap:.4f}")
        metrics["curves"] = curves
        metrics["trajectories"] = paths
        config = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "overwrite", "seeds")}
        path = write_results(args.out, experiment="illustration_1d", method="evograd", seed=seed,
                             config=config, metrics=metrics,
                             efficiency={"meta_step_s": None, "peak_mem_mb": None, "device": "cpu",
                                         "total_s": elapsed})
        figures = plot_all(path, args.out)
        print(f"wrote {path} and {', '.join(str(f) for f in figures)}")


if __name__ == "__main__":
    run_cli(main)
