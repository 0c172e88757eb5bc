"""Meta-iteration cost of LFT: second-order vs EvoGrad (and the no-FWT baseline), ResNet10/18/34.

    python -m common.bench cross_domain_fewshot --config 0 1 2        # paper shapes (224 px, 5w5s16q)
    python -m common.bench cross_domain_fewshot --config 3 4 5 ...    # smaller episodes (CPU sweep, 3-15)

One step = one full LFT meta-iteration of ``cross_domain_fewshot.lft.LFTTrainer`` on a fixed
pseudo-seen and a fixed pseudo-unseen episode of random images (no data loading, no auxiliary
loss): the model update with FWT on plus the hypergradient and the FWT update.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from common.bench import register_benchmark
from cross_domain_fewshot.lft import LFTTrainer
from cross_domain_fewshot.models import build_model

PAPER_SHAPE = dict(image_size=224, n_way=5, n_shot=5, n_query=16)
PAPER_CONFIGS = tuple({"backbone": b, **PAPER_SHAPE} for b in ("ResNet10", "ResNet18", "ResNet34"))
# Smaller episodes that fit this shared CPU machine: memory against images per episode (n_query)
# and against image side, for the smallest and the largest backbone.
SWEEP_CONFIGS = tuple({"backbone": b, "image_size": size, "n_way": 5, "n_shot": 5, "n_query": q}
                      for b in ("ResNet10", "ResNet34") for size, q in ((32, 1), (32, 4), (32, 16), (64, 1), (64, 4)))
# configs 13-15: a larger image for ResNet10, and two points for ResNet18
SWEEP_CONFIGS += tuple({"backbone": b, "image_size": size, "n_way": 5, "n_shot": 5, "n_query": q}
                       for b, size, q in (("ResNet10", 128, 1), ("ResNet18", 32, 4), ("ResNet18", 64, 4)))


@register_benchmark("cross_domain_fewshot", methods=("lft_second_order", "lft_evograd", "baseline"),
                    reference="lft_second_order", configs=PAPER_CONFIGS + SWEEP_CONFIGS,
                    quick_configs=({"backbone": "ResNet10", "width": 16, "image_size": 32, "n_way": 5, "n_shot": 5,
                                    "n_query": 4},),
                    description="LFT meta-iteration (RelationNet softmax, 2 episodes), configs 0-2 paper shapes")
def make_step(method: str, config: dict, device: torch.device) -> Callable[[], None]:
    """Build the model, trainer and two random episodes once; return one meta-iteration."""
    torch.manual_seed(0)
    model = build_model(config["backbone"], config.get("head", "relationnet_softmax"), config["image_size"],
                        config.get("width", 64)).to(device)
    trainer = LFTTrainer(model, method, generator=torch.Generator().manual_seed(0))
    shape = (config["n_way"], config["n_shot"] + config["n_query"], 3, config["image_size"], config["image_size"])
    seen, unseen = torch.randn(shape, device=device), torch.randn(shape, device=device)

    def step() -> None:
        trainer.step(seen, unseen, config["n_shot"])
    return step
