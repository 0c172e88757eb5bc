"""Evaluate a trained LFT checkpoint on the unseen domain: mean accuracy ± 95% CI over test episodes.

    python -m cross_domain_fewshot.eval --checkpoint results/cross_domain_fewshot/checkpoints/<run>.pt \
        [--data-root DIR] [--testset cub] [--episodes 1000] [--test-queries 15] [--test-checkpoint final]

The checkpoint (written by ``cross_domain_fewshot.train``) carries its config; episodes are drawn
from ``<data-root>/<testset>/novel.json`` without augmentation (``--test-queries`` queries per
class, 15 as in the authors' ``test.py``), the model (the final one, as the authors test, or the
best by validation accuracy) runs in eval mode with the FWT layers off. ``train.py`` runs the same
evaluation as its last stage.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from common.results import load_checkpoint
from common.runtime import CLIError, DefaultsHelpFormatter, positive, progress, run_cli, seed_everything
from cross_domain_fewshot.data import DOMAINS, EpisodeSampler, ImageSource, ImageTransform, domain_file_list
from cross_domain_fewshot.lft import evaluate
from cross_domain_fewshot.models import FewShotModel, build_model


TEST_CHECKPOINTS = {"final": "model", "best_val": "best_model"}


def model_from_checkpoint(state: dict, which: str = "final") -> FewShotModel:
    """Rebuild the few-shot model described by ``state["config"]`` and load the ``which`` weights.

    ``which``: "final" (the last epoch's model, as the authors test) or "best_val" (the best by
    miniImagenet val accuracy). Checkpoints without relation-module options predate them and were
    trained with running BatchNorm statistics.
    """
    if which not in TEST_CHECKPOINTS:
        raise ValueError(f"unknown test checkpoint {which!r}; choose from {sorted(TEST_CHECKPOINTS)}")
    cfg = state["config"]
    model = build_model(cfg["backbone"], cfg["head"], cfg["image_size"], cfg["width"],
                        cfg.get("relation_bn", "running"), cfg.get("relation_init", "pytorch"))
    model.load_state_dict(state[TEST_CHECKPOINTS[which]])
    return model


def evaluate_on_domain(model: FewShotModel, data_root: str | Path, domain: str, cfg: dict, n_episodes: int,
                       seed: int, cache: bool = False, n_query: int | None = None) -> tuple[float, float]:
    """Accuracy (%) ± 95% CI of ``model`` on ``n_episodes`` episodes of ``domain``'s novel split.

    ``n_query`` queries per class (default: ``cfg["n_query"]``, the training episodes').
    """
    source = ImageSource(domain_file_list(data_root, domain, "novel"), ImageTransform(cfg["image_size"], False), cache)
    sampler = EpisodeSampler(source, cfg["n_way"], cfg["n_shot"], cfg["n_query"] if n_query is None else n_query)
    generator = torch.Generator().manual_seed(seed)
    return evaluate(model, lambda: sampler.sample(generator).images, n_episodes, cfg["n_shot"], progress)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cross_domain_fewshot.eval", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt checkpoint written by the train stage")
    parser.add_argument("--data-root", default=None, help="few-shot file lists; default: the one the run used")
    parser.add_argument("--testset", default=None, choices=DOMAINS[1:], help="unseen domain; default: the run's")
    parser.add_argument("--episodes", type=positive(int), default=1000, help="test episodes (paper: 1000)")
    parser.add_argument("--test-queries", type=positive(int), default=None,
                        help="queries per class; default: the run's --test-queries (15)")
    parser.add_argument("--test-checkpoint", default=None, choices=sorted(TEST_CHECKPOINTS),
                        help="final or best_val model; default: the run's --test-checkpoint (final)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the episode sampler")
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint, fix="pass a checkpoint that the train stage wrote")
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    if "best_model" not in state:
        raise CLIError(f"{args.checkpoint} is not a trained LFT checkpoint (no best_model)")
    cfg = state["config"]
    seed_everything(args.seed)
    domain = args.testset or cfg["testset"]
    which = args.test_checkpoint or cfg.get("test_checkpoint", "final")
    n_query = args.test_queries or cfg.get("test_queries", 15)
    acc, ci95 = evaluate_on_domain(model_from_checkpoint(state, which), args.data_root or cfg["resolved_data_root"],
                                   domain, cfg, args.episodes, args.seed, n_query=n_query)
    print(f"{cfg['method']} on {domain}: {acc:.2f} ± {ci95:.2f} % ({args.episodes} episodes, "
          f"{cfg['n_way']}-way {cfg['n_shot']}-shot, {n_query} queries, {which} model)")


if __name__ == "__main__":
    run_cli(main)
