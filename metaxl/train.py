"""MetaXL low-resource cross-lingual NER on XLM-R: joint training, MetaXL and MetaXL with EvoGrad.

    python -m metaxl.train --quick --out results/metaxl                  # tiny model, synthetic data
    python -m metaxl.train --data-root data/panx_dataset --targets qu    # paper setting (needs the
                                                                         # PAN-X files and xlm-roberta-base)

For each target language, seed and method: train for ``--epochs`` passes over ``--train_size``
source sentences, drawing target batches from ``--target_train_size`` target sentences; evaluate
entity F1 on the target dev and test sets after every epoch; write one results JSON (test F1 at
the best dev epoch), a checkpoint per epoch (``--resume`` continues), and a dev-F1 figure.

    torchrun --nproc_per_node 2 -m metaxl.train --quick    # data parallel: 2 processes share each batch

Under ``torchrun`` every rank draws the same global batches (same seed) and keeps its share of the
sentences of the source, target and meta batches (``--batch_size`` stays global); the token loss
is the whole batch's mean over labelled sub-tokens (``metaxl.model.token_loss``); the main model's
gradients are averaged over ranks before clipping, the RTN's hypergradient is the whole batch's;
dev and test sets are evaluated whole on every rank; only rank 0 prints, writes results, figures
and checkpoints. XLM-R has no BatchNorm (LayerNorm is per token), so there is no ``--sync-bn``.
``--fsdp`` shards XLM-R over the ranks instead of replicating it (FSDP2, ``common.fsdp``; the RTN
stays replicated); every rank then writes its shards of the checkpoint
(``torch.distributed.checkpoint``), rank 0 the rest.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from common.distributed import (barrier, is_main_process, mean_over_ranks, on_every_rank, process_group, rank,
                                rng_states_of_every_rank, shard, world_size)
from common.fsdp import check_fsdp_estimator, load_sharded_checkpoint, save_sharded_checkpoint, shard_model
from common.hypergrad import ESTIMATORS
from common.plotting import save_figure
from common.precision import Precision, add_amp_arg
from common.profiling import EfficiencyMeter
from common.results import note_resume, restore_states, resume_checkpoint, results_path, save_checkpoint, write_results
from common.runtime import (CLIError, DefaultsHelpFormatter, DivergenceGuard, add_common_args, at_least, finished_runs,
                            in_range, non_negative, positive, prepare_out, progress, run_cli, seed_everything,
                            seeds_of, select_device)
from metaxl.data import (INPUT_FORMATS, SUBSAMPLING, TARGET_BATCHES, build_vocab, cycle_batches, encode, epoch_batches,
                         input_format, load_language, loader_batches, split_batch, subsample, write_synthetic_panx)
from metaxl.model import (CANDIDATE_ENCODER, JOINT_LOSSES, METHODS, OPTIMIZERS, TINY, TINY_LAYERS,
                          RepresentationTransformation, StepConfig, build_optimizer, build_tagger, evaluate,
                          load_tokenizer, tiny_config, to_device, train_iteration, use_input_format)

PAPER_TARGETS = ("qu", "cdo", "ilo", "xmf", "mhr", "mi", "tk", "gn")
SYNTHETIC_EVAL_SIZES = {"dev": 100, "test": 300}
QUICK = {"model": TINY, "transfer_layer": TINY_LAYERS, "train_size": 300, "epochs": 3, "lr": 2e-3, "meta_lr": 1e-3,
         "bottle_size": 32, "max_seq_length": 64, "eval_max_seq_length": 64}


SYNTHETIC_MAX_SENTENCES = 20_000  # the generated pair's largest split: PAN-X's English training set


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m metaxl.train", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run")
    p.add_argument("--model", default="xlm-roberta-base", help="hub name, local directory, or 'tiny' (random, offline)")
    p.add_argument("--source", default="en", help="auxiliary (source) language")
    p.add_argument("--targets", nargs="+", default=list(PAPER_TARGETS), help="target languages, one run each")
    p.add_argument("--train_size", type=positive(int), default=5000, help="source sentences used")
    p.add_argument("--target_train_size", type=positive(int), default=100, help="target training sentences used")
    p.add_argument("--batch_size", type=positive(int), default=12, help="sentences per batch (source and target)")
    p.add_argument("--subsample", default="random", choices=SUBSAMPLING,
                   help="how --train_size / --target_train_size sentences are picked: a random draw seeded with "
                        "--data_seed (the MetaXL code) or the first ones in the file")
    p.add_argument("--data_seed", type=non_negative(int), default=42,
                   help="seed of the random subsample (same for every --seed)")
    p.add_argument("--target_split", default="half", choices=("half", "independent"),
                   help="half: one target batch per iteration, its first half in L_train and the rest as the meta "
                        "batch (the MetaXL code, --portion 2); independent: two separate full target batches")
    p.add_argument("--target_batches", default="loader", choices=TARGET_BATCHES,
                   help="loader: the target sentences reshuffled on every pass and cut into batches, the last one "
                        "short, one stream across epochs (the MetaXL code's DataIterator); wrap: every batch full, "
                        "the order wrapping around, a new stream every epoch")
    p.add_argument("--input_format", default="authors", choices=INPUT_FORMATS,
                   help="authors: [CLS]/[SEP] strings around the words (<unk> for XLM-R), pad id 0, position ids "
                        "from 0, an empty word as [OOV] (the MetaXL code); xlmr: the tokenizer's <s> ... </s>, its "
                        "pad id and XLM-R's own position ids")
    p.add_argument("--joint_loss", default="half", choices=JOINT_LOSSES,
                   help="joint_training's update: half = (L_source + L_target) / 2 without gradient clipping (the "
                        "MetaXL code); sum_clipped = L_source + L_target clipped at --max_grad_norm like the meta "
                        "methods")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                   help="main model optimiser: adam (weight decay coupled into the gradient, the MetaXL code) "
                        "or adamw (decoupled)")
    p.add_argument("--lr", type=positive(), default=3e-5, help="main model learning rate")
    p.add_argument("--warmup_ratio", type=in_range(0, 1, high_open=True), default=0.1,
                   help="share of steps with linear lr warm-up, in [0, 1)")
    p.add_argument("--weight_decay", type=non_negative(), default=5e-4, help="weight decay of the main model")
    p.add_argument("--meta_lr", type=positive(), default=1e-6, help="RTN learning rate (Adam)")
    p.add_argument("--meta_weight_decay", type=non_negative(), default=5e-4, help="RTN weight decay (Adam, coupled)")
    p.add_argument("--meta_schedule", default="warmup_linear", choices=("warmup_linear", "constant"),
                   help="RTN lr schedule: the main model's warm-up and linear decay (the MetaXL code) or constant")
    p.add_argument("--epochs", type=positive(int), default=20, help="passes over the source sentences")
    p.add_argument("--max_seq_length", type=positive(int), default=200, help="sub-tokens per training sentence")
    p.add_argument("--eval_max_seq_length", type=positive(int), default=512, help="sub-tokens per eval sentence")
    p.add_argument("--eval_batch_size", type=positive(int), default=32, help="sentences per evaluation batch")
    p.add_argument("--bottle_size", type=positive(int), default=384, help="RTN bottleneck width")
    p.add_argument("--transfer_layer", type=non_negative(int), default=12,
                   help="RTN acts on hidden states after this layer (0 = embeddings; tiny has 4 layers)")
    p.add_argument("--max_grad_norm", type=positive(), default=10.0, help="gradient clipping of the main model")
    p.add_argument("--metaxl_estimator", default="second_order",
                   choices=sorted(k for k in ESTIMATORS if not k.startswith("evograd")),
                   help="hypergradient of 'metaxl' (virtual step of the whole model)")
    p.add_argument("--evograd_estimator", default="evograd", choices=sorted(k for k in ESTIMATORS if k.startswith("evograd")),
                   help="EvoGrad variant of 'metaxl_evograd' (head only)")
    p.add_argument("--n_candidates", type=at_least(2), default=2, help="EvoGrad candidates K (>= 2)")
    p.add_argument("--sigma", type=positive(), default=1e-3, help="EvoGrad perturbation scale")
    p.add_argument("--temperature", type=positive(), default=0.05, help="EvoGrad softmax temperature")
    p.add_argument("--candidate_encoder", default="per_candidate", choices=CANDIDATE_ENCODER,
                   help="metaxl_evograd: rerun the encoder for every candidate (own dropout mask, the EvoGrad code) "
                        "or run it once and share its features between the K heads")
    p.add_argument("--no_figures", action="store_true", help="skip the dev-F1 figures")
    p.add_argument("--fsdp", action="store_true",
                   help="torchrun: shard XLM-R's parameters over the processes (FSDP2, one unit per transformer layer "
                        "and the root; the RTN stays replicated; common.fsdp); metaxl with --metaxl_estimator "
                        "finite_difference or sama, metaxl_evograd with --candidate_encoder per_candidate, "
                        "joint_training; sharded checkpoints (torch.distributed.checkpoint)")
    add_common_args(p, default_seeds=(1,), default_out="results/metaxl")
    add_amp_arg(p)  # --amp none|bf16|fp16 (common.precision)
    args = p.parse_args(argv)
    if args.quick:  # quick values become defaults, so flags given explicitly still win
        p.set_defaults(**QUICK, targets=[args.targets[0]])
        args = p.parse_args(argv)
    if args.evograd_estimator == "evograd_batched":
        raise CLIError("--evograd_estimator evograd_batched cannot run MetaXL: it evaluates the K candidates in "
                       "one torch.func.vmap call, where the encoder's dropout cannot draw its masks; "
                       "pass evograd or evograd_low_memory")
    if args.data_root is None:  # the embedded generated pair stands in for PAN-X, not for a larger corpus
        for flag, size in (("--train_size", args.train_size), ("--target_train_size", args.target_train_size)):
            if size > SYNTHETIC_MAX_SENTENCES:
                raise CLIError(f"{flag} {size} is more than the embedded generated data is meant for "
                               f"({SYNTHETIC_MAX_SENTENCES} sentences, PAN-X's English training split); pass "
                               f"{flag} {SYNTHETIC_MAX_SENTENCES} or less, or real data with --data-root")
    if args.target_split == "half" and args.batch_size < 2:
        raise CLIError(f"--target_split half needs --batch_size >= 2 (got {args.batch_size}); "
                       "use --target_split independent for batches of one sentence")
    return args


def load_data(args: argparse.Namespace, target: str, scratch: Path) -> dict:
    """Source train, target train/dev/test sentences (PAN-X files, or the embedded synthetic pair)."""
    root = args.data_root
    if root is None:
        sizes = {args.source: {"train": args.train_size},
                 target: {"train": args.target_train_size, **SYNTHETIC_EVAL_SIZES}}
        root = write_synthetic_panx(scratch / target, args.source, target, sizes)
    source = load_language(root, args.source, ("train",))
    target_splits = load_language(root, target)
    for flag, lang, asked, have in (("--train_size", args.source, args.train_size, len(source["train"])),
                                    ("--target_train_size", target, args.target_train_size,
                                     len(target_splits["train"]))):
        if asked > have:
            raise CLIError(f"{flag} {asked} is larger than the {have} training sentences of {lang} in "
                           f"{args.data_root}; pass {flag} {have} or less")
    how, seed = getattr(args, "subsample", "first"), getattr(args, "data_seed", 42)  # older checkpoints: first
    return {"lang": target, "source": subsample(source["train"], args.train_size, how, seed),
            "target": subsample(target_splits["train"], args.target_train_size, how, seed),
            "dev": target_splits["dev"], "test": target_splits["test"]}


def lr_schedule(total_steps: int, warmup_ratio: float):
    """Linear warm-up to the full lr over the first steps (never 0), then linear decay to 0."""
    warmup = max(1, int(warmup_ratio * total_steps))
    return lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))


def build_optimizers(args: argparse.Namespace, model: torch.nn.Module, rtn: torch.nn.Module | None, total_steps: int):
    """Main optimiser and schedule; RTN optimiser and schedule (None without an RTN).

    Defaults as in the MetaXL/EvoGrad code (``ondrejbohdal/evograd``,
    ``CrossLingualLearningMetaXL/mtrain.py`` lines 910-937): both are Adam with weight decay 5e-4
    coupled into the gradient, and both learning rates follow the same linear warm-up and decay.
    """
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    schedule = lr_schedule(total_steps, args.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if rtn is None:
        return optimizer, scheduler, None, None
    meta_optimizer = build_optimizer("adam", rtn.parameters(), args.meta_lr, args.meta_weight_decay)
    meta_scheduler = torch.optim.lr_scheduler.LambdaLR(
        meta_optimizer, schedule if args.meta_schedule == "warmup_linear" else lambda step: 1.0)
    return optimizer, scheduler, meta_optimizer, meta_scheduler


def target_batches(targets, split: str, meta: bool) -> tuple[dict, dict | None]:
    """The target part of L_train and the meta batch for one iteration, from the target batch stream.

    ``half`` (the MetaXL code, ``--portion 2``): one batch; meta methods put its first
    ⌊n/2⌋ sentences in L_train (virtual step and main update) and the rest in the meta loss, joint
    training uses all of it. ``independent``: L_train's part and the meta batch are two whole
    batches.
    """
    batch = next(targets)
    if not meta:
        return batch, None
    if split == "half":
        if batch["input_ids"].shape[0] < 2:  # a short batch of one sentence: the MetaXL code skips the iteration
            return None, None
        return split_batch(batch, batch["input_ids"].shape[0] // 2)
    return batch, next(targets)


def run_method(args, method: str, seed: int, setting: str, data: dict, device: torch.device) -> dict:
    """Train one method with one seed; returns the results record's metrics and efficiency."""
    generator = seed_everything(seed)
    vocab = build_vocab(data["source"] + data["target"]) if args.model == TINY else None
    tokenizer = load_tokenizer(args.model, vocab)
    fmt = input_format(tokenizer, args.input_format)
    model_spec = tiny_config(len(vocab), max(args.max_seq_length, args.eval_max_seq_length)) if vocab else args.model
    model = build_tagger(model_spec).to(device).train()
    use_input_format(model, fmt)
    if not 0 <= args.transfer_layer <= model.config.num_hidden_layers:
        raise CLIError(f"--transfer_layer must be in 0..{model.config.num_hidden_layers} for {args.model}, "
                       f"got {args.transfer_layer}")
    rtn = (RepresentationTransformation(model.config.hidden_size, args.bottle_size).to(device)
           if method != "joint_training" else None)
    if args.fsdp:  # before the optimiser is made: it holds the shards
        shard_model(model, list(model.roberta.encoder.layer))
    source_items = encode(tokenizer, data["source"], args.max_seq_length, fmt)
    target_items = encode(tokenizer, data["target"], args.max_seq_length, fmt)
    steps_per_epoch = math.ceil(len(source_items) / args.batch_size)
    optimizer, scheduler, meta_optimizer, meta_scheduler = build_optimizers(args, model, rtn,
                                                                            args.epochs * steps_per_epoch)
    cfg = StepConfig(args.transfer_layer, args.max_grad_norm, args.metaxl_estimator, args.evograd_estimator,
                     args.n_candidates, args.sigma, args.temperature, args.candidate_encoder, args.joint_loss)

    ckpt_path = Path(args.out) / "checkpoints" / results_path("", "metaxl", setting, method, seed).with_suffix(".pt").name
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rtn": rtn,
                "meta_optimizer": meta_optimizer, "meta_scheduler": meta_scheduler}
    history, start_epoch = [], 0
    precision = Precision(args.amp, device)
    if not args.resume:
        ckpt = None
    elif args.fsdp:  # every rank reads its own shards of XLM-R and its optimiser
        ckpt = load_sharded_checkpoint(ckpt_path, run_config(args), model, optimizer)
    else:
        ckpt = resume_checkpoint(ckpt_path, run_config(args), device)
    if ckpt is not None:
        restore_states(ckpt, {**stateful, **({"model": None, "optimizer": None} if args.fsdp else {})}, ckpt_path)
        precision.load_state_dict(ckpt.get("amp_scaler", {}))  # fp16's gradient scale (none: older checkpoints)
        generator.set_state(ckpt["generator"])
        # this rank's own state (checkpoints written before every rank's was kept: rank 0's)
        torch.set_rng_state(ckpt.get("torch_rng_per_rank", [ckpt["torch_rng"]] * world_size())[rank()])
        if device.type == "cuda" and "cuda_rng_per_rank" in ckpt:  # (absent: written on a CPU or before it was kept)
            torch.cuda.set_rng_state(ckpt["cuda_rng_per_rank"][rank()])
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        log(f"resumed {method} seed {seed} from {ckpt_path} after epoch {start_epoch}")

    meter = EfficiencyMeter(device, warmup=2)
    guard = DivergenceGuard("metaxl", method, seed, [model, rtn], steps_done=start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, args.epochs):
        order = torch.Generator().manual_seed(seed * 1000 + epoch)  # data order depends only on (seed, epoch)
        if args.target_batches == "loader":  # one stream over all epochs, resumed where the last epoch left it
            per_step = 2 if rtn is not None and args.target_split == "independent" else 1
            targets = loader_batches(target_items, args.batch_size, seed, fmt, start=epoch * steps_per_epoch * per_step)
        else:
            targets = cycle_batches(target_items, args.batch_size, order, fmt)
        losses = []
        source_stream = epoch_batches(source_items, args.batch_size, order, fmt)
        if is_main_process():
            source_stream = progress(source_stream, total=steps_per_epoch, desc=f"{method} s{seed} ep{epoch + 1}")
        for step, source_batch in enumerate(source_stream):
            target_batch, meta_batch = target_batches(targets, args.target_split, rtn is not None)
            if target_batch is None:
                continue
            with guard.step(epoch + 1), meter.step(), precision.iteration():  # autocast under --amp
                out = train_iteration(method, model, rtn, optimizer, scheduler, meta_optimizer,
                                      shard_batch(source_batch, device), shard_batch(target_batch, device),
                                      shard_batch(meta_batch, device) if meta_batch is not None else None, cfg,
                                      generator, meta_scheduler)
            if world_size() > 1:  # the ranks' mean: every rank's guard sees the same number
                out["train_loss"] = mean_over_ranks(torch.tensor(out["train_loss"], device=device)).item()
            on_every_rank(lambda: guard.check(training_loss=out["train_loss"],
                                              meta_loss=out["meta_loss"] if rtn is not None else None), device)
            losses.append(out["train_loss"])
        dev = evaluate(model, tokenizer, data["dev"], args.eval_max_seq_length, args.eval_batch_size, device, fmt)
        test = evaluate(model, tokenizer, data["test"], args.eval_max_seq_length, args.eval_batch_size, device, fmt)
        history.append({"epoch": epoch + 1, "train_loss": statistics.fmean(losses), "dev_f1": dev["f1"],
                        "test_f1": test["f1"], "test_precision": test["precision"], "test_recall": test["recall"]})
        log(f"{setting} {method} seed {seed} epoch {epoch + 1}: loss {history[-1]['train_loss']:.4f} "
            f"dev F1 {dev['f1']:.2f} test F1 {test['f1']:.2f}")
        replicated = {
            **{name: obj.state_dict() if obj is not None else None for name, obj in stateful.items()
               if not (args.fsdp and name in ("model", "optimizer"))},
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "torch_rng_per_rank": rng_states_of_every_rank(), "history": history,
            # on a GPU dropout draws from the CUDA generator: every rank's too
            **({"cuda_rng_per_rank": rng_states_of_every_rank(torch.cuda.get_rng_state)} if device.type == "cuda"
               else {}),
            "amp_scaler": precision.state_dict(), "epoch": epoch + 1, "vocab": vocab,
            "model_config": model.config.to_dict(), "method": method, "seed": seed, "setting": setting,
            "target": data["lang"]}
        if args.fsdp:  # every rank writes its shards of XLM-R and its optimiser (collective)
            save_sharded_checkpoint(ckpt_path, model, optimizer, replicated, run_config(args), tag=f"epoch{epoch + 1}")
        elif is_main_process():
            save_checkpoint(ckpt_path, replicated, run_config(args))

    best = max(history, key=lambda h: h["dev_f1"])
    metrics = {"test_f1": best["test_f1"], "dev_f1": best["dev_f1"], "best_epoch": best["epoch"],
               "test_precision": best["test_precision"], "test_recall": best["test_recall"],
               "test_f1_last": history[-1]["test_f1"], "history": history}
    return {"metrics": metrics, "efficiency": note_resume(meter.summary(), start_epoch)}


