"""Fidelity versus cost of hypergradient estimators, side by side on problems with a known answer.

    python -m common.hypergrad_study [--problems one_d ridge ...] [--draws N] [--quick] --out DIR

For every problem and estimator setting (EvoGrad K = 2, 5, 10, 50 and σ, τ sweeps; one-step
second-order, torch.func twin and finite differences; unrolled T; multistep T and W; implicit
differentiation by conjugate gradient and by a Neumann series with J Hessian-vector products;
SAMA with plain SGD as the base optimiser) it measures
the cosine similarity and the sign agreement of the estimate with the problem's reference
hypergradient over many draws, the seconds per hypergradient and the peak memory. Settings run
interleaved (every draw runs every setting, in rotating order) so that drifts in machine speed hit
all of them alike. Output: one results file per (problem, setting) for ``common.report``,
``study.json``, ``study.md`` (the table) and ``fidelity_vs_cost.png``/``.pdf`` (the figure).

Problems: ``one_d`` and ``ridge`` are defined here; experiments add theirs in ``<folder>/study.py``
with ``@register_problem`` (found by file, so ``common`` imports no experiment by name).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from common.hypergrad import meta_backward
from common.profiling import current_rss_mb, peak_rss_mb, reset_peak_rss
from common.results import atomic_write_json, write_results
from common.runtime import (CLIError, DefaultsHelpFormatter, add_common_args, finished_runs, import_experiment_modules,
                            non_negative, positive, prepare_out, progress, refuse_flags, run_cli, seed_everything,
                            select_device)
from common.second_order import second_order_meta_loss_func

EXPERIMENT = "hypergrad_study"


@dataclass
class ProblemInstance:
    """One hypergradient question with its answer.

    Attributes:
        params: θ, where the hypergradient is taken (dict of tensors).
        hyperparams: λ tensors (``requires_grad=True``).
        train_loss_fn, val_loss_fn: parameter dict -> scalar loss.
        reference: the reference hypergradient, one tensor per hyperparameter.
    """

    params: dict[str, Tensor]
    hyperparams: list[Tensor]
    train_loss_fn: Callable[[dict[str, Tensor]], Tensor]
    val_loss_fn: Callable[[dict[str, Tensor]], Tensor]
    reference: list[Tensor]


@dataclass(frozen=True)
class StudyProblem:
    """A problem of the study.

    Attributes:
        name: identifier (``--problems``).
        build: ``build(n_instances, seed, device, quick, cache_dir) -> list[ProblemInstance]``;
            draws cycle through the instances; ``cache_dir`` holds checkpoints it trains once.
        inner_lr: η of every second-order, finite-difference, unrolled and multistep estimate.
        hyper_kind: where λ acts: "loss", "input" or "network".
        reference: how the reference is obtained, in words.
        unroll_steps: T values of the ``unrolled`` settings.
        multistep: (T, windows) of the ``multistep`` settings.
        evograd_noise: "sign" or "gaussian".
        evograd_method: "evograd" or "evograd_low_memory" (λ on the input or in the network).
        instances: number of distinct instances.
        max_draws: cap on ``--draws`` for expensive problems (None: no cap).
    """

    name: str
    build: Callable[[int, int, torch.device, bool, Path], list[ProblemInstance]]
    inner_lr: float
    hyper_kind: str
    reference: str
    unroll_steps: tuple[int, ...] = (5, 20, 50)
    multistep: tuple[int, tuple[int, ...]] = (20, (2, 5, 20))
    evograd_noise: str = "sign"
    evograd_method: str = "evograd"
    instances: int = 1
    max_draws: int | None = None


PROBLEMS: dict[str, StudyProblem] = {}


def unrolled_reference(instance_parts: tuple, inner_lr: float, steps: int) -> list[Tensor]:
    """dL_val(θ_T)/dλ of a long T-step unroll: the reference of problems without a closed form.

    Args:
        instance_parts: (params, hyperparams, train_loss_fn, val_loss_fn).
        inner_lr: η of the unrolled SGD steps.
        steps: T, longer than every horizon the study's estimators use.
    """
    params, hyperparams, train_loss_fn, val_loss_fn = instance_parts
    loss = second_order_meta_loss_func(params, train_loss_fn, val_loss_fn, inner_lr, steps)
    grads = torch.autograd.grad(loss, hyperparams, allow_unused=True)
    return [torch.zeros_like(h) if g is None else g.detach() for g, h in zip(grads, hyperparams)]


def register_problem(name: str, **kwargs) -> Callable:
    """Decorator: ``@register_problem("rotation", inner_lr=0.1, hyper_kind="input", ...)`` on ``build``."""
    def decorate(build: Callable) -> Callable:
        PROBLEMS[name] = StudyProblem(name=name, build=build, **kwargs)
        return build
    return decorate


def discover_problems() -> dict[str, StudyProblem]:
    """Import every ``<folder>/study.py`` beside ``common/`` so that its problems register."""
    import_experiment_modules("study")
    return PROBLEMS


# ---------------------------------------------------------------------------------------------
# built-in problems with analytic references
# ---------------------------------------------------------------------------------------------

ONE_D_TARGET = 0.5  # c: the validation loss is f(θ − c)


def one_d_f(x: Tensor) -> Tensor:
    """f(x) = log cosh x + x²/10: smooth, strictly convex, minimum at 0, not quadratic."""
    return torch.log(torch.cosh(x)) + 0.1 * x**2


def one_d_f_prime(x: Tensor) -> Tensor:
    """f'(x) = tanh x + x/5."""
    return torch.tanh(x) + 0.2 * x


