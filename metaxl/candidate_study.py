"""MetaXL + EvoGrad: does rerunning the encoder for every candidate change the RTN hypergradient?

    python -m metaxl.candidate_study --draws 200                  # the --quick tiny model (4 x 64)
    python -m metaxl.candidate_study --draws 100 --size w128      # 12 layers of width 128 (w256: 256)

At one fixed state of the main model (random init, then ``--warm_steps`` joint-training steps on
the quick synthetic data) and one fixed source batch and target batch (split 6/6 between L_train
and the meta loss, as in training), the RTN hypergradient g = ∂L_meta/∂φ is drawn ``--draws``
times by each estimator, with fresh EvoGrad noise ε and fresh dropout in every draw:

* ``per_candidate``: the encoder runs again for each candidate θ_k (own dropout mask per ℓ_k);
* ``shared``: the encoder runs once and the K heads share its features.

Draw d of both uses the same ε. Printed and written to ``--out`` (JSON):

* paired cosine: mean over draws of cos(g_per_candidate, g_shared);
* cosine of the means cos(ḡ_per_candidate, ḡ_shared), beside each estimator's split-half cosine
  (mean of the first half of its draws against the second half: how far its own noise lets two
  means of that many draws agree);
* each mean against two references: EvoGrad without dropout (eval mode, where the two
  estimators coincide; as many draws) and second-order MetaXL (one virtual SGD step of the whole
  model, dropout on; mean of ``--draws`` draws);
* the norm of each mean relative to the per-candidate one;
* the spread that drives EvoGrad's weights w = softmax(−ℓ/τ): the mean |ℓ_1 − ℓ_2| of two
  candidates' training losses, from the head noise alone (shared features) and from two encoder
  runs at the same head (dropout alone), beside τ.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from common.results import atomic_write_json, env_info
from common.runtime import CLIError, prepare_out_file, DefaultsHelpFormatter, positive, progress, run_cli
from metaxl import train as metaxl_train
from metaxl.data import build_vocab, collate, encode, epoch_batches, split_batch
from metaxl.model import (TINY, RepresentationTransformation, StepConfig, build_optimizer, build_tagger, encoder_features,
                          load_tokenizer, metaxl_evograd_meta_step, metaxl_meta_step, tiny_config, token_loss,
                          train_iteration)

SIZES = {"tiny": {},
         "w128": {"hidden_size": 128, "num_hidden_layers": 12, "num_attention_heads": 4, "intermediate_size": 512},
         "w256": {"hidden_size": 256, "num_hidden_layers": 12, "num_attention_heads": 4, "intermediate_size": 1024}}


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


def split_half_cosine(draws: Tensor) -> float:
    """cos(mean of the first half of the draws [D, P], mean of the second half)."""
    half = draws.shape[0] // 2
    return cosine(draws[:half].mean(0), draws[half:2 * half].mean(0))


def rtn_gradient(rtn: torch.nn.Module, meta_step: Callable[[], float]) -> Tensor:
    """The RTN's hypergradient from one meta step, flattened."""
    rtn.zero_grad(set_to_none=True)
    meta_step()
    return torch.cat([p.grad.flatten() for p in rtn.parameters()])


