"""Cross-domain few-shot classification with learned feature-wise transformation (LFT), trained with
EvoGrad or second-order hypergradients (EvoGrad paper, Sec. 4.3; Tseng et al., ICLR 2020).

Stages (``--stage all`` runs them in order, for every method in ``--methods``):
  pretrain  backbone + linear classifier on miniImagenet's base classes (FWT off);
  train     multi-domain leave-one-out: ``--testset`` is the unseen domain, the other four are
            seen; every epoch picks a pseudo-seen and a pseudo-unseen domain among them, every
            iteration takes one episode of each (see ``cross_domain_fewshot/lft.py``); the
            baseline takes one episode per iteration, the seen domains mixed in every epoch; validation
            on miniImagenet's val split each epoch records the best model; checkpoint per epoch;
  eval      ``--test-episodes`` episodes of the unseen domain's novel split with ``--test-queries``
            queries per class, of the final model (or ``--test-checkpoint best_val``): accuracy ± 95% CI.

The defaults follow the authors' code (``ondrejbohdal/evograd``, ``CrossDomainFewShotLearning/``);
``--fwt-noise``, ``--meta-order``, ``--aux-loss``, ``--relation-bn``, ``--relation-init``,
``--test-queries``, ``--test-checkpoint``, ``--baseline-protocol``, ``--pretrain-classes``,
``--small-classes``, ``--jitter-order`` and ``--batch-sampling`` select the alternatives (see the
README). ``--encoder-checkpoint`` starts the train stage from an encoder file of the authors'
layout (their ``BaselineTrain`` save: ``{"epoch", "state": {"feature.trunk...", "classifier..."}}``)
instead of the pretrain stage's.

    python -m cross_domain_fewshot.train --quick --out results/cross_domain_fewshot
    python -m cross_domain_fewshot.train --data-root filelists --testset cub --backbone ResNet34
    torchrun --nproc_per_node 2 -m cross_domain_fewshot.train --quick   # data parallel, 2 processes

Under ``torchrun`` every rank samples the same episodes and batches (same seeds) and keeps its
part: all support images and its share of the queries of every episode (the relation head
compares each query with the whole support set), its share of every pretraining and auxiliary
batch (``--pretrain-batch``, ``--aux-batch``, ``--n-query`` stay global); gradients of θ are
averaged over ranks, the FWT hypergradient is the whole episode's; validation and test episodes
run whole on every rank; only rank 0 prints, writes results, figures and checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.distributed import (average_gradients, barrier, broadcast_buffers, check_sync_bn, is_main_process,
                                mean_over_ranks, on_every_rank, process_group, shard, sync_batchnorm, world_size)
from common.plotting import save_figure
from common.precision import Precision, add_amp_arg, backward, optimizer_step
from common.profiling import EfficiencyMeter
from common.results import (load_checkpoint, note_resume, restore_states, resume_checkpoint, results_path,
                            save_checkpoint, write_results)
from common.runtime import (CLIError, DefaultsHelpFormatter, DataError, DivergenceGuard, add_common_args, at_least,
                            finished_runs, non_negative, positive, prepare_out, progress, run_cli, seed_everything,
                            seeds_of, select_device)
from cross_domain_fewshot.data import (AUTHORS_MIN_CLASS_SIZE, BATCH_SAMPLING, DOMAINS, JITTER_ORDERS, SMALL_CLASSES,
                                       BatchSampler, EpisodeSampler, ImageSource, ImageTransform,
                                       balanced_domain_order, domain_file_list, episode_classes,
                                       write_embedded_dataset)
from cross_domain_fewshot.eval import evaluate_on_domain, model_from_checkpoint
from cross_domain_fewshot.lft import (AUX_LOSSES, FWT_NOISE, META_ORDERS, METHODS, PAPER_METHODS, LFTTrainer,
                                      aux_weight_at, evaluate, fwt_scales, resolve_meta_order, shard_queries)
from cross_domain_fewshot.models import (BLOCKS_PER_STAGE, RELATION_BN, RELATION_INIT, ResNetBackbone,
                                         backbone_state_from_authors, build_model, mlp_classifier)

EXPERIMENT = "cross_domain_fewshot"
PRETRAIN_DOMAIN = "miniImagenet"  # pretraining classes, validation domain; always seen
PRETRAIN_METHOD = "pretrain_linear"
# --out may move between a checkpoint and its resume, and the embedded data's folder with it
RESUME_MAY_CHANGE = ("resolved_data_root",)
# plausible bounds of results (beyond them: a warning in the output and in the results file)
LIMITS = {"final_loss": 1e3, "final_model_loss": 1e3, "fwt_gamma_scale": 100.0, "fwt_beta_scale": 100.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cross_domain_fewshot.train", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--stage", default="all", choices=["all", "pretrain", "train", "eval"], help="stage(s) to run")
    parser.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), choices=sorted(METHODS),
                        help="methods of the train and eval stages (lft_<estimator> for every common.hypergrad one)")
    parser.add_argument("--testset", default="cub", choices=DOMAINS[1:], help="unseen domain (leave-one-out)")
    parser.add_argument("--backbone", default="ResNet10", choices=sorted(BLOCKS_PER_STAGE), help="few-shot ResNet")
    parser.add_argument("--head", default="relationnet_softmax", choices=["relationnet_softmax", "protonet"],
                        help="metric-based classifier")
    parser.add_argument("--width", type=positive(int), default=64, help="channels of the first stage (x8 at the end)")
    parser.add_argument("--image-size", type=positive(int), default=224, help="square input side in pixels")
    parser.add_argument("--n-way", type=at_least(2), default=5,
                        help="classes per episode (>= 2: a 1-way episode is answered right by any model)")
    parser.add_argument("--n-shot", type=positive(int), default=5, help="support images per class (5 or 1)")
    parser.add_argument("--n-query", type=positive(int), default=16, help="query images per class")
    parser.add_argument("--pretrain-epochs", type=positive(int), default=400, help="passes over miniImagenet base")
    parser.add_argument("--pretrain-batch", type=positive(int), default=16, help="pretraining batch size")
    parser.add_argument("--pretrain-classes", type=positive(int), default=200,
                        help="outputs of the pretraining linear head (authors': 200, of which miniImagenet base "
                             "uses 64; at least the base classes)")
    parser.add_argument("--encoder-checkpoint", default=None, metavar="PATH",
                        help="start the train stage from this encoder instead of the pretrain stage: an authors' "
                             "encoder file (.tar, {'epoch', 'state': {'feature.trunk...'}}) or their folder of "
                             "<epoch>.tar files (the highest epoch is used); width 64")
    parser.add_argument("--epochs", type=positive(int), default=400, help="LFT training epochs")
    parser.add_argument("--episodes-per-epoch", type=positive(int), default=100, help="meta-iterations per epoch")
    parser.add_argument("--lr", type=positive(), default=1e-3, help="Adam lr of the model; EvoGrad sigma; virtual-step lr")
    parser.add_argument("--fwt-lr", type=positive(), default=1e-3, help="Adam lr of the FWT parameters")
    parser.add_argument("--fwt-weight-decay", type=non_negative(), default=1e-8, help="Adam weight decay of the FWT parameters")
    parser.add_argument("--n-candidates", type=at_least(2), default=2, help="EvoGrad candidates K (>= 2)")
    parser.add_argument("--temperature", type=positive(), default=0.05, help="EvoGrad softmax temperature tau")
    parser.add_argument("--fwt-noise", default="independent", choices=FWT_NOISE,
                        help="independent: fresh FWT noise for the model step and every EvoGrad candidate "
                             "(authors'); shared: one draw per iteration for every pass")
    parser.add_argument("--meta-order", default="auto", choices=META_ORDERS,
                        help="auto: EvoGrad takes the meta step at θ after the model step, the other methods "
                             "at θ before it (authors' two files); before / after: force one for every method")
    parser.add_argument("--aux-loss", default="mlp", choices=AUX_LOSSES,
                        help="mlp: random-init 3-layer MLP head, eval mode, weight 0.9^(20*epoch//epochs) "
                             "(authors'); pretrained_linear: the pretraining linear head, train mode, "
                             "weight 1 - epoch/epochs")
    parser.add_argument("--aux-weight", type=non_negative(), default=1.0,
                        help="scale of the auxiliary pretraining-class loss's scheduled weight (0: no auxiliary loss)")
    parser.add_argument("--aux-batch", type=positive(int), default=16, help="images per auxiliary batch")
    parser.add_argument("--relation-bn", default="batch", choices=RELATION_BN,
                        help="relation-module BatchNorm: batch statistics always (authors') or running statistics")
    parser.add_argument("--relation-init", default="fan_out", choices=RELATION_INIT,
                        help="relation-module conv init: N(0, 2/(k*k*out)) (authors') or PyTorch's default")
    parser.add_argument("--baseline-protocol", default="authors", choices=["authors", "lft"],
                        help="authors: the baseline has no auxiliary loss and its episodes mix all seen domains "
                             "in every epoch; lft: trained as the LFT methods (one pseudo-seen domain per epoch, "
                             "auxiliary loss) with FWT off")
    parser.add_argument("--small-classes", default="pad", choices=SMALL_CLASSES,
                        help="pad: a class with too few images is repeated cyclically up to 50 images "
                             "(single-domain training and val episodes) or one episode row (multi-domain "
                             "ones), as the authors' loaders; drop: such classes are left out")
    parser.add_argument("--jitter-order", default="fixed", choices=JITTER_ORDERS,
                        help="colour jitter: brightness, contrast, saturation in that order (authors') or in "
                             "random order per image")
    parser.add_argument("--batch-sampling", default="epochs", choices=BATCH_SAMPLING,
                        help="pretraining and auxiliary batches: shuffled passes without replacement "
                             "(authors') or independent draws with replacement")
    parser.add_argument("--val-episodes", type=positive(int), default=100, help="miniImagenet val episodes per epoch")
    parser.add_argument("--test-episodes", type=positive(int), default=1000, help="unseen-domain test episodes")
    parser.add_argument("--test-queries", type=positive(int), default=15, help="query images per class at test time")
    parser.add_argument("--test-checkpoint", default="final", choices=["final", "best_val"],
                        help="model tested: the last epoch's (authors') or the best by miniImagenet val accuracy")
    parser.add_argument("--no-augment", action="store_true", help="no crop/flip/jitter on training images")
    parser.add_argument("--threads", type=non_negative(int), default=0, help="torch CPU threads (0: leave torch's default)")
    add_amp_arg(parser)  # --amp none|bf16|fp16 (common.precision): pretraining and meta-training
    parser.add_argument("--sync-bn", action="store_true",
                        help="torchrun: plain BatchNorm layers use all ranks' statistics (SyncBatchNorm, CUDA only; "
                             "the FWT BatchNorm layers keep per-rank statistics)")
    return add_common_args(parser, default_seeds=(1,), default_out="results/cross_domain_fewshot")


# --quick: embedded data, 32x32 images, a narrow ResNet10, one thread, about 550 episodes in total.
QUICK = dict(width=16, image_size=32, n_query=6, pretrain_epochs=5, pretrain_batch=32, epochs=3,
             episodes_per_epoch=10, val_episodes=8, test_episodes=100, aux_batch=8, threads=1)


def parse_config(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, apply the --quick overrides to options left at their defaults, and check the data root."""
    return resolve_data(parse_flags(argv))