def one_d_f_second(x: Tensor) -> Tensor:
    """f''(x) = 1/cosh² x + 1/5."""
    return 1 / torch.cosh(x) ** 2 + 0.2


def one_d_instance(theta: float, lam: float, device: torch.device | str = "cpu") -> ProblemInstance:
    """L_train(θ, λ) = f(θ − λ), L_val(θ) = f(θ − c); reference dL_val(θ*(λ))/dλ = f'(λ − c).

    θ*(λ) = λ, so the true (converged, implicit-function) hypergradient is f'(λ − c), whatever θ.
    """
    lam_t = torch.tensor([lam], dtype=torch.float64, device=device, requires_grad=True)
    params = {"theta": torch.tensor([theta], dtype=torch.float64, device=device)}
    return ProblemInstance(
        params, [lam_t],
        train_loss_fn=lambda p: one_d_f(p["theta"] - lam_t).sum(),
        val_loss_fn=lambda p: one_d_f(p["theta"] - ONE_D_TARGET).sum(),
        reference=[one_d_f_prime(lam_t.detach() - ONE_D_TARGET)])


@register_problem("one_d", inner_lr=0.5, hyper_kind="loss", evograd_noise="gaussian", instances=32,
                  reference="analytic: f'(λ − c), the hypergradient at θ*(λ) = λ")
def build_one_d(n_instances: int, seed: int, device: torch.device, quick: bool, cache_dir: Path) -> list[ProblemInstance]:
    """Points θ ~ U(−3, 3), λ ~ U(−2, 2): the base model is anywhere on its way to θ*(λ) = λ."""
    gen = torch.Generator().manual_seed(seed)
    thetas = torch.rand(n_instances, generator=gen, dtype=torch.float64) * 6 - 3
    lams = torch.rand(n_instances, generator=gen, dtype=torch.float64) * 4 - 2
    return [one_d_instance(t.item(), l.item(), device) for t, l in zip(thetas, lams)]


@dataclass
class RidgeData:
    """Ridge regression with one log-strength per feature: L_train = ‖Xw − y‖²/2n + Σ_j e^{λ_j} w_j²/2."""

    x_train: Tensor  # [n, d]
    y_train: Tensor  # [n]
    x_val: Tensor    # [m, d]
    y_val: Tensor    # [m]

    def train_loss(self, w: Tensor, lam: Tensor) -> Tensor:
        return ((self.x_train @ w - self.y_train) ** 2).mean() / 2 + (lam.exp() * w**2).sum() / 2

    def val_loss(self, w: Tensor) -> Tensor:
        return ((self.x_val @ w - self.y_val) ** 2).mean() / 2

    def hessian(self, lam: Tensor) -> Tensor:
        """∇²_w L_train = XᵀX/n + diag(e^λ), [d, d]."""
        return self.x_train.T @ self.x_train / len(self.y_train) + torch.diag(lam.exp())

    def solution(self, lam: Tensor) -> Tensor:
        """w*(λ) = (XᵀX/n + diag(e^λ))⁻¹ Xᵀy/n."""
        return torch.linalg.solve(self.hessian(lam), self.x_train.T @ self.y_train / len(self.y_train))

    def ift_hypergrad(self, lam: Tensor) -> Tensor:
        """dL_val(w*(λ))/dλ = −(∂²L_train/∂λ∂w) H⁻¹ ∇L_val(w*), with ∂²L_train/∂λ_j∂w_k = e^{λ_j} w_j δ_jk."""
        w = self.solution(lam)
        grad_val = self.x_val.T @ (self.x_val @ w - self.y_val) / len(self.y_val)
        return -lam.exp() * w * torch.linalg.solve(self.hessian(lam), grad_val)