def run_config(args: argparse.Namespace) -> dict:
    """The flags, ``fsdp`` left out unless given (checkpoints written before the flag existed still resume)."""
    return {k: v for k, v in vars(args).items() if k != "fsdp" or v}


def check_fsdp_args(args: argparse.Namespace) -> None:
    """CLIError unless ``--fsdp`` can run: under torchrun, every method with a sharded meta step."""
    if not args.fsdp:
        return
    estimators = {"metaxl": ("--metaxl_estimator", args.metaxl_estimator),
                  "metaxl_evograd": ("--evograd_estimator", args.evograd_estimator)}
    for method in args.methods:
        if method in estimators:
            flag, name = estimators[method]
            try:
                check_fsdp_estimator(name)
            except ValueError as err:
                raise CLIError(f"--fsdp: {method} with {flag} {name}: {err}") from None
    if "metaxl_evograd" in args.methods and args.candidate_encoder != "per_candidate":
        raise CLIError("--fsdp runs metaxl_evograd's encoder for every candidate: leave out --candidate_encoder "
                       f"{args.candidate_encoder} (a sharded encoder's features cannot be shared between heads)")
    if world_size() < 2:
        raise CLIError("--fsdp shards the model over processes: run under torchrun with --nproc_per_node 2 or more")


def log(message: str) -> None:
    """A progress line on stdout, from rank 0 only under torchrun."""
    if is_main_process():
        print(message, flush=True)