@torch.no_grad()
def loss_spreads(model, rtn, source, target, layer: int, sigma: float, draws: int) -> dict[str, float]:
    """Mean |ℓ_1 − ℓ_2| of L_train from the head noise alone and from dropout alone (training mode)."""
    head = dict(model.classifier.named_parameters())

    def loss(h: dict, feats: tuple) -> float:
        return sum(token_loss(F.linear(x, h["weight"], h["bias"]), b["labels"])
                   for x, b in zip(feats, (source, target))).item()

    def features() -> tuple:
        return encoder_features(model, source, rtn, layer), encoder_features(model, target)

    noise, dropout = [], []
    for _ in range(draws):
        feats = features()
        pair = [{n: p + sigma * torch.sign(torch.randn_like(p)) for n, p in head.items()} for _ in range(2)]
        noise.append(abs(loss(pair[0], feats) - loss(pair[1], feats)))
        dropout.append(abs(loss(head, feats) - loss(head, features())))
    return {"head_noise": statistics.fmean(noise), "dropout": statistics.fmean(dropout)}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m metaxl.candidate_study", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--draws", type=positive(int), default=200, help="hypergradients per estimator")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="tiny (4 layers x 64), w128 or w256 (12 x 128, 12 x 256)")
    p.add_argument("--warm_steps", type=int, default=25, help="joint-training steps before the draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the batches and the draws")
    p.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.draws < 2 or args.warm_steps < 0:
        raise CLIError(f"--draws must be >= 2 and --warm_steps >= 0, got {args.draws} and {args.warm_steps}")
    if args.out:  # the study takes minutes: an unusable --out is refused before it starts
        prepare_out_file(args.out, "--out")

    train_args = metaxl_train.parse_args(["--quick"])  # the quick run's data, lr, bottleneck, K, σ, τ
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="metaxl_study_") as scratch:
        data = metaxl_train.load_data(train_args, train_args.targets[0], Path(scratch))
    vocab = build_vocab(data["source"] + data["target"])
    tokenizer = load_tokenizer(TINY, vocab)
    config = tiny_config(len(vocab), train_args.max_seq_length)
    for key, value in SIZES[args.size].items():
        setattr(config, key, value)
    model = build_tagger(config).train()
    layer = config.num_hidden_layers
    # the xlmr input format (encode's default), as when the study's numbers were measured
    source_items = encode(tokenizer, data["source"], train_args.max_seq_length)
    target_items = encode(tokenizer, data["target"], train_args.max_seq_length)
    order = torch.Generator().manual_seed(args.seed)
    warm = build_optimizer("adam", model.parameters(), train_args.lr, train_args.weight_decay)
    constant = torch.optim.lr_scheduler.LambdaLR(warm, lambda step: 1.0)
    pad = tokenizer.pad_token_id
    for step, batch in zip(range(args.warm_steps), epoch_batches(source_items * 10, 12, order, pad)):
        target = collate([target_items[(12 * step + i) % len(target_items)] for i in range(12)], pad)
        # the study's fixed protocol (its published numbers): warm-up on L_source + L_target clipped at 10
        train_iteration("joint_training", model, None, warm, constant, None, batch, target, None,
                        StepConfig(layer, joint_loss="sum_clipped"))
    source = next(epoch_batches(source_items, train_args.batch_size, order, pad))
    target, meta = split_batch(collate(target_items[: train_args.batch_size], pad), train_args.batch_size // 2)
    rtn = RepresentationTransformation(config.hidden_size, train_args.bottle_size)
    evograd = {"n_candidates": train_args.n_candidates, "sigma": train_args.sigma, "temperature": train_args.temperature}

    def evograd_draw(encoder: str, draw: int) -> Tensor:
        torch.manual_seed(10_000 * (encoder == "shared") + draw)  # dropout: independent between estimators
        return rtn_gradient(rtn, lambda: metaxl_evograd_meta_step(
            "evograd", model, rtn, source, target, meta, layer, candidate_encoder=encoder,
            generator=torch.Generator().manual_seed(draw), **evograd))  # ε: the same for both estimators

    draws: dict[str, list[Tensor]] = {"per_candidate": [], "shared": [], "no_dropout": [], "second_order": []}
    for d in progress(range(args.draws), total=args.draws, desc=f"draws ({args.size})"):
        for encoder in ("per_candidate", "shared"):
            draws[encoder].append(evograd_draw(encoder, d))
        torch.manual_seed(20_000 + d)
        draws["second_order"].append(rtn_gradient(rtn, lambda: metaxl_meta_step(
            "second_order", model, rtn, source, target, meta, layer, inner_lr=train_args.lr, inner_steps=1)))
        model.eval()
        draws["no_dropout"].append(evograd_draw("per_candidate", d))
        model.train()
    spreads = loss_spreads(model, rtn, source, target, layer, train_args.sigma, args.draws)
    stacked = {k: torch.stack(v) for k, v in draws.items()}
    means = {k: v.mean(0) for k, v in stacked.items()}
    paired = [cosine(a, b) for a, b in zip(stacked["per_candidate"], stacked["shared"])]
    result = {
        "size": args.size, "draws": args.draws, "warm_steps": args.warm_steps, "seed": args.seed,
        "rtn_parameters": int(means["shared"].numel()),
        "paired_cosine_mean": statistics.fmean(paired), "paired_cosine_std": statistics.stdev(paired),
        "cosine_of_means": cosine(means["per_candidate"], means["shared"]),
        "split_half_cosine": {k: split_half_cosine(stacked[k]) for k in ("per_candidate", "shared")},
        "cosine_with_no_dropout": {k: cosine(means[k], means["no_dropout"]) for k in ("per_candidate", "shared")},
        "cosine_with_second_order": {k: cosine(means[k], means["second_order"]) for k in ("per_candidate", "shared")},
        "mean_norm_relative_to_per_candidate": {k: (means[k].norm() / means["per_candidate"].norm()).item()
                                                for k in ("per_candidate", "shared", "no_dropout")},
        "train_loss_spread": spreads, "temperature": train_args.temperature,
        "config": {**vars(args), "model": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
                   **{k: getattr(train_args, k) for k in ("lr", "bottle_size", "n_candidates", "sigma", "temperature")}},
        "env": env_info(),
    }
    print(f"{args.size}, {args.draws} draws of the RTN hypergradient ({result['rtn_parameters']} parameters):")
    print(f"  paired cos(per_candidate, shared), same ε: {result['paired_cosine_mean']:.3f} ± "
          f"{result['paired_cosine_std']:.3f}")
    print(f"  cos of the means: {result['cosine_of_means']:.3f}   split-half cos: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["split_half_cosine"].items()))
    for ref in ("no_dropout", "second_order"):
        print(f"  cos with the {ref} mean: "
              + ", ".join(f"{k} {v:.3f}" for k, v in result[f"cosine_with_{ref}"].items()))
    print("  norm of the mean / per_candidate's: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["mean_norm_relative_to_per_candidate"].items()))
    print(f"  mean |l_1 - l_2| of two candidates: head noise alone {spreads['head_noise']:.2e}, "
          f"dropout alone {spreads['dropout']:.2e} (tau {train_args.temperature})")
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)