def make_ridge_data(n_train: int, n_val: int, n_features: int, seed: int,
                    device: torch.device | str = "cpu") -> RidgeData:
    """Half the features carry signal; the training targets are noisier than the validation ones."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(n_features, generator=gen, dtype=torch.float64)
    w_true[n_features // 2:] = 0

    def sample(n: int, noise: float) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, n_features, generator=gen, dtype=torch.float64)
        return x, x @ w_true + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    (x_tr, y_tr), (x_va, y_va) = sample(n_train, 1.0), sample(n_val, 0.1)
    return RidgeData(x_tr.to(device), y_tr.to(device), x_va.to(device), y_va.to(device))


def ridge_instance(data: RidgeData, lam: Tensor) -> ProblemInstance:
    """The hypergradient at θ = w*(λ), where the implicit-function answer is exact."""
    lam = lam.detach().clone().requires_grad_()
    return ProblemInstance(
        {"w": data.solution(lam.detach())}, [lam],
        train_loss_fn=lambda p: data.train_loss(p["w"], lam),
        val_loss_fn=lambda p: data.val_loss(p["w"]),
        reference=[data.ift_hypergrad(lam.detach())])


@register_problem("ridge", inner_lr=0.25, hyper_kind="loss", evograd_noise="gaussian", instances=8,
                  reference="implicit function theorem at w*(λ) (closed form)")
def build_ridge(n_instances: int, seed: int, device: torch.device, quick: bool, cache_dir: Path) -> list[ProblemInstance]:
    """20 features, 50 training and 200 validation rows; λ_j ~ N(log 0.1, 1) per instance."""
    data = make_ridge_data(50, 200, 20, seed, device)
    gen = torch.Generator().manual_seed(seed + 1)
    lams = [math.log(0.1) + torch.randn(20, generator=gen, dtype=torch.float64).to(device)
            for _ in range(n_instances)]
    return [ridge_instance(data, lam) for lam in lams]



class FilmMLP(torch.nn.Module):
    """784 → 100 → 10 MLP whose hidden units are scaled by γ (λ, one per unit) in training passes only.

    Like a feature-wise transformation layer (the paper's cross-domain few-shot experiment): the
    scale acts inside the network while it trains and is left out at validation.
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(784, hidden), torch.nn.Linear(hidden, 10)

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:  # x [N, 784] -> logits [N, 10]
        h = torch.relu(self.hidden(x))
        return self.out(h if scale is None else h * scale)


FILM_INNER_LR, FILM_REFERENCE_STEPS = 0.1, 100


@register_problem("film_mlp", inner_lr=FILM_INNER_LR, hyper_kind="network", evograd_method="evograd_low_memory",
                  instances=4, unroll_steps=(5, 20, 50), multistep=(20, (2, 5, 20)), max_draws=32,
                  reference=f"{FILM_REFERENCE_STEPS}-step SGD unroll (η = {FILM_INNER_LR}) from an MLP checkpoint "
                            "(200 Adam steps, embedded MNIST subset)")
def build_film_mlp(n_instances: int, seed: int, device: torch.device, quick: bool, cache_dir: Path) -> list[ProblemInstance]:
    """Per-unit training-time scales γ ~ 1 + 0.1·N(0, 1) of a briefly trained MLP; one batch pair per instance."""
    from common.evograd import functional_forward, perturbable_params
    from common.mnist import load_mnist, normalize
    from common.results import load_checkpoint, save_checkpoint
    mnist = load_mnist(None)
    images, labels = normalize(mnist.train_images).reshape(-1, 784).to(device), mnist.train_labels.to(device)
    torch.manual_seed(seed)
    model = FilmMLP().to(device)
    path = cache_dir / f"film_mlp_{mnist.source}_seed{seed}.pt"
    if path.is_file():
        model.load_state_dict(load_checkpoint(path, map_location=device)["model"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(200):
            idx = torch.randint(0, 3000, (128,), generator=gen)  # the first 3000 images train, the rest validate
            loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_checkpoint(path, {"model": model.state_dict()}, {"steps": 200, "lr": 1e-3, "batch": 128})
    gen = torch.Generator().manual_seed(seed + 1)
    instances = []
    for _ in range(n_instances):
        scale = (1 + 0.1 * torch.randn(100, generator=gen)).to(device).requires_grad_()
        idx, val_idx = torch.randint(0, 3000, (128,), generator=gen), torch.randint(3000, len(labels), (128,), generator=gen)

        def train_fn(p, idx=idx, scale=scale):
            return torch.nn.functional.cross_entropy(functional_forward(model, p, images[idx], scale), labels[idx])

        def val_fn(p, val_idx=val_idx):
            return torch.nn.functional.cross_entropy(functional_forward(model, p, images[val_idx]), labels[val_idx])
        params = perturbable_params(model)
        reference = unrolled_reference((params, [scale], train_fn, val_fn), FILM_INNER_LR,
                                       20 if quick else FILM_REFERENCE_STEPS)
        instances.append(ProblemInstance(params, [scale], train_fn, val_fn, reference))
    return instances

# ---------------------------------------------------------------------------------------------
# estimator settings
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EstimatorSetting:
    """One point of the study: an estimator name for ``meta_backward`` and its options."""

    label: str
    method: str
    options: dict = field(default_factory=dict)
    family: str = ""


EVOGRAD_K = (2, 5, 10, 50)
EVOGRAD_SIGMAS = (1e-4, 1e-2, 1e-1)       # beside the paper's σ = 1e-3
EVOGRAD_TEMPERATURES = (0.005, 0.5, 5.0)  # beside the paper's τ = 0.05
CG_ITERS = (5, 10, 20)                    # J of the conjugate-gradient settings (quick: 10)
NEUMANN_ITERS = (5, 20, 50)               # J of the Neumann settings (quick: 5), α = the problem's η


def estimator_settings(problem: StudyProblem, quick: bool = False) -> list[EstimatorSetting]:
    """The grid of the study for ``problem`` (a smaller one with ``quick``)."""
    evo = problem.evograd_method
    base = {"sigma": 1e-3, "temperature": 0.05, "noise": problem.evograd_noise}
    ks = (2, 10) if quick else EVOGRAD_K
    settings = [EstimatorSetting(f"{evo} K={k}", evo, {**base, "n_candidates": k}, "evograd") for k in ks]
    other = "evograd" if evo == "evograd_low_memory" else "evograd_low_memory"  # same estimate, other memory
    settings.append(EstimatorSetting(f"{other} K=10", other, {**base, "n_candidates": 10}, "evograd other path"))
    sigmas = EVOGRAD_SIGMAS[1:2] if quick else EVOGRAD_SIGMAS
    settings += [EstimatorSetting(f"{evo} K=2 sigma={s:g}", evo, {**base, "n_candidates": 2, "sigma": s},
                                  "evograd sigma") for s in sigmas]
    temps = EVOGRAD_TEMPERATURES[1:2] if quick else EVOGRAD_TEMPERATURES
    settings += [EstimatorSetting(f"{evo} K=2 tau={t:g}", evo, {**base, "n_candidates": 2, "temperature": t},
                                  "evograd tau") for t in temps]
    one_step = {"inner_lr": problem.inner_lr, "inner_steps": 1}
    settings += [EstimatorSetting("second_order", "second_order", one_step, "one-step"),
                 EstimatorSetting("second_order_func", "second_order_func", one_step, "one-step"),
                 EstimatorSetting("finite_difference", "finite_difference",
                                  {"inner_lr": problem.inner_lr, "fd_epsilon": 0.01}, "one-step")]
    steps = problem.unroll_steps[:1] if quick else problem.unroll_steps
    settings += [EstimatorSetting(f"unrolled T={t}", "unrolled", {"inner_lr": problem.inner_lr, "inner_steps": t},
                                  "unrolled") for t in steps]
    horizon, windows = problem.multistep
    windows = windows[-1:] if quick else windows
    settings += [EstimatorSetting(f"multistep T={horizon} W={w}", "multistep",
                                  {"inner_lr": problem.inner_lr, "inner_steps": horizon, "window": w},
                                  "multistep") for w in windows]
    settings += [EstimatorSetting(f"cg J={j}", "cg", {"cg_iters": j, "cg_damping": 0.0, "cg_tol": 1e-6}, "cg")
                 for j in ((10,) if quick else CG_ITERS)]
    settings += [EstimatorSetting(f"neumann J={j}", "neumann", {"neumann_iters": j, "neumann_alpha": problem.inner_lr},
                                  "neumann") for j in ((5,) if quick else NEUMANN_ITERS)]
    settings.append(EstimatorSetting("sama (SGD)", "sama", {"inner_lr": problem.inner_lr, "fd_epsilon": 0.01}, "sama"))
    return settings


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------

def _release_freed_memory() -> None:
    """Hand memory freed by earlier settings back to the OS so that peak RSS deltas are honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fidelity(estimate: Sequence[Tensor], reference: Sequence[Tensor]) -> dict[str, float]:
    """Cosine similarity, sign agreement and relative error of ``estimate`` against ``reference``.

    Hyperparameter tensors are flattened and concatenated. The cosine of a zero estimate is 0
    (no direction); a zero coordinate never agrees in sign with the reference.
    """
    g = torch.cat([e.detach().flatten().to(torch.float64).cpu() for e in estimate])
    r = torch.cat([x.detach().flatten().to(torch.float64).cpu() for x in reference])
    denom = g.norm() * r.norm()
    cosine = (g @ r / denom).item() if denom > 0 else 0.0
    return {"cosine": cosine,
            "sign_agreement": (torch.sign(g) == torch.sign(r)).to(torch.float64).mean().item(),
            "rel_error": ((g - r).norm() / r.norm()).item() if r.norm() > 0 else float("nan"),
            "norm_ratio": (g.norm() / r.norm()).item() if r.norm() > 0 else float("nan")}


def estimate_once(setting: EstimatorSetting, instance: ProblemInstance, generator: torch.Generator,
                  device: torch.device) -> tuple[list[Tensor], float, float]:
    """One hypergradient: (estimate, seconds, peak memory in MB above the level before it)."""
    for h in instance.hyperparams:
        h.grad = None
    options = dict(setting.options)
    if setting.family.startswith("evograd"):
        options["generator"] = generator
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        reset_peak_rss()
        base_mb = current_rss_mb()
    start = time.perf_counter()
    meta_backward(setting.method, instance.params, instance.hyperparams, instance.train_loss_fn,
                  instance.val_loss_fn, **options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()) - base_mb
    estimate = [h.grad.detach().clone() for h in instance.hyperparams]
    return estimate, seconds, peak


def run_problem(problem: StudyProblem, settings: Sequence[EstimatorSetting], draws: int, seed: int,
                device: torch.device, quick: bool, cache_dir: Path, warmup: int = 1) -> list[dict]:
    """Every setting on ``draws`` draws, interleaved; one summary row per setting."""
    instances = problem.build(problem.instances, seed, device, quick, Path(cache_dir))
    generator = torch.Generator(device=device).manual_seed(seed)
    for setting in settings:  # warm-up: first calls pay for allocations and lazy imports
        for _ in range(warmup):
            estimate_once(setting, instances[0], generator, device)
    records: dict[str, list[dict]] = {s.label: [] for s in settings}
    for draw in progress(range(draws), desc=problem.name):
        instance = instances[draw % len(instances)]
        shift = draw % len(settings)
        for setting in list(settings[shift:]) + list(settings[:shift]):
            estimate, seconds, peak = estimate_once(setting, instance, generator, device)
            records[setting.label].append({**fidelity(estimate, instance.reference),
                                           "seconds": seconds, "peak_mb": peak})
    rows = []
    for setting in settings:
        recs = records[setting.label]
        row = {"problem": problem.name, "hyper_kind": problem.hyper_kind, "label": setting.label,
               "method": setting.method, "family": setting.family,
               "options": {k: v for k, v in setting.options.items()}, "draws": len(recs)}
        for key in ("cosine", "sign_agreement", "rel_error", "norm_ratio", "seconds"):
            values = [r[key] for r in recs if not math.isnan(r[key])]
            row[key] = statistics.fmean(values) if values else float("nan")
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["seconds_median"] = statistics.median(r["seconds"] for r in recs)
        row["peak_mb"] = max(r["peak_mb"] for r in recs)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# table, figure, CLI
# ---------------------------------------------------------------------------------------------

def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of one problem's rows; time ratio to the one-step ``second_order``."""
    ref = next((r for r in rows if r["label"] == "second_order"), None)
    lines = ["| estimator | cosine (mean ± std) | sign agreement | ‖ĝ‖/‖g‖ | ms / hypergradient | "
             "time ratio | peak MB | draws |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref and ref["seconds"] > 0 else "n/a"
        lines.append(f"| {r['label']} | {r['cosine']:.3f} ± {r['cosine_std']:.3f} | {r['sign_agreement']:.3f} | "
                     f"{r['norm_ratio']:.3g} | {1e3 * r['seconds']:.3g} | {ratio} | {r['peak_mb']:.3g} | {r['draws']} |")
    return "\n".join(lines)


FAMILY_STYLE = {  # family: (colour, marker, legend text); one style per estimator family
    "evograd": ("tab:green", "o", "EvoGrad (K)"),
    "evograd other path": ("tab:green", "x", "EvoGrad, other memory path"),
    "evograd sigma": ("yellowgreen", "v", "EvoGrad K = 2, σ sweep"),
    "evograd tau": ("mediumaquamarine", "^", "EvoGrad K = 2, τ sweep"),
    "one-step": ("tab:red", "s", "one-step (second-order, torch.func, finite differences)"),
    "unrolled": ("tab:blue", "D", "unrolled (T)"),
    "multistep": ("tab:purple", "P", "multistep (T, W)"),
    "cg": ("tab:orange", "*", "implicit: conjugate gradient (J)"),
    "neumann": ("tab:brown", "h", "implicit: Neumann series (J)"),
    "sama": ("black", "X", "SAMA (SGD)"),
}
SUMMARY_FAMILIES = ("evograd", "one-step", "unrolled", "multistep", "cg", "neumann", "sama")


def short_label(label: str) -> str:
    """A setting's label as printed beside its point: "EvoGrad K=2", "unrolled T=20", "cg J=10"."""
    label = label.replace("evograd_low_memory", "EvoGrad").replace("evograd", "EvoGrad")
    return label.replace("second_order_func", "torch.func").replace("second_order", "second-order")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, fidelity) that no other point beats on both: cheaper-or-equal
    and at least as faithful, one of them strictly."""
    front = []
    for i, (cost, fid) in enumerate(points):
        dominated = any((c <= cost and f >= fid) and (c < cost or f > fid) for j, (c, f) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _cost(row: dict, axis: str) -> float:
    return 1e3 * row["seconds"] if axis == "time" else max(row["peak_mb"], 1e-2)


def _panel(ax, rows: Sequence[dict], axis: str, families: Sequence[str] | None = None, label_size: float = 6.5) -> None:
    """Mean cosine (± standard error) against cost; each family a line in order of cost; labels on the front."""
    from matplotlib.transforms import Bbox
    from matplotlib.ticker import NullFormatter
    shown = [r for r in rows if families is None or r["family"] in families]
    for family, (color, marker, text) in FAMILY_STYLE.items():
        members = sorted((r for r in shown if r["family"] == family), key=lambda r: _cost(r, axis))
        if not members:
            continue
        xs, ys = [_cost(r, axis) for r in members], [r["cosine"] for r in members]
        sems = [r["cosine_std"] / math.sqrt(max(r["draws"], 1)) for r in members]
        ax.errorbar(xs, ys, yerr=sems, color=color, marker=marker, ms=6 if marker != "*" else 9, lw=1.2,
                    elinewidth=0.7, capsize=1.5, alpha=0.9, label=text, mec="white" if marker not in "xX" else color,
                    mew=0.5)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-1.05, 1.1)
    points = [(_cost(r, axis), r["cosine"]) for r in shown]
    logs = [math.log(x) for x, _ in points] or [0.0]
    low, span = min(logs), max(max(logs) - min(logs), 1e-9)
    renderer, placed = ax.figure.canvas.get_renderer(), []  # the boxes of the labels drawn so far
    radius = 4 * ax.figure.dpi / 72  # a marker's half-size (ms=6 points), in pixels
    markers = [Bbox.from_extents(px - radius, py - radius, px + radius, py + radius)
               for px, py in ax.transData.transform(points)] if points else []
    for i in sorted(pareto_front(points), key=lambda i: points[i][0]):
        right_side = (math.log(points[i][0]) - low) / span > 0.7  # label to the left of points near the right edge
        # below the point first, then above, then further out: the first place that overlaps no label
        offsets = (-10, 5, -19, 14, -28, 23) if points[i][1] <= 0.85 else (-10, -19, -28, 5)
        for k, dy in enumerate(offsets):
            text = ax.annotate(short_label(shown[i]["label"]), points[i], fontsize=label_size, color="0.15",
                               xytext=(-4 if right_side else 4, dy), textcoords="offset points",
                               ha="right" if right_side else "left", zorder=1.5,
                               bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75})
            box = text.get_window_extent(renderer)
            # (a label may cover no other label and no marker, its own included)
            if k == len(offsets) - 1 or not any(box.overlaps(other) for other in placed + markers):
                placed.append(box)
                break
            text.remove()
    ax.axhline(0, color="0.6", lw=0.6, zorder=0)
    ax.set_xlabel("ms per hypergradient" if axis == "time" else "peak MB above start (one call)")
    ax.grid(alpha=0.25)


def _figure_legend(fig, axes, y: float) -> None:
    handles, labels = {}, {}
    for ax in axes:
        for h, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, h)
    order = [style[2] for style in FAMILY_STYLE.values() if style[2] in handles]
    fig.legend([handles[t] for t in order], order, loc="upper center", bbox_to_anchor=(0.5, y), ncol=3,
               fontsize=8, frameon=False)


def plot_fidelity_vs_cost(rows_by_problem: dict[str, list[dict]], stem: Path,
                          formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Every problem: cosine with the reference against time (left) and peak memory (right).

    One colour and marker per estimator family, a family's settings joined in order of cost, text
    labels only on the points of the Pareto front (nothing both cheaper and more faithful), one
    legend for the figure.
    """
    from common.plotting import plt, save_figure
    n = len(rows_by_problem)
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.3 * n + 1.2), squeeze=False)
    for (name, rows), (ax_time, ax_mem) in zip(rows_by_problem.items(), axes):
        kind = rows[0]["hyper_kind"] if rows else ""
        for ax, axis in ((ax_time, "time"), (ax_mem, "memory")):
            _panel(ax, rows, axis)
            ax.set_title(f"{name} (λ on the {kind})", fontsize=9)
        ax_time.set_ylabel("cosine with reference")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.85 / (3.3 * n + 1.2)))
    _figure_legend(fig, axes.flatten(), 1.0)
    return save_figure(fig, stem, formats)


