"""Meta-iteration benchmark of the rotation experiment for ``python -m common.bench rotation``.

One step is one training iteration of ``rotation.train``: an Adam step of LeNet on the batch
rotated by the angle, then the angle's hypergradient (EvoGrad or one unrolled SGD step through
``higher``) and its Adam step, on random MNIST-shaped batches of 128 images. Configs widen LeNet
(``width`` multiplies channels and hidden units: 1, 2, 4, 8, 16) and vary EvoGrad's K (2, 5, 10;
the second-order step does not use K, it is rerun there only as the reference). ``evograd`` is the
plain path (K candidate graphs alive until backward), ``evograd_low_memory`` keeps one at a time,
``evograd_batched`` (by ``--methods``) runs the K candidate passes as one ``torch.func.vmap``;
configs 8 and 9 are width 4 at K = 5 and 10.
Config 7 is the estimator study's end-to-end setting: with ``--methods`` naming any of the other
estimators too (``finite_difference``, ``unrolled``, ``multistep``, ``second_order_func``, ``cg``,
``neumann``, ``sama``), its ``inner_steps`` = ``window`` = 5 applies to ``unrolled`` and
``multistep``; ``second_order`` stays the one-step unroll. ``cg`` and ``neumann`` run with their
defaults (J = 10 and J = 5, Neumann α = the inner lr) and ``sama`` with plain SGD at the inner lr
as its base optimiser, as ``rotation.train`` runs them (LeNet's own optimiser is Adam, which
``rotation.train`` does not hand to the estimator).

    python -m common.bench rotation --config 7 --methods second_order evograd finite_difference multistep unrolled
    python -m common.bench rotation --config 7 --methods second_order evograd cg neumann sama
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.bench import horizon_options, register_benchmark
from common.hypergrad import ESTIMATORS
from rotation.data import BACKGROUND
from rotation.model import LeNet, RotationTransformer
from rotation.train import meta_step, model_step

WIDTHS = (1, 2, 4, 8, 16)
CONFIGS = tuple({"width": w, "k": 2, "batch": 128} for w in WIDTHS) + tuple(
    {"width": 1, "k": k, "batch": 128} for k in (5, 10)) + ({"width": 1, "k": 2, "batch": 128, "inner_steps": 5,
                                                            "window": 5},)
# configs 8, 9: width 4 at K = 5, 10 (with configs 2, 5, 6: the batched-candidates comparison)
CONFIGS += tuple({"width": 4, "k": k, "batch": 128} for k in (5, 10))


@register_benchmark("rotation", methods=("evograd", "evograd_low_memory", "second_order"), reference="second_order",
                    extra_methods=tuple(ESTIMATORS),
                    configs=CONFIGS, quick_configs=({"width": 1, "k": 2, "batch": 16},),
                    description="LeNet + one-angle rotation transformer, one full training iteration")
def make_step(method: str, config: dict, device: torch.device) -> Callable[[], None]:
    """Build LeNet of ``config['width']`` and fixed random batches; return one training iteration."""
    torch.manual_seed(0)
    batch = config.get("batch", 128)
    model = LeNet(config.get("width", 1)).to(device)
    transformer = RotationTransformer(fill=BACKGROUND).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta_optimizer = torch.optim.Adam(transformer.parameters(), lr=1e-2)
    x, val_x = torch.randn(2, batch, 1, 28, 28, device=device)
    y, val_y = torch.randint(0, 10, (2, batch), device=device)
    options = {"n_candidates": config.get("k", 2), "sigma": 1e-3, "temperature": 0.05, "noise": "sign",
               "generator": torch.Generator().manual_seed(0), "inner_lr": 1e-3, "inner_steps": 1,
               "cg_iters": 10, "neumann_iters": 5}
    options.update(horizon_options(method, config))

    def step() -> None:
        model_step(model, optimizer, transformer, x, y)
        meta_step(method, model, transformer, meta_optimizer, x, y, val_x, val_y, options)
    return step
