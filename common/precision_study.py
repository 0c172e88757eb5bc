"""Hypergradients under reduced precision: each estimator under autocast against its own float32 value.

    python -m common.precision_study [--problems rotation mwn_mnist film_mlp] [--draws N] --out DIR

For every problem of ``common.hypergrad_study`` named (by default the three networks: rotation's
LeNet with λ on the input, Meta-Weight-Net on MNIST with λ on the loss, the FiLM MLP with λ inside
the network) and every estimator setting below, each draw computes the hypergradient three ways
on the same instance with the same generator seed (so EvoGrad draws the same ε_k every time):

    g_32   in float32 (no autocast)
    g_amp  under ``torch.autocast(device, bfloat16)`` and ``torch.autocast(device, float16)``

and records cos(g_amp, g_32) and ‖g_amp − g_32‖/‖g_32‖ (rotation's λ is one angle, so there
its cosine is the sign agreement ±1 and the relative error tells more), plus cos(g_32, g_ref) and cos(g_amp, g_ref) against the problem's
reference hypergradient (a long float32 unroll). EvoGrad runs twice under autocast: with its
candidate passes in float32 (``candidates_in_float32=True``, the default) and under the caller's
autocast like everything else (``False``); SAMA likewise, with its two finite-difference passes in
float32 (``differences_in_float32=True``, the default) and under autocast. Output: the Markdown table on stdout and
``precision_study.json`` (rows, command, environment) in ``--out``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from common.hypergrad import meta_backward
from common.hypergrad_study import EstimatorSetting, ProblemInstance, discover_problems, fidelity
from common.precision import AMP_DTYPES, autocast
from common.results import atomic_write_json, env_info
from common.runtime import CLIError, DefaultsHelpFormatter, positive, prepare_out, progress, run_cli, select_device

DEFAULT_PROBLEMS = ("rotation", "mwn_mnist", "film_mlp")
AMP_CHOICES = tuple(AMP_DTYPES)  # bf16, fp16


def precision_settings(evograd_method: str, inner_lr: float) -> list[EstimatorSetting]:
    """EvoGrad K = 2 and 10 (paper's σ = 1e-3, τ = 0.05) with and without float32 candidates, and
    the one-step second-order, finite-difference, 5-step unrolled, conjugate-gradient, Neumann and
    SAMA (plain SGD at the problem's η; its finite-difference passes in float32, the default, and
    under autocast) estimators."""
    settings = []
    for k in (2, 10):
        for in_float32 in (True, False):
            options = {"n_candidates": k, "sigma": 1e-3, "temperature": 0.05, "noise": "sign",
                       "candidates_in_float32": in_float32}
            label = f"{evograd_method} K={k}" + ("" if in_float32 else ", candidates under autocast")
            settings.append(EstimatorSetting(label, evograd_method, options, "evograd"))
    settings += [EstimatorSetting("second_order", "second_order", {"inner_lr": inner_lr, "inner_steps": 1}, "one-step"),
                 EstimatorSetting("finite_difference", "finite_difference", {"inner_lr": inner_lr, "fd_epsilon": 0.01},
                                  "one-step"),
                 EstimatorSetting("unrolled T=5", "unrolled", {"inner_lr": inner_lr, "inner_steps": 5}, "unrolled"),
                 EstimatorSetting("cg J=10", "cg", {"cg_iters": 10, "cg_damping": 0.0, "cg_tol": 1e-6}, "cg"),
                 EstimatorSetting("neumann J=5", "neumann", {"neumann_iters": 5, "neumann_alpha": inner_lr}, "neumann"),
                 EstimatorSetting("sama (SGD)", "sama", {"inner_lr": inner_lr, "fd_epsilon": 0.01}, "sama"),
                 EstimatorSetting("sama (SGD), differences under autocast", "sama",
                                  {"inner_lr": inner_lr, "fd_epsilon": 0.01, "differences_in_float32": False}, "sama")]
    return settings


def hypergradient(setting: EstimatorSetting, instance: ProblemInstance, seed: int, amp: str,
                  device: torch.device) -> list[Tensor]:
    """One hypergradient of ``setting`` on ``instance`` under ``amp`` ("none", "bf16", "fp16")."""
    for h in instance.hyperparams:
        h.grad = None
    options = dict(setting.options)
    if setting.family == "evograd":
        options["generator"] = torch.Generator(device=device).manual_seed(seed)
    with autocast(amp, device):
        meta_backward(setting.method, instance.params, instance.hyperparams, instance.train_loss_fn,
                      instance.val_loss_fn, **options)
    return [torch.zeros_like(h) if h.grad is None else h.grad.detach().clone() for h in instance.hyperparams]


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Cosine similarity of two hypergradients (tensors flattened and concatenated; 0 if either is zero)."""
    return fidelity(a, b)["cosine"]


def run_problem(name: str, draws: int, seed: int, amps: Sequence[str], device: torch.device,
                cache_dir: Path) -> list[dict]:
    """Rows (one per setting and amp) of mean ± std cosines over ``draws`` draws."""
    problem = discover_problems()[name]
    instances = problem.build(problem.instances, seed, device, True, cache_dir)  # quick: shorter reference unroll
    settings = precision_settings(problem.evograd_method, problem.inner_lr)
    records: dict[tuple[str, str], list[dict]] = {}
    for draw in progress(range(draws), desc=f"{name} precision"):
        instance = instances[draw % len(instances)]
        draw_seed = seed * 100_003 + draw
        for setting in settings:
            g32 = hypergradient(setting, instance, draw_seed, "none", device)
            for amp in amps:
                try:
                    g = hypergradient(setting, instance, draw_seed, amp, device)
                except ValueError as err:  # e.g. cg's Hessian-vector products overflowing in float16
                    if "non-finite" not in str(err):
                        raise
                    records.setdefault((setting.label, amp), []).append({"error": str(err)})
                    continue
                to_float32 = fidelity(g, g32)
                records.setdefault((setting.label, amp), []).append(
                    {"cos_to_float32": to_float32["cosine"], "rel_error_to_float32": to_float32["rel_error"],
                     "cos_amp_to_reference": cosine(g, instance.reference),
                     "cos_float32_to_reference": cosine(g32, instance.reference)})
    rows = []
    for (label, amp), all_recs in records.items():
        recs = [r for r in all_recs if "error" not in r]
        errors = [r["error"] for r in all_recs if "error" in r]
        row = {"problem": name, "label": label, "amp": amp, "draws": len(all_recs), "failed_draws": len(errors),
               "error": errors[0] if errors else None}
        row["rel_error_to_float32_median"] = (statistics.median(r["rel_error_to_float32"] for r in recs)
                                              if recs else float("nan"))
        for key in ("cos_to_float32", "cos_amp_to_reference", "cos_float32_to_reference"):
            values = [r[key] for r in recs if not math.isnan(r[key])]
            row[key] = statistics.fmean(values) if values else float("nan")
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{key}_min"] = min(values) if values else float("nan")
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table: one line per (problem, estimator, amp)."""
    lines = ["| problem | estimator | autocast | cos(amp, float32) mean ± std (min) | ‖g_amp − g_32‖/‖g_32‖ (median) "
             "| cos(float32, ref) | cos(amp, ref) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed_draws"):  # the estimator raised (a non-finite value) on these draws
            failed = f"raised on {r['failed_draws']} of {r['draws']} draws"
            if r["failed_draws"] == r["draws"]:
                reason = r["error"].split(" (")[0]  # the message without its advice
                lines.append(f"| {r['problem']} | {r['label']} | {r['amp']} | {failed}: {reason} | | | |")
                continue
            r = {**r, "label": f"{r['label']} ({failed}; columns over the other {r['draws'] - r['failed_draws']})"}
        lines.append(f"| {r['problem']} | {r['label']} | {r['amp']} | {r['cos_to_float32']:.4f} ± "
                     f"{r['cos_to_float32_std']:.4f} ({r['cos_to_float32_min']:.3f}) | "
                     f"{r['rel_error_to_float32_median']:.3g} | "
                     f"{r['cos_float32_to_reference']:.3f} | {r['cos_amp_to_reference']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.precision_study", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=list(DEFAULT_PROBLEMS), help="study problems to run")
    parser.add_argument("--amp", nargs="+", default=list(AMP_CHOICES), choices=list(AMP_CHOICES),
                        help="reduced precisions to compare with float32")
    parser.add_argument("--draws", type=positive(int), default=16, help="draws per problem (instances cycle)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and of EvoGrad's noise")
    parser.add_argument("--threads", type=positive(int), default=1, help="torch CPU threads")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", default="results/precision_study", help="folder for precision_study.json")
    args = parser.parse_args(argv)
    problems = discover_problems()
    unknown = [p for p in args.problems if p not in problems]
    if unknown:
        raise CLIError(f"--problems: unknown {unknown}; choose from {sorted(problems)}")
    device = select_device(args.device)
    torch.set_num_threads(args.threads)
    out = prepare_out(args.out)
    rows = []
    for name in args.problems:
        rows += run_problem(name, args.draws, args.seed, args.amp, device, out / "cache")
        print(format_table([r for r in rows if r["problem"] == name]), flush=True)
    table = format_table(rows)
    command = "python -m common.precision_study " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_json(out / "precision_study.json", {"rows": rows, "command": command, "env": env_info()})
    print(f"\n`{command}`\n\n{table}\nwrote {out / 'precision_study.json'}")


if __name__ == "__main__":
    run_cli(main)