def summary_problems(rows_by_problem: dict[str, list[dict]]) -> dict[str, str]:
    """One problem per kind of hyperparameter: the one where ``second_order`` takes longest (the
    largest model of that kind), {kind: problem}."""
    chosen: dict[str, tuple[float, str]] = {}
    for name, rows in rows_by_problem.items():
        ref = next((r for r in rows if r["label"] == "second_order"), rows[0] if rows else None)
        if ref is None:
            continue
        kind = ref["hyper_kind"]
        if kind not in chosen or ref["seconds"] > chosen[kind][0]:
            chosen[kind] = (ref["seconds"], name)
    order = ("loss", "input", "network")
    return {k: chosen[k][1] for k in sorted(chosen, key=lambda k: order.index(k) if k in order else 9)}


def draw_figures(rows_by_problem: dict[str, list[dict]], folder: Path, prefix: str = "",
                 formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """The study's two figures, ``<prefix>fidelity_vs_cost`` and ``<prefix>fidelity_vs_time_summary``, in ``folder``."""
    folder = Path(folder)
    return (plot_fidelity_vs_cost(rows_by_problem, folder / f"{prefix}fidelity_vs_cost", formats)
            + plot_summary(rows_by_problem, folder / f"{prefix}fidelity_vs_time_summary", formats))


def plot_summary(rows_by_problem: dict[str, list[dict]], stem: Path,
                 formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """One row: cosine against time for one problem per kind of hyperparameter, main families only."""
    from common.plotting import plt, save_figure
    picks = summary_problems(rows_by_problem)
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.9), squeeze=False)
    for ax, (kind, name) in zip(axes[0], picks.items()):
        _panel(ax, rows_by_problem[name], "time", SUMMARY_FAMILIES, label_size=6)
        ax.set_title(f"λ on the {kind} ({name})", fontsize=9)
    axes[0][0].set_ylabel("cosine with reference")
    fig.tight_layout(rect=(0, 0, 1, 0.85))
    _figure_legend(fig, axes[0], 1.0)
    return save_figure(fig, stem, formats)