def shard_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's rows of a collated batch, on ``device`` (the whole batch without a process group)."""
    return to_device({key: shard(value) for key, value in batch.items()}, device)


def check_shardable(args: argparse.Namespace) -> None:
    """CLIError unless every source, target and meta batch has at least one sentence per process (under torchrun)."""
    if world_size() == 1:
        return
    source = (min(args.batch_size, args.train_size), args.train_size % args.batch_size or args.batch_size)
    targets = {min(args.batch_size, args.target_train_size)}
    if args.target_batches == "loader" and args.target_train_size % args.batch_size:
        targets.add(args.target_train_size % args.batch_size)  # the short batch of every pass
    halves = [h for t in targets for h in ((t // 2, t - t // 2) if args.target_split == "half" else (t,))]
    smallest = min(*source, *halves)
    if smallest < world_size():
        raise CLIError(f"--batch_size {args.batch_size} with --train_size {args.train_size}, --target_train_size "
                       f"{args.target_train_size} and --target_split {args.target_split} gives a batch of {smallest} "
                       f"sentence(s), fewer than the {world_size()} processes; choose another --batch_size")


def plot_dev_f1(records: dict[str, dict], stem: Path) -> None:
    """Dev F1 per epoch of each method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rec in records.items():
        hist = rec["metrics"]["history"]
        ax.plot([h["epoch"] for h in hist], [h["dev_f1"] for h in hist], marker="o", label=method)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("target dev F1 (%)")
    ax.legend()
    save_figure(fig, stem)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with process_group(select_device(args.device)) as device:  # joins the process group under torchrun
        run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> None:
    """Every (target, seed, method) run; under torchrun only rank 0 prints and writes."""
    check_fsdp_args(args)
    check_shardable(args)
    out = prepare_out(args.out)
    kind = "synthetic" if args.data_root is None else "panx"
    model_name = Path(args.model).name if args.model != TINY else TINY
    setting_of = {target: f"{kind}-{args.source}-{target}-{model_name}" for target in args.targets}
    finished = finished_runs([results_path(out, "metaxl", setting_of[t], m, s) for t in args.targets
                              for s in seeds_of(args) for m in args.methods], args.resume, args.overwrite)
    with tempfile.TemporaryDirectory(prefix="metaxl_synthetic_") as scratch:
        todo_of = {target: [(s, m) for s in seeds_of(args) for m in args.methods
                            if results_path(out, "metaxl", setting_of[target], m, s) not in finished]
                   for target in args.targets}
        # every target's data is read (and checked) before the first one trains
        data_by_target = {target: load_data(args, target, Path(scratch)) for target in args.targets if todo_of[target]}
        for target, data in data_by_target.items():
            setting, todo = setting_of[target], todo_of[target]
            for seed in seeds_of(args):
                records = {}
                for method in (m for s, m in todo if s == seed):
                    records[method] = run_method(args, method, seed, setting, data, device)
                    config = {**run_config(args), "method": method, "target": target,
                              "n_source_sentences": len(data["source"]), "n_target_sentences": len(data["target"])}
                    if is_main_process():
                        path = write_results(args.out, experiment="metaxl", method=method, seed=seed,
                                             setting=setting, config={**config, "processes": world_size()},
                                             **records[method])
                        log(f"wrote {path}")
                    barrier()  # the results file exists for every rank's next --resume check
                if records and not args.no_figures and is_main_process():
                    plot_dev_f1(records, Path(args.out) / f"metaxl_{setting}_seed{seed}_dev_f1")


if __name__ == "__main__":
    run_cli(main)
