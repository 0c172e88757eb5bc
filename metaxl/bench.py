"""MetaXL benchmark: one training iteration of joint training, MetaXL and MetaXL + EvoGrad.

    python -m common.bench metaxl                # XLM-R base size (random init), batch 12, length 200
    python -m common.bench metaxl --quick        # tiny model, for a smoke run

An iteration is what training repeats: the RTN meta step (meta methods) and the main update, with
``metaxl.train``'s defaults: Adam with coupled weight decay, one target batch split in half
between L_train and the meta loss (joint training uses all of it), and for ``metaxl_evograd`` the
encoder rerun for every candidate. ``metaxl_evograd_shared`` (named with ``--methods``) runs the
encoder once and shares its features between the K heads (``--candidate_encoder shared``).
``metaxl`` is MetaXL's second-order meta step; ``metaxl_finite_difference`` and ``metaxl_sama``
(named with ``--methods``) are ``metaxl`` with ``--metaxl_estimator finite_difference`` and ``sama``.
Every sentence in a batch is ``seq_len`` sub-tokens long (random ids, random tags), so the cost is
that of the longest batches of the paper setting.

Configs 3-5 (12 layers of width 256, 384 and 512, a 8,000-row embedding, a global batch of 4
sentences of 32 sub-tokens) are for ``--nproc 2 --fsdp``: small batches, so that the parameters,
not the activations, dominate the memory. A sharded config shards XLM-R as ``metaxl.train --fsdp``
does (one unit per transformer layer and the root; the RTN stays replicated), and, as there, only
estimators with a sharded version run: ``metaxl`` (second order) and ``metaxl_evograd_shared``
fail their sharded rows with the reason, ``metaxl_finite_difference``, ``metaxl_sama``,
``metaxl_evograd`` (the head perturbed, the encoder rerun per candidate) and
``joint_training`` run:

    python -m common.bench metaxl --config 3 4 5 --nproc 2 --fsdp --warmup 1 --reps 2 \
        --methods joint_training metaxl metaxl_finite_difference metaxl_sama metaxl_evograd
"""
from __future__ import annotations

import json
from collections.abc import Callable

import torch

from common.bench import register_benchmark
from common.fsdp import check_fsdp_estimator, shard_model
from metaxl.data import LABELS, split_batch
from metaxl.model import (METHODS, RepresentationTransformation, StepConfig, base_config, build_optimizer, build_tagger,
                          tiny_config, train_iteration)

SHARED_ENCODER = "metaxl_evograd_shared"
# benchmark method -> (metaxl.train's --method, the StepConfig it runs with)
VARIANTS = {"metaxl_finite_difference": ("metaxl", {"metaxl_estimator": "finite_difference"}),
            "metaxl_sama": ("metaxl", {"metaxl_estimator": "sama"}),
            SHARED_ENCODER: ("metaxl_evograd", {"candidate_encoder": "shared"})}
# 12 layers of width w for --nproc 2 --fsdp: a small vocabulary and batch, so the layers dominate θ
FSDP_CONFIGS = tuple({"size": "base", "batch": 4, "seq_len": 32, "vocab_size": 8000, "hidden_size": w,
                      "num_attention_heads": w // 64, "intermediate_size": 4 * w} for w in (256, 384, 512))


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
    Each memory measurement runs one method in its own process, so it is unaffected. A sharded
    config (``"fsdp": true``, one method per torchrun process) is built anew and not kept: the
    model is sharded before its optimiser is made, and must be freed before its process group is
    left (``common.distributed.close_data_parallel``).
    """
    key = (json.dumps(config, sort_keys=True), str(device))
    if key in _SHARED:
        return _SHARED[key]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model_config = base_config() if config.get("size", "base") == "base" else tiny_config(1000, 512)
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size"):
        setattr(model_config, name, config.get(name, getattr(model_config, name)))
    model = build_tagger(model_config).to(device).train()
    batches = [_random_batch(generator, config["batch"], config["seq_len"], model_config.vocab_size, device)
               for _ in range(2)]
    parameters = sum(p.numel() for p in model.parameters())
    if config.get("fsdp"):  # as metaxl.train --fsdp, before the optimiser is made: it holds the shards
        shard_model(model, list(model.roberta.encoder.layer))
    optimizer = build_optimizer("adam", model.parameters(), 3e-5, 5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    built = (model, optimizer, scheduler, batches, generator, parameters)
    if not config.get("fsdp"):
        _SHARED[key] = built
    return built


def check_fsdp_method(method: str) -> None:
    """ValueError (one line, the reason) unless benchmark method ``method`` runs on a sharded model.

    The checks of ``metaxl.train --fsdp`` (``check_fsdp_args``): the meta estimator must have a
    sharded version, and EvoGrad must rerun the encoder per candidate.
    """
    base, options = VARIANTS.get(method, (method, {}))
    estimator = {"metaxl": options.get("metaxl_estimator", StepConfig.metaxl_estimator),
                 "metaxl_evograd": StepConfig.evograd_estimator}.get(base)
    if estimator is not None:
        try:
            check_fsdp_estimator(estimator)
        except ValueError as err:
            raise ValueError(f"{method} ({estimator} meta step) cannot run sharded; run metaxl_finite_difference "
                             f"or metaxl_sama: {err}") from None
    if options.get("candidate_encoder", "per_candidate") != "per_candidate":
        raise ValueError(f"{method} shares the encoder's features between the heads, which a sharded encoder "
                         "cannot do: a sharded model runs the encoder for every candidate (metaxl_evograd)")


@register_benchmark("metaxl", methods=METHODS, reference="metaxl", extra_methods=tuple(VARIANTS),
                    plain="joint_training",
                    configs=({"size": "base", "batch": 12, "seq_len": 200},
                             # what fitted the shared 24 GB machine: full encoder, 50k-row embedding
                             {"size": "base", "batch": 12, "seq_len": 64, "vocab_size": 50000},
                             # 12 layers of width 256: what finished on the shared 2-core machine
                             {"size": "base", "batch": 12, "seq_len": 64, "vocab_size": 30000, "hidden_size": 256,
                              "num_attention_heads": 4, "intermediate_size": 1024}) + FSDP_CONFIGS,
                    quick_configs=({"size": "tiny", "batch": 12, "seq_len": 32},),
                    description="one iteration (meta step + main update) on XLM-R, random init")
def make_step(method: str, config: dict, device: torch.device) -> Callable[[], None]:
    """One training iteration of ``method`` (RTN after the last layer, bottleneck 384, K = 2)."""
    if config.get("fsdp"):  # common.bench --fsdp: refused before any work, as metaxl.train --fsdp refuses it
        check_fsdp_method(method)
    model, optimizer, scheduler, (source, target), generator, parameters = _shared_model(config, device)
    base, options = VARIANTS.get(method, (method, {}))
    rtn = (RepresentationTransformation(model.config.hidden_size, config.get("bottle_size", 384)).to(device)
           if base != "joint_training" else None)
    meta_optimizer = build_optimizer("adam", rtn.parameters(), 1e-6, 5e-4) if rtn is not None else None
    # the RTN after the last layer, as 12 for base
    cfg = StepConfig(transfer_layer=model.config.num_hidden_layers, **options)
    target_part, meta = split_batch(target, target["input_ids"].shape[0] // 2) if rtn is not None else (target, None)

    def step() -> None:
        train_iteration(base, model, rtn, optimizer, scheduler, meta_optimizer, source, target_part, meta, cfg,
                        generator)
    step.parameters = parameters  # the whole XLM-R's, read by common.bench's data-parallel rows
    return step