def parse_flags(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and apply the --quick overrides to options left at their defaults (writes nothing)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def resolve_data(args: argparse.Namespace) -> argparse.Namespace:
    """Prepare --out, write the embedded data (or check --data-root's file lists), set the threads."""
    prepare_out(args.out)
    if args.data_root is None:
        # Generated images of side 1.25x the input, so that crops and the test resize have room.
        args.resolved_data_root = str(write_embedded_dataset(Path(args.out) / "embedded_data",
                                                             image_size=max(40, round(args.image_size * 1.25))))
    elif not Path(args.data_root).is_dir():
        raise DataError(f"--data-root {args.data_root} is not a folder (expected <domain>/<split>.json inside)")
    else:
        args.resolved_data_root = args.data_root
        check_file_lists(args)
    check_pretraining(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args


def check_pretraining(args: argparse.Namespace) -> None:
    """CLIError now for an --encoder-checkpoint that cannot start this run, or a pretraining head
    smaller than the pretraining classes."""
    if args.encoder_checkpoint is not None:
        if args.stage == "pretrain":
            raise CLIError("--encoder-checkpoint replaces the pretrain stage; run --stage train, eval or all with it")
        _, classifier = read_encoder(args.encoder_checkpoint, args.backbone, args.width)
        if args.aux_loss == "pretrained_linear" and args.stage in ("all", "train") and classifier is None:
            raise CLIError(f"--encoder-checkpoint {args.encoder_checkpoint} has no classifier.weight/classifier.bias, "
                           "which --aux-loss pretrained_linear starts from; use --aux-loss mlp")
    elif args.stage in ("all", "pretrain"):
        n_base = len(domain_file_list(args.resolved_data_root, PRETRAIN_DOMAIN, "base").label_names)
        if args.pretrain_classes < n_base:
            raise CLIError(f"--pretrain-classes {args.pretrain_classes} is fewer than the {n_base} classes of "
                           f"{PRETRAIN_DOMAIN} base; pass --pretrain-classes {n_base} or more")


def encoder_file(path: str | Path) -> Path:
    """The file of --encoder-checkpoint: the path itself, or in a folder the ``<epoch>.tar`` with the
    highest epoch (as the authors' ``get_resume_file``)."""
    path = Path(path)
    if path.is_dir():
        epochs = [f for f in path.glob("*.tar") if f.stem.isdigit()]
        if not epochs:
            raise CLIError(f"--encoder-checkpoint {path} is a folder without <epoch>.tar files; "
                           "pass an encoder file or the folder that holds them")
        return max(epochs, key=lambda f: int(f.stem))
    if not path.is_file():
        raise CLIError(f"--encoder-checkpoint {path} not found; pass an authors' encoder file (<epoch>.tar) "
                       "or its folder")
    return path


def read_encoder(path: str | Path, depth: str, width: int) -> tuple[dict, dict | None]:
    """Backbone state (our names) and pretraining classifier (``weight``, ``bias``; None if absent)
    of an authors' encoder file, checked against a ``depth`` backbone of ``width``.

    Raises:
        CLIError: if the file is unreadable, not of the authors' layout, or of another backbone.
    """
    file = encoder_file(path)
    flag = f"--encoder-checkpoint {file}"
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises RuntimeError, EOFError, UnpicklingError, ...)
        reason = (str(err).strip().splitlines() or [""])[0][:100]
        raise CLIError(f"{flag} is not a readable torch file ({type(err).__name__}: {reason}); "
                       "pass an authors' encoder file") from None
    state = raw.get("state") if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not any(str(k).startswith("feature.") for k in state):
        raise CLIError(f"{flag} is not of the authors' layout (expected {{'epoch': ..., 'state': "
                       "{'feature.trunk.0.weight': ..., ...}}); pass an encoder saved by their train_baseline.py")
    try:
        ours = backbone_state_from_authors(state)
    except KeyError as err:
        raise CLIError(f"{flag}: key {err.args[0]} is outside the authors' ResNet layout; "
                       "pass an encoder saved by their train_baseline.py") from None
    expected = ResNetBackbone(depth, width).state_dict()
    missing = [k for k in expected if k not in ours and ".fwt_" not in k]
    extra = [k for k in ours if k not in expected]
    if missing or extra:
        what = f"lacks {len(missing)} tensors of a {depth}" if missing else f"has {len(extra)} tensors beyond a {depth}"
        raise CLIError(f"{flag} {what} (e.g. {(missing or extra)[0]} in our names); pass the --backbone it was "
                       "trained with")
    wrong = [k for k, v in ours.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CLIError(f"{flag}: {k} has shape {tuple(ours[k].shape)}, --backbone {depth} --width {width} expects "
                       f"{tuple(expected[k].shape)}; the authors' encoders need --width 64")
    classifier = {k[len("classifier."):]: v for k, v in state.items() if k in ("classifier.weight", "classifier.bias")}
    return ours, classifier if len(classifier) == 2 else None


def check_file_lists(args: argparse.Namespace) -> None:
    """Read every file list the chosen stages will use, before any of them runs: a missing or
    malformed list, or one with too few classes for an episode, is a DataError now rather than
    after pretraining. The test split comes first."""
    if args.stage in ("all", "eval"):
        novel = domain_file_list(args.data_root, args.testset, "novel")  # a damaged list: its own error
        try:
            episode_classes(novel, args.n_way, args.n_shot, args.test_queries)
        except DataError as err:  # too few images per class for the test episodes
            raise DataError(f"{err} (test episodes have --test-queries {args.test_queries} queries per class: "
                            "lower it)") from None
    if args.stage in ("all", "pretrain", "train"):
        domain_file_list(args.data_root, PRETRAIN_DOMAIN, "base")
    if args.stage in ("all", "train"):
        pad_to = args.n_shot + args.n_query if args.small_classes == "pad" else None  # the smallest padding used
        for domain, split in [(d, "base") for d in DOMAINS if d != args.testset] + [(PRETRAIN_DOMAIN, "val")]:
            episode_classes(domain_file_list(args.data_root, domain, split), args.n_way, args.n_shot, args.n_query,
                            pad_to)


def setting_of(cfg: dict) -> str:
    data = "embedded" if cfg["data_root"] is None else "real"
    return f"{data} unseen={cfg['testset']} {cfg['backbone']} {cfg['head']} {cfg['n_way']}-way {cfg['n_shot']}-shot"


def pretrain_setting(cfg: dict) -> str:
    return f"{'embedded' if cfg['data_root'] is None else 'real'} pretrain {cfg['backbone']}"


def sampler_for(cfg: dict, domain: str, split: str, augment: bool, multi_domain: bool = False) -> EpisodeSampler:
    """Episodes of one domain split. Under ``--small-classes pad`` small classes are padded as the
    authors' loaders do: to 50 images in a single-domain loader (``SetDataset``: the pseudo-seen
    domain, validation), to one episode row in a multi-domain one (``MultiSetDataset``: the
    pseudo-unseen domain, the baseline's mixed episodes)."""
    source = ImageSource(domain_file_list(cfg["resolved_data_root"], domain, split),
                         ImageTransform(cfg["image_size"], augment, cfg["jitter_order"]), cache=cfg["data_root"] is None)
    pad_to = None
    if cfg["small_classes"] == "pad":
        pad_to = cfg["n_shot"] + cfg["n_query"] if multi_domain else AUTHORS_MIN_CLASS_SIZE
    return EpisodeSampler(source, cfg["n_way"], cfg["n_shot"], cfg["n_query"], pad_to)


def check_test_split(cfg: dict) -> None:
    """Stop before any work if the generated data's novel split cannot give the test episodes
    (``check_file_lists`` does this for real data at parse time)."""
    source = ImageSource(domain_file_list(cfg["resolved_data_root"], cfg["testset"], "novel"),
                         ImageTransform(cfg["image_size"], False))
    try:
        EpisodeSampler(source, cfg["n_way"], cfg["n_shot"], cfg["test_queries"])
    except DataError as err:
        raise DataError(f"{err} (test episodes have --test-queries {cfg['test_queries']} queries per class: "
                        "lower it)") from None


class PretrainNet(nn.Module):
    """Backbone, global average pooling, linear classifier over the pretraining classes.

    ``n_classes`` outputs (the authors' 200, more than miniImagenet base's 64 classes), bias zero at
    the start (the authors' ``BaselineTrain``).
    """

    def __init__(self, backbone: ResNetBackbone, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_channels, n_classes)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images).mean(dim=(2, 3)))


