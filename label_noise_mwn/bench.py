"""Benchmark: one MWN training iteration (meta step + actual step) at CIFAR shapes, per method.

    python -m common.bench label_noise_mwn                 # ResNet-32, batch 100, widths 1, 2, 4
    python -m common.bench label_noise_mwn --config 0      # width 1 only
    python -m common.bench label_noise_mwn --config 3 --methods baseline mwn_second_order mwn_evograd \
        finite_difference unrolled multistep                 # the README's MNIST protocol

Random tensors of CIFAR-10 shape (3x32x32, 10 classes) stand in for images: time and memory do
not depend on the pixel values. Config 3 has the shapes of the README's MNIST protocol (1x32x32,
ResNet-8 with 16 base channels, batch 100). A config's ``inner_steps``/``window`` apply to the
T-step estimators (``unrolled``, ``multistep``); ``mwn_second_order`` is MWN's one-step unroll.
The implicit estimators run as ``label_noise_mwn.train`` runs them: ``cg`` with J = 10, ``neumann``
with J = 5 and α = the model's learning rate, ``sama`` with plain SGD at that learning rate (the
momentum SGD of the model is not handed to the estimator). Configs 4 and 5 are ResNet-32 width 1
at K = 5 and 10 EvoGrad candidates (``k``, default 2); ``evograd_batched`` (by ``--methods``) runs
the K candidate passes as one ``torch.func.vmap``:

    python -m common.bench label_noise_mwn --config 3 --methods mwn_second_order mwn_evograd cg neumann sama
    python -m common.bench label_noise_mwn --config 0 4 5 --methods mwn_second_order mwn_evograd evograd_batched

Configs 6-9 (ResNet-8, then ResNet-32, at widths 4 and 8, a global batch of 4) are for
``--nproc 2 --fsdp``: small batches, so that the parameters, not the activations, dominate the
memory. ResNet-8 has one block per stage, so its last block, gathered whole while it runs, holds
most of θ; ResNet-32 has five:

    python -m common.bench label_noise_mwn --config 8 9 --nproc 2 --fsdp \
        --methods baseline mwn_evograd finite_difference sama mwn_second_order
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.bench import horizon_options, register_benchmark
from common.fsdp import check_fsdp_estimator, shard_model
from label_noise_mwn.models import CifarResNet, VNet
from label_noise_mwn.mwn import PAPER_METHODS, estimator_of, make_optimizers, method_choices, train_iteration


@register_benchmark(
    "label_noise_mwn", methods=PAPER_METHODS, reference="mwn_second_order", extra_methods=method_choices(),
    plain="baseline",
    configs=tuple({"depth": 32, "width": w, "batch": 100} for w in (1, 2, 4))
    + ({"depth": 8, "width": 1, "base_channels": 16, "channels": 1, "batch": 100, "inner_steps": 2, "window": 2},)
    + tuple({"depth": 32, "width": 1, "batch": 100, "k": k} for k in (5, 10))
    + tuple({"depth": d, "width": w, "batch": 4} for d in (8, 32) for w in (4, 8)),
    quick_configs=({"depth": 8, "width": 1, "batch": 8},),
    description="Meta-Weight-Net iteration (virtual/EvoGrad meta step + actual step), ResNet at CIFAR shapes")
def make_step(method: str, config: dict, device: torch.device) -> Callable[[], None]:
    """A closure running one full MWN training iteration of ``method`` on fixed random batches."""
    gen = torch.Generator().manual_seed(0)
    batch, classes = config["batch"], config.get("classes", 10)
    x, meta_x = (torch.randn(batch, config.get("channels", 3), 32, 32, generator=gen).to(device) for _ in range(2))
    y, meta_y = (torch.randint(0, classes, (batch,), generator=gen).to(device) for _ in range(2))
    torch.manual_seed(0)
    model = CifarResNet(classes, config["depth"], config["width"], config.get("channels", 3),
                        config.get("base_channels", 16)).to(device)
    vnet = VNet().to(device)
    parameters = sum(p.numel() for p in model.parameters())
    if config.get("fsdp"):  # common.bench --fsdp: shard the ResNet as label_noise_mwn.train --fsdp does
        if estimator_of(method) is not None:
            check_fsdp_estimator(estimator_of(method))
        shard_model(model, list(model.layers))
    model_opt, vnet_opt = make_optimizers(model, vnet, 0.1, 0.9, True, 5e-4, 1e-3, 0.9, 5e-4)
    options = {"inner_lr": 0.1, "inner_steps": 1, "n_candidates": config.get("k", 2), "sigma": 1e-3,
               "temperature": 0.05, "noise": "sign", "generator": torch.Generator().manual_seed(1), "cg_iters": 10,
               "neumann_iters": 5, **horizon_options(method, config)}

    def step() -> None:
        train_iteration(method, model, vnet, model_opt, vnet_opt, x, y, meta_x, meta_y, options)
    step.parameters = parameters  # the whole ResNet's, read by common.bench's data-parallel rows
    return step
