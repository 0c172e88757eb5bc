"""Evaluate a MetaXL checkpoint (written by ``metaxl.train``) on a target language's dev or test set.

    python -m metaxl.eval --checkpoint results/metaxl/checkpoints/metaxl_synthetic-en-qu-tiny_metaxl_evograd_seed1.pt

The model is rebuilt from the configuration stored in the checkpoint (no hub download for
``--model tiny``). Without ``--data-root`` the data root of the training run is used, and for a
run on the embedded synthetic data the same synthetic files are generated again.
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import XLMRobertaConfig

from common.fsdp import gathered_checkpoint
from common.results import atomic_write_json, load_checkpoint
from common.runtime import CLIError, DefaultsHelpFormatter, positive, run_cli, select_device
from metaxl.data import input_format
from metaxl.model import TINY, build_tagger, evaluate, load_tokenizer
from metaxl.train import load_data


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m metaxl.eval", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a .pt file from metaxl.train (--out/checkpoints/)")
    p.add_argument("--split", default="test", choices=["dev", "test"], help="which target split to score")
    p.add_argument("--lang", default=None, help="target language (default: the one trained for)")
    p.add_argument("--data-root", default=None, help="PAN-X folder (default: the training run's)")
    p.add_argument("--eval_batch_size", type=positive(int), default=32, help="sentences per batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="also write the scores to this JSON file")
    args = p.parse_args(argv)
    device = select_device(args.device)
    try:
        ckpt = load_checkpoint(args.checkpoint, map_location=device, fix="pass a checkpoint that metaxl.train wrote")
    except FileNotFoundError as err:
        raise CLIError(f"{err}; train first with python -m metaxl.train") from None
    except Exception as err:  # a truncated or foreign file
        raise CLIError(f"cannot read checkpoint {args.checkpoint}: {err}") from None
    if "model_config" not in ckpt:
        raise CLIError(f"{args.checkpoint} is not a metaxl.train checkpoint")
    ckpt = gathered_checkpoint(args.checkpoint, ckpt)  # --fsdp: the shards, whole

    train_args = argparse.Namespace(**ckpt["config"])
    if args.data_root is not None:
        train_args.data_root = args.data_root
    lang = args.lang or ckpt["target"]
    tokenizer = load_tokenizer(train_args.model, ckpt["vocab"])
    model = build_tagger(XLMRobertaConfig.from_dict(ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    with tempfile.TemporaryDirectory(prefix="metaxl_eval_") as scratch:
        data = load_data(train_args, lang, Path(scratch))
    fmt = input_format(tokenizer, getattr(train_args, "input_format", "xlmr"))  # older checkpoints: xlmr
    scores = evaluate(model, tokenizer, data[args.split], train_args.eval_max_seq_length, args.eval_batch_size, device,
                      fmt)
    scores = {**scores, "lang": lang, "split": args.split, "method": ckpt["method"], "seed": ckpt["seed"],
              "epoch": ckpt["epoch"], "checkpoint": str(args.checkpoint)}
    print(f"{ckpt['method']} seed {ckpt['seed']} (epoch {ckpt['epoch']}) on {lang} {args.split}: "
          f"precision {scores['precision']:.2f}  recall {scores['recall']:.2f}  F1 {scores['f1']:.2f}")
    if args.out:
        atomic_write_json(args.out, scores)
    return scores


if __name__ == "__main__":
    run_cli(main)