def pretrain(cfg: dict, seed: int, device: torch.device, ckpt: Path, resume: bool) -> None:
    """Stage 1: train backbone + linear classifier on miniImagenet base; checkpoint per epoch."""
    file_list = domain_file_list(cfg["resolved_data_root"], PRETRAIN_DOMAIN, "base")
    source = ImageSource(file_list, ImageTransform(cfg["image_size"], not cfg["no_augment"], cfg["jitter_order"]),
                         cfg["data_root"] is None)
    batches = BatchSampler(source, cfg["pretrain_batch"], cfg["batch_sampling"], min_batch=world_size())
    net = PretrainNet(ResNetBackbone(cfg["backbone"], cfg["width"]), cfg["pretrain_classes"])
    net = (sync_batchnorm(net, device) if cfg["sync_bn"] else net).to(device)
    optim = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    generator, start, history = torch.Generator().manual_seed(seed), 0, []
    precision = Precision(cfg["amp"], device)
    state = resume_checkpoint(ckpt, cfg, may_change=RESUME_MAY_CHANGE) if resume else None
    if state is not None:
        restore_states(state, {"model": net, "optim": optim}, ckpt)
        precision.load_state_dict(state.get("amp_scaler", {}))  # fp16's gradient scale (none: older checkpoints)
        generator.set_state(state["generator"])
        start, history = state["epoch"], state["history"]
    steps_per_epoch = math.ceil(len(file_list.labels) / cfg["pretrain_batch"])
    meter = EfficiencyMeter(device)
    guard = DivergenceGuard(EXPERIMENT, PRETRAIN_METHOD, seed, [net], steps_done=start * steps_per_epoch)
    epochs = range(start, cfg["pretrain_epochs"])
    for epoch in progress(epochs, desc="pretrain") if is_main_process() else epochs:
        correct = total_loss = 0.0
        n_steps = 0
        # one shuffled pass (--batch-sampling epochs) or as many batches drawn with replacement
        for batch in batches.epoch(generator):
            # torchrun: every rank samples the same global batch and keeps its share
            images, labels = (shard(t).to(device) for t in batch)
            n_steps += 1
            broadcast_buffers(net)
            with guard.step(epoch + 1), meter.step(), precision.iteration():  # autocast under --amp
                logits = net(images)
                loss = F.cross_entropy(logits, labels)
                optim.zero_grad(set_to_none=True)
                backward(loss)  # scaled under --amp fp16
                average_gradients(net)
                optimizer_step(optim)
            loss, acc = mean_over_ranks(torch.stack([loss.detach(), (logits.argmax(1) == labels).float().mean()]))
            on_every_rank(lambda: guard.check(training_loss=loss), device)
            total_loss += loss.item()
            correct += acc.item()
        history.append({"loss": total_loss / n_steps, "train_acc": 100 * correct / n_steps})
        broadcast_buffers(net)
        if is_main_process():
            save_checkpoint(ckpt, {"model": net.state_dict(), "optim": optim.state_dict(), "epoch": epoch + 1,
                                   "generator": generator.get_state(), "history": history,
                                   "amp_scaler": precision.state_dict()}, cfg)
    if not is_main_process():
        return
    write_results(cfg["out"], experiment=EXPERIMENT, method=PRETRAIN_METHOD, seed=seed,
                  config={**cfg, "processes": world_size()},
                  setting=pretrain_setting(cfg), limits=LIMITS,
                  metrics={"final_loss": history[-1]["loss"], "final_train_acc": history[-1]["train_acc"],
                           "loss_curve": [h["loss"] for h in history]}, efficiency=note_resume(meter.summary(), start))