def load_rows(paths: Sequence[Path]) -> dict[str, list[dict]]:
    """{problem: rows} from study.json files; a later file's problems replace an earlier file's."""
    rows_by_problem: dict[str, list[dict]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise CLIError(f"--from-json: no such file {path}; give study.json files written by this module")
        fresh: dict[str, list[dict]] = {}
        try:
            study = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CLIError(f"--from-json: {path} is not readable JSON ({err}); give study.json files written by "
                           "this module") from None
        rows = study.get("rows") if isinstance(study, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("problem"), str)
                                                 for r in rows):
            what = "a results file" if isinstance(study, dict) and "metrics" in study else "not a study file"
            raise CLIError(f"--from-json: {path} is {what} (no list of rows, each naming its problem); "
                           "give study.json files written by this module")
        for row in rows:
            fresh.setdefault(row["problem"], []).append(row)
        rows_by_problem.update(fresh)
    return rows_by_problem


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m common.hypergrad_study", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--problems", nargs="+", help="problems to run (default: all found)")
    parser.add_argument("--draws", type=positive(int), default=64, help="hypergradients per setting (EvoGrad noise, instances)")
    parser.add_argument("--warmup", type=non_negative(int), default=1, help="untimed calls per setting before the draws")
    parser.add_argument("--threads", type=positive(int), default=1, help="torch CPU threads (1: steadier timings)")
    parser.add_argument("--list", action="store_true", help="list the problems and exit")
    parser.add_argument("--from-json", "--from_json", nargs="+", type=Path, metavar="STUDY_JSON",
                        help="only redraw the figures into --out from these study.json files (a later file's "
                             "problems replace an earlier file's)")
    add_common_args(parser, default_seeds=(0,), default_out="results/hypergrad_study")
    refuse_flags(parser, "the study builds its own problems", "--data-root")
    args = parser.parse_args(argv)
    if len(args.seeds) > 1 and args.seed is None:
        raise CLIError(f"the study runs one seed (its draws are the repetitions); got --seeds {args.seeds}: "
                       "pass one --seed")
    if args.from_json:
        figures = draw_figures(load_rows(args.from_json), Path(args.out))
        print(f"wrote {', '.join(map(str, figures))}")
        return
    problems = discover_problems()
    if args.list:
        for p in problems.values():
            print(f"{p.name}: λ on the {p.hyper_kind}; reference {p.reference}")
        return
    names = args.problems or list(problems)
    unknown = [n for n in names if n not in problems]
    if unknown:
        raise CLIError(f"unknown problem(s) {unknown}; found: {sorted(problems)}")
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    if finished_runs([prepare_out(args.out) / "study.json"], args.resume, args.overwrite):
        return  # --resume: the study in --out is finished
    seed = args.seed if args.seed is not None else args.seeds[0]
    draws = min(args.draws, 8) if args.quick else args.draws
    out = Path(args.out)
    rows_by_problem, tables = {}, []
    for name in names:
        problem = problems[name]
        seed_everything(seed)
        n_draws = min(draws, problem.max_draws or draws)
        rows = run_problem(problem, estimator_settings(problem, args.quick), n_draws, seed, device, args.quick,
                           out / "checkpoints", args.warmup)
        rows_by_problem[name] = rows
        for r in rows:
            write_results(out, experiment=EXPERIMENT, method=r["label"].replace(" ", "_"), seed=seed, setting=name,
                          config={"problem": name, "method": r["method"], **r["options"], "draws": r["draws"],
                                  "quick": args.quick, "threads": args.threads},
                          metrics={k: r[k] for k in ("cosine", "cosine_std", "sign_agreement", "rel_error", "norm_ratio")},
                          efficiency={"meta_step_s": r["seconds"], "peak_mem_mb": r["peak_mb"], "device": str(device)})
        table = format_table(rows)
        tables.append(f"### {name} (λ on the {problem.hyper_kind}; reference: {problem.reference}; "
                      f"η = {problem.inner_lr:g})\n\n{table}\n")
        print(tables[-1], flush=True)
    atomic_write_json(out / "study.json", {"rows": [r for rows in rows_by_problem.values() for r in rows],
                                           "argv": list(argv if argv is not None else sys.argv[1:])})
    (out / "study.md").write_text("\n".join(tables))
    figures = draw_figures(rows_by_problem, out)
    print(f"wrote {out / 'study.md'}, {out / 'study.json'}, {', '.join(map(str, figures))}")


if __name__ == "__main__":
    # run the importable module's main: the study.py files register their problems there, not in __main__
    run_cli(importlib.import_module("common.hypergrad_study").main)
