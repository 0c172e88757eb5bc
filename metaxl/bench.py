"""MetaXL benchmark: one training iteration of joint training, MetaXL and MetaXL + EvoGrad.

    python -m common.bench metaxl                # XLM-R base size (random init), batch 12, length 200
    python -m common.bench metaxl --quick        # tiny model, for a smoke run

An iteration is what training repeats: the RTN meta step (meta methods) and the main update, with
``metaxl.train``'s defaults: Adam with coupled weight decay, one target batch split in half
between L_train and the meta loss (joint training uses all of it), and for ``metaxl_evograd`` the
encoder rerun for every candidate. ``metaxl_evograd_shared`` (named with ``--methods``) runs the
encoder once and shares its features between the K heads (``--candidate_encoder shared``).
Every sentence in a batch is ``seq_len`` sub-tokens long (random ids, random tags), so the cost is
that of the longest batches of the paper setting.
"""
from __future__ import annotations

import json
from collections.abc import Callable

import torch

from common.bench import register_benchmark
from metaxl.data import LABELS, split_batch
from metaxl.model import (METHODS, RepresentationTransformation, StepConfig, base_config, build_optimizer, build_tagger,
                          tiny_config, train_iteration)

SHARED_ENCODER = "metaxl_evograd_shared"


def _random_batch(generator: torch.Generator, batch: int, seq_len: int, vocab_size: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, vocab_size, (batch, seq_len), generator=generator)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    labels = torch.randint(0, len(LABELS), (batch, seq_len), generator=generator)
    labels[:, 0] = labels[:, -1] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


_SHARED: dict[tuple, tuple] = {}


def _shared_model(config: dict, device: torch.device) -> tuple:
    """Model, optimiser, scheduler and two fixed batches (source, target), built once per config and device.

    The interleaved timing process holds every method's step at once; sharing one XLM-R base
    (1.1 GB of weights, 2.2 GB of Adam state) between them keeps it within the machine's memory.
    Each memory measurement runs one method in its own process, so it is unaffected.
    """
    key = (json.dumps(config, sort_keys=True), str(device))
    if key not in _SHARED:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model_config = base_config() if config.get("size", "base") == "base" else tiny_config(1000, 512)
        for key in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size"):
            setattr(model_config, key, config.get(key, getattr(model_config, key)))
        model = build_tagger(model_config).to(device).train()
        batches = [_random_batch(generator, config["batch"], config["seq_len"], model_config.vocab_size, device)
                   for _ in range(2)]
        optimizer = build_optimizer("adam", model.parameters(), 3e-5, 5e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        _SHARED[key] = (model, optimizer, scheduler, batches, generator)
    return _SHARED[key]


@register_benchmark("metaxl", methods=METHODS, reference="metaxl", extra_methods=(SHARED_ENCODER,),
                    configs=({"size": "base", "batch": 12, "seq_len": 200},
                             # what fitted the shared 24 GB machine: full encoder, 50k-row embedding
                             {"size": "base", "batch": 12, "seq_len": 64, "vocab_size": 50000},
                             # 12 layers of width 256: what finished on the shared 2-core machine
                             {"size": "base", "batch": 12, "seq_len": 64, "vocab_size": 30000, "hidden_size": 256,
                              "num_attention_heads": 4, "intermediate_size": 1024}),
                    quick_configs=({"size": "tiny", "batch": 12, "seq_len": 32},),
                    description="one iteration (meta step + main update) on XLM-R, random init")
def make_step(method: str, config: dict, device: torch.device) -> Callable[[], None]:
    """One training iteration of ``method`` (RTN after the last layer, bottleneck 384, K = 2)."""
    model, optimizer, scheduler, (source, target), generator = _shared_model(config, device)
    encoder = "shared" if method == SHARED_ENCODER else "per_candidate"
    method = "metaxl_evograd" if method == SHARED_ENCODER else method
    rtn = (RepresentationTransformation(model.config.hidden_size, config.get("bottle_size", 384)).to(device)
           if method != "joint_training" else None)
    meta_optimizer = build_optimizer("adam", rtn.parameters(), 1e-6, 5e-4) if rtn is not None else None
    # the RTN after the last layer, as 12 for base
    cfg = StepConfig(transfer_layer=model.config.num_hidden_layers, candidate_encoder=encoder)
    target_part, meta = split_batch(target, target["input_ids"].shape[0] // 2) if rtn is not None else (target, None)

    def step() -> None:
        train_iteration(method, model, rtn, optimizer, scheduler, meta_optimizer, source, target_part, meta, cfg,
                        generator)
    return step