def train_method(cfg: dict, method: str, seed: int, device: torch.device, pretrain_ckpt: Path, ckpt: Path,
                 resume: bool) -> None:
    """Stage 2: LFT (or baseline) meta-training of one method; checkpoint per epoch, best model by val."""
    model = build_model(cfg["backbone"], cfg["head"], cfg["image_size"], cfg["width"], cfg["relation_bn"],
                        cfg["relation_init"])
    model = (sync_batchnorm(model, device) if cfg["sync_bn"] else model).to(device)
    if cfg["encoder_checkpoint"] is not None:  # an authors' encoder file (checked at parse time)
        backbone_state, classifier_state = read_encoder(cfg["encoder_checkpoint"], cfg["backbone"], cfg["width"])
        # strict=False as the authors' load: the FWT parameters keep their initial values
        model.backbone.load_state_dict(backbone_state, strict=False)
    else:
        if not pretrain_ckpt.is_file():
            raise CLIError(f"no pretrained backbone at {pretrain_ckpt}; run --stage pretrain (or all) first")
        pretrained = load_checkpoint(pretrain_ckpt, device)["model"]
        model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in pretrained.items()
                                        if k.startswith("backbone.")})
        classifier_state = {k[len("classifier."):]: v for k, v in pretrained.items() if k.startswith("classifier.")}
    # the authors' baseline has no auxiliary loss; every other method (and the baseline under
    # --baseline-protocol lft) has one
    authors_baseline = method == "baseline" and cfg["baseline_protocol"] == "authors"
    aux_classifier = None
    if authors_baseline:
        pass
    elif cfg["aux_loss"] == "mlp":  # random initialisation over the miniImagenet base classes (64), as in the LFT code
        n_aux_classes = len(domain_file_list(cfg["resolved_data_root"], PRETRAIN_DOMAIN, "base").label_names)
        aux_classifier = mlp_classifier(model.backbone.out_channels, n_aux_classes).to(device)
    else:  # the pretraining head, all its outputs
        aux_classifier = nn.Linear(model.backbone.out_channels, classifier_state["weight"].shape[0]).to(device)
        aux_classifier.load_state_dict(classifier_state)
    trainer = LFTTrainer(model, method, cfg["lr"], cfg["fwt_lr"], cfg["fwt_weight_decay"], cfg["n_candidates"],
                         cfg["temperature"], torch.Generator().manual_seed(seed + 1), aux_classifier,
                         fwt_noise=cfg["fwt_noise"], meta_order=cfg["meta_order"],
                         aux_mode="eval" if cfg["aux_loss"] == "mlp" else "train")
    run_cfg = {**cfg, "method": method, "resolved_meta_order": trainer.meta_order}
    data_gen = torch.Generator().manual_seed(seed)
    start, history, best_val, best_model = 0, [], -1.0, None
    precision = Precision(cfg["amp"], device)
    state = resume_checkpoint(ckpt, run_cfg, device, RESUME_MAY_CHANGE) if resume else None
    if state is not None:
        restore_states(state, {"model": model, "aux_classifier": aux_classifier, "trainer": trainer}, ckpt)
        precision.load_state_dict(state.get("amp_scaler", {}))  # fp16's gradient scale (none: older checkpoints)
        data_gen.set_state(state["data_generator"])
        start, history, best_val, best_model = state["epoch"], state["history"], state["best_val"], state["best_model"]
    seen = [d for d in DOMAINS if d != cfg["testset"]]
    augment = not cfg["no_augment"]
    # a pseudo-seen domain is a single-domain loader, a pseudo-unseen one (and the authors'
    # baseline's mix of all seen domains) a multi-domain one: they pad small classes differently
    samplers = {d: sampler_for(cfg, d, "base", augment, multi_domain=authors_baseline) for d in seen}
    unseen_samplers = {d: sampler_for(cfg, d, "base", augment, multi_domain=True) for d in seen}
    aux_source = ImageSource(domain_file_list(cfg["resolved_data_root"], PRETRAIN_DOMAIN, "base"),
                             ImageTransform(cfg["image_size"], augment, cfg["jitter_order"]), cfg["data_root"] is None)
    aux_batches = BatchSampler(aux_source, cfg["aux_batch"], cfg["batch_sampling"], min_batch=world_size())
    if state is not None and "aux_batches" in state:  # the rest of the current pass over miniImagenet base
        aux_batches.load_state_dict(state["aux_batches"])
    val_sampler = sampler_for(cfg, PRETRAIN_DOMAIN, "val", False)
    meter = EfficiencyMeter(device)
    guard = DivergenceGuard(EXPERIMENT, method, seed, [m for m in (model, aux_classifier) if m is not None],
                            steps_done=start * cfg["episodes_per_epoch"])
    epochs = range(start, cfg["epochs"])
    for epoch in progress(epochs, desc=method) if is_main_process() else epochs:
        if authors_baseline:  # every seen domain in every epoch, an equal share of the episodes, shuffled
            domains = [seen[i] for i in balanced_domain_order(len(seen), cfg["episodes_per_epoch"], data_gen)]
            episode_domains = [(d, None) for d in domains]
            pair_names = ("+".join(seen), None)
        else:
            pair = torch.randperm(len(seen), generator=data_gen)[:2].tolist()
            episode_domains = [(seen[pair[0]], seen[pair[1]])] * cfg["episodes_per_epoch"]
            pair_names = (seen[pair[0]], seen[pair[1]])
        aux_weight = aux_weight_at(epoch, cfg["epochs"], cfg["aux_loss"], cfg["aux_weight"])
        sums: dict[str, float] = {}
        for seen_domain, unseen_domain in episode_domains:
            # torchrun: the same episodes on every rank; each keeps the support and its share of the queries
            seen_ep = shard_queries(samplers[seen_domain].sample(data_gen).images, cfg["n_shot"]).to(device)
            unseen_ep = None
            if unseen_domain is not None:
                unseen_ep = shard_queries(unseen_samplers[unseen_domain].sample(data_gen).images,
                                          cfg["n_shot"]).to(device)
            use_aux = aux_classifier is not None and aux_weight > 0
            aux = tuple(shard(t).to(device) for t in aux_batches.sample(data_gen)) if use_aux else None
            with guard.step(epoch + 1), meter.step(), precision.iteration():  # autocast under --amp
                losses = trainer.step(seen_ep, unseen_ep, cfg["n_shot"], aux, aux_weight)
            on_every_rank(lambda: guard.check(**losses), device)  # rank-local buffers too
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v / cfg["episodes_per_epoch"]
        broadcast_buffers(model)
        val_acc, _ = evaluate(model, lambda: val_sampler.sample(data_gen).images.to(device), cfg["val_episodes"],
                              cfg["n_shot"])
        if val_acc > best_val:
            best_val, best_model = val_acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({**sums, "val_acc": val_acc, "pseudo_seen": pair_names[0], "pseudo_unseen": pair_names[1],
                        **fwt_scales(model)})
        if is_main_process():
            save_checkpoint(ckpt, {"model": model.state_dict(),
                                   "aux_classifier": None if aux_classifier is None else aux_classifier.state_dict(),
                                   "aux_batches": aux_batches.state_dict(),
                                   "trainer": trainer.state_dict(), "data_generator": data_gen.get_state(),
                                   "epoch": epoch + 1, "history": history, "best_val": best_val,
                                   "best_model": best_model, "efficiency": note_resume(meter.summary(), start),
                                   "amp_scaler": precision.state_dict()},
                            run_cfg)


