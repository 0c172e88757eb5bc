"""Benchmark registration: the 1-D problem batched into d independent coordinates.

L_train(θ, λ) = Σ_i (θ_i − 1)² + λ_i θ_i²,  L_val(θ) = Σ_i (θ_i − 0.5)², θ, λ ∈ R^d. A cheap
problem where the cost of the hypergradient itself dominates (no network), for comparing the
estimators' overheads:  python -m common.bench illustration_1d
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.bench import register_benchmark
from common.hypergrad import meta_backward


@register_benchmark("illustration_1d", methods=("evograd", "evograd_low_memory", "second_order", "second_order_func"),
                    reference="second_order", configs=({"dim": 100_000}, {"dim": 10_000_000}),
                    quick_configs=({"dim": 1000},),
                    description="batched 1-D problem: estimator overhead without a network")
def make_step(method: str, config: dict, device: torch.device) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(config["dim"], generator=g).to(device)
    lam = torch.full((config["dim"],), 0.5, device=device, requires_grad=True)

    def train(p):
        return ((p["theta"] - 1) ** 2 + lam * p["theta"] ** 2).sum()

    def val(p):
        return ((p["theta"] - 0.5) ** 2).sum()

    def step() -> None:
        lam.grad = None
        meta_backward(method, {"theta": theta}, [lam], train, val, n_candidates=2, sigma=1e-3,
                      temperature=0.05, inner_lr=0.1)
    return step