def eval_method(cfg: dict, method: str, seed: int, device: torch.device, ckpt: Path) -> dict:
    """Stage 3: test episodes on the unseen domain; writes the method's results file."""
    if not ckpt.is_file():
        raise CLIError(f"no trained model at {ckpt}; run --stage train (or all) for {method} first")
    state = load_checkpoint(ckpt, device)
    model = model_from_checkpoint(state, cfg["test_checkpoint"]).to(device)
    acc, ci95 = evaluate_on_domain(model, cfg["resolved_data_root"], cfg["testset"], cfg, cfg["test_episodes"],
                                   seed + 2, cache=cfg["data_root"] is None, n_query=cfg["test_queries"])
    history = state["history"]
    if not is_main_process():
        return {}
    metrics = {"test_acc": acc, "test_ci95": ci95,
               "final_val_acc": history[-1]["val_acc"], "best_val_acc": state["best_val"],
               "final_model_loss": history[-1]["model_loss"], **fwt_scales(model),
               "val_acc_curve": [h["val_acc"] for h in history],
               "model_loss_curve": [h["model_loss"] for h in history],
               "fwt_gamma_scale_curve": [h["fwt_gamma_scale"] for h in history]}
    if "meta_loss" in history[-1]:
        metrics["final_meta_loss"] = history[-1]["meta_loss"]
    if "candidate_loss_spread" in history[-1]:  # mean |ℓ_max − ℓ_min| of EvoGrad's candidates over training
        metrics["mean_candidate_loss_spread"] = sum(h["candidate_loss_spread"] for h in history) / len(history)
    write_results(cfg["out"], experiment=EXPERIMENT, method=method, seed=seed,
                  config={**cfg, "method": method, "resolved_meta_order": resolve_meta_order(method, cfg["meta_order"]),
                          "processes": world_size()},
                  setting=setting_of(cfg), metrics=metrics, efficiency=state["efficiency"], limits=LIMITS)
    step_s = state["efficiency"]["meta_step_s"]
    timing = (f"{step_s:.3f} s/meta-iteration" if step_s is not None else
              "no s/meta-iteration: too few meta-iterations to time past the warm-up ones")
    print(f"{method} seed {seed}: unseen {cfg['testset']} accuracy {acc:.2f} ± {ci95:.2f} %  ({timing})")
    return metrics


def plot_curves(cfg: dict, seed: int, curves: dict[str, dict]) -> None:
    """Validation accuracy and learned FWT scale per epoch, one line per method."""
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_fwt) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    for method, metrics in curves.items():
        epochs = range(1, len(metrics["val_acc_curve"]) + 1)
        ax_acc.plot(epochs, metrics["val_acc_curve"], label=method)
        ax_fwt.plot(epochs, metrics["fwt_gamma_scale_curve"], label=method)
    ax_acc.set(xlabel="epoch", ylabel="miniImagenet val accuracy (%)")
    ax_fwt.set(xlabel="epoch", ylabel="mean softplus(theta_gamma)")
    ax_acc.legend(fontsize=7)
    fig.suptitle(setting_of(cfg), fontsize=8)
    save_figure(fig, Path(cfg["out"]) / "figures" / f"{EXPERIMENT}_{cfg['testset']}_seed{seed}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_flags(argv)
    with process_group(select_device(args.device)) as device:  # joins the process group under torchrun
        # rank 0 writes the embedded data first; a data error there stops every rank
        on_every_rank(lambda: resolve_data(args) if is_main_process() else None, device)
        if not is_main_process():
            resolve_data(args)  # the data rank 0 wrote (idempotent)
        run(args, device)


def check_data_parallel(args: argparse.Namespace, device: torch.device) -> None:
    """CLIError unless every sharded batch has an item per process and --sync-bn can run."""
    check_sync_bn(args.sync_bn, device)
    for flag, size in (("--n-query", args.n_query), ("--pretrain-batch", args.pretrain_batch),
                       ("--aux-batch", args.aux_batch)):
        if size < world_size():
            raise CLIError(f"{flag} {size} is smaller than the {world_size()} processes that share it; "
                           f"pass {flag} {world_size()} or more")


def run(args: argparse.Namespace, device: torch.device) -> None:
    """The chosen stages for every seed and method; under torchrun only rank 0 prints and writes."""
    check_data_parallel(args, device)
    cfg = {k: v for k, v in vars(args).items() if k not in ("seed", "seeds", "resume", "overwrite", "stage", "methods")}
    ckpt_dir = Path(args.out) / "checkpoints"
    def run_stage(name: str) -> bool:  # an --encoder-checkpoint stands in for the pretrain stage
        return args.stage in ("all", name) and not (name == "pretrain" and args.encoder_checkpoint is not None)
    # a stage's results file marks it finished: pretrain's its own, train's and eval's the method's
    result_of = {(method, seed): results_path(args.out, EXPERIMENT, pretrain_setting(cfg) if method == PRETRAIN_METHOD
                                              else setting_of(cfg), method, seed)
                 for seed in seeds_of(args) for method in [PRETRAIN_METHOD, *args.methods]}
    finished = finished_runs([path for (method, _), path in result_of.items()
                              if (run_stage("pretrain") if method == PRETRAIN_METHOD else args.stage != "pretrain")],
                             args.resume, args.overwrite)
    if run_stage("eval") and args.data_root is None:
        check_test_split(cfg)
    for seed in seeds_of(args):
        seed_everything(seed)
        tag = f"{args.backbone}_w{args.width}_{args.image_size}px_{'embedded' if args.data_root is None else 'real'}"
        pretrain_ckpt = ckpt_dir / f"pretrain_{tag}_seed{seed}.pt"
        if run_stage("pretrain") and result_of[PRETRAIN_METHOD, seed] not in finished:
            pretrain(cfg, seed, device, pretrain_ckpt, args.resume)
            barrier()  # rank 0's checkpoint and results file exist for every rank
        curves = {}
        for method in args.methods:
            ckpt = ckpt_dir / f"{method}_{args.testset}_{args.head}_{args.n_shot}shot_{tag}_seed{seed}.pt"
            if result_of[method, seed] in finished:
                curves[method] = json.loads(result_of[method, seed].read_text())["metrics"]
                continue
            if run_stage("train"):
                seed_everything(seed)
                train_method(cfg, method, seed, device, pretrain_ckpt, ckpt, args.resume)
                barrier()  # rank 0's last checkpoint exists for every rank's eval
            if run_stage("eval"):
                curves[method] = eval_method(cfg, method, seed, device, ckpt)
                barrier()
        if curves and is_main_process():
            plot_curves(cfg, seed, curves)


if __name__ == "__main__":
    run_cli(main)
