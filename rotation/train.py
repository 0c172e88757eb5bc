"""Meta-learn the rotation of MNIST training images (EvoGrad paper, rotation transformation).

Training images are upright; validation and test images are rotated by 30°. A rotation
transformer with one angle λ rotates each training batch before LeNet sees it; λ is learned from
the rotated validation set with a hypergradient (EvoGrad, or one unrolled SGD step through
``higher``). Every iteration: (1) one Adam step of LeNet on the transformed training batch, then
(2) one Adam step of λ on the hypergradient computed at the updated LeNet (the original code's
order). ``baseline`` trains LeNet on upright images only. By default the learned rotation fills
corners with 0 in normalised space (grey) and validation/test images are rotated by nearest
neighbour, as in the authors' notebook; ``--fill background --data-interpolation bilinear`` is our
earlier protocol (black corners, bilinear).

    python -m rotation.train --quick --out results/rotation                # all methods, 5k subset
    python -m rotation.train --data-root path/to/mnist --method evograd --seeds 1 23
    torchrun --nproc_per_node 2 -m rotation.train --quick      # data parallel: 2 processes share each batch

Under ``torchrun`` every rank keeps the same model and data order, takes its shard of each global
batch (``--batch-size`` stays the global batch), averages LeNet's gradients over ranks, and gets
the whole batch's hypergradient from ``common.hypergrad`` (``common.distributed``); only rank 0
prints, writes results, figures and checkpoints.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.distributed import (average_gradients, barrier, is_main_process, mean_over_ranks, process_group, shard,
                                world_size)
from common.evograd import functional_forward, perturbable_params
from common.hypergrad import ESTIMATORS, add_estimator_args, estimator_options, meta_backward
from common.precision import Precision, add_amp_arg, backward, optimizer_step
from common.profiling import EfficiencyMeter
from common.results import note_resume, restore_states, resume_checkpoint, results_path, save_checkpoint, write_results
from common.runtime import (CLIError, DefaultsHelpFormatter, DivergenceGuard, add_common_args, at_least, finished_runs,
                            positive, prepare_out, progress, run_cli, seed_everything, seeds_of, select_device)
from rotation.data import (FILLS, INTERPOLATIONS, RotationData, batches, cycle_batches, load_rotation_data,
                           rotate_dataset)
from rotation.model import LeNet, RotationTransformer, n_parameters

EXPERIMENT = "rotation"
METHODS = ["baseline", *ESTIMATORS]
PAPER_METHODS = ("baseline", "evograd", "second_order")
PAPER_SEEDS = (1, 23, 345, 4567, 56789)
QUICK_EPOCHS = 15


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rotation.train", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--method", "--methods", nargs="+", default=list(PAPER_METHODS), choices=METHODS,
                        help="methods to run one after another (baseline: no transformer)")
    parser.add_argument("--epochs", type=positive(int), default=None,
                        help=f"passes over the training split (default 5; {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--batch-size", type=positive(int), default=128, help="training and validation batch size")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate of LeNet")
    parser.add_argument("--meta-lr", type=positive(float), default=1e-2, help="Adam learning rate of the angle (radians)")
    parser.add_argument("--k", "--n-candidates", type=at_least(2), default=2, help="EvoGrad: number of model candidates K (>= 2)")
    parser.add_argument("--sigma", type=positive(float), default=1e-3, help="EvoGrad: perturbation scale σ")
    parser.add_argument("--temperature", type=positive(float), default=0.05, help="EvoGrad: softmax temperature τ")
    parser.add_argument("--noise", default="sign", choices=["sign", "gaussian"], help="EvoGrad: perturbation kind")
    parser.add_argument("--inner-lr", type=positive(float), default=1e-3,
                        help="second-order: lr of the one virtual SGD step (README: why its scale barely matters)")
    parser.add_argument("--inner-steps", type=positive(int), default=1, help="second-order: unrolled SGD steps T")
    parser.add_argument("--rotation-deg", type=float, default=30.0, help="rotation of validation and test images")
    parser.add_argument("--fill", choices=list(FILLS), default="zero",
                        help="corner value of the learned rotation and of the rotated-back metric: zero in "
                             "normalised space, grey (the authors'), or background: black (ours)")
    parser.add_argument("--data-interpolation", choices=INTERPOLATIONS, default="nearest",
                        help="the fixed rotation of validation/test images: nearest (the authors' RandomRotation) "
                             "or bilinear (ours)")
    parser.add_argument("--width", type=positive(int), default=1, help="LeNet channel/hidden-unit multiplier")
    parser.add_argument("--eval-batch-size", type=positive(int), default=1000, help="batch size for evaluation")
    parser.add_argument("--download", action="store_true", help="download full MNIST into --data-root first")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: torch's)")
    add_estimator_args(parser, inner_lr=1e-3)  # --window, --fd_epsilon (multistep, finite_difference)
    add_amp_arg(parser)  # --amp none|bf16|fp16 (common.precision)
    return add_common_args(parser, default_seeds=PAPER_SEEDS, default_out="results/rotation")


def setting_name(data: RotationData, quick: bool) -> str:
    """"mnist" for full MNIST, "mnist5k" for the embedded subset, "-quick" for the short quick run."""
    return ("mnist" if data.source == "mnist" else "mnist5k") + ("-quick" if quick else "")


def make_loss_fns(model: nn.Module, transformer: RotationTransformer, x: Tensor, y: Tensor,
                  val_x: Tensor, val_y: Tensor):
    """The meta-problem's losses as functions of LeNet's parameter dict.

    Returns:
        (train_loss_fn, val_loss_fn): training loss on the batch rotated by λ (depends on λ, so
        the rotation is recomputed inside for every candidate) and loss on the rotated validation batch.
    """
    def train_loss_fn(params: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_forward(model, params, transformer(x)), y)

    def val_loss_fn(params: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_forward(model, params, val_x), val_y)
    return train_loss_fn, val_loss_fn


def hypergrad_options(args: argparse.Namespace, generator: torch.Generator | None) -> dict:
    """Every estimator's options in one dict (``meta_backward`` passes each method its own)."""
    return {"n_candidates": args.k, "sigma": args.sigma, "temperature": args.temperature, "noise": args.noise,
            "generator": generator, **estimator_options(args)}


def model_step(model: nn.Module, optimizer: torch.optim.Optimizer, transformer: RotationTransformer | None,
               x: Tensor, y: Tensor) -> Tensor:
    """One Adam step of LeNet on the batch, rotated by the current angle (held fixed) if there is one."""
    if transformer is not None:
        with torch.no_grad():
            x = transformer(x)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    backward(loss)  # scaled under --amp fp16 (common.precision)
    average_gradients(model)  # data parallel: the whole batch's gradient on every rank
    optimizer_step(optimizer)
    return mean_over_ranks(loss.detach())


def meta_step(method: str, model: nn.Module, transformer: RotationTransformer, meta_optimizer: torch.optim.Optimizer,
              x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor, options: dict) -> float:
    """One Adam step of the angle on the ``method`` hypergradient; returns the validation loss."""
    meta_optimizer.zero_grad(set_to_none=True)
    train_loss_fn, val_loss_fn = make_loss_fns(model, transformer, x, y, val_x, val_y)
    try:
        val_loss = meta_backward(method, perturbable_params(model), [transformer.angle],
                                 train_loss_fn, val_loss_fn, **options)
    except ValueError as err:  # a bad option; a non-finite loss is the DivergenceGuard's to report
        if "non-finite" in str(err):
            raise
        raise CLIError(f"{method} meta step failed: {err}") from None
    meta_optimizer.step()
    return val_loss


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int, rotate_deg: float = 0.0,
             fill: float = 0.0) -> float:
    """Accuracy in percent, optionally after a bilinear rotation by ``rotate_deg`` with corners ``fill``."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size]
        if rotate_deg:
            x = rotate_dataset(x, rotate_deg, fill)
        correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum().item()
    model.train()
    return 100.0 * correct / max(1, len(labels))


def train_run(method: str, seed: int, data: RotationData, args: argparse.Namespace, device: torch.device,
              checkpoint: Path) -> tuple[dict, dict]:
    """Train one method with one seed; return (metrics, efficiency)."""
    noise_generator = seed_everything(seed)
    data_generator = torch.Generator().manual_seed(seed)
    model = LeNet(args.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    transformer = meta_optimizer = None
    if method != "baseline":
        transformer = RotationTransformer(fill=FILLS[args.fill]).to(device)
        meta_optimizer = torch.optim.Adam(transformer.parameters(), lr=args.meta_lr)
    options = hypergrad_options(args, noise_generator)
    precision = Precision(args.amp, device)
    angles_deg: list[float] = []
    train_losses: list[float] = []
    val_losses: list[float] = []
    start_epoch = 0
    # --epochs may grow on resume: constant learning rates, so the longer run equals a fresh one
    state = resume_checkpoint(checkpoint, vars(args), device, may_change=("epochs",)) if args.resume else None
    if state is not None:
        restore_states(state, {"model": model, "optimizer": optimizer, "transformer": transformer,
                               "meta_optimizer": meta_optimizer, "amp_scaler": precision}, checkpoint)
        noise_generator.set_state(state["noise_rng"])
        data_generator.set_state(state["data_rng"])
        angles_deg, train_losses, val_losses = state["angles_deg"], state["train_losses"], state["val_losses"]
        start_epoch = state["epoch"]
        if is_main_process():
            print(f"resumed {method} seed {seed} from {checkpoint} after epoch {start_epoch}")

    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)
    meter = EfficiencyMeter(device, warmup=5)
    guard = DivergenceGuard(EXPERIMENT, method, seed, [model, transformer], steps_done=len(train_losses))
    for epoch in range(start_epoch, args.epochs):
        val_stream = cycle_batches(len(val_y), args.batch_size, data_generator)
        bar = batches(len(train_y), args.batch_size, data_generator)
        if is_main_process():
            bar = progress(bar, total=math.ceil(len(train_y) / args.batch_size), desc=f"{method} s{seed} ep{epoch + 1}")
        for idx in bar:
            idx = shard(idx)  # this rank's part of the global batch (all of it in one process)
            x, y = train_x[idx], train_y[idx]
            with guard.step(epoch + 1), meter.step(), precision.iteration():  # autocast under --amp
                loss = model_step(model, optimizer, transformer, x, y)
                if transformer is not None:
                    val_idx = shard(next(val_stream))
                    val_losses.append(meta_step(method, model, transformer, meta_optimizer, x, y,
                                                val_x[val_idx], val_y[val_idx], options))
            guard.check(training_loss=loss, meta_loss=val_losses[-1] if transformer is not None else None)
            train_losses.append(loss.item())
            if transformer is not None:
                angles_deg.append(transformer.degrees())
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "noise_rng": noise_generator.get_state(), "data_rng": data_generator.get_state(),
                 "angles_deg": angles_deg, "train_losses": train_losses, "val_losses": val_losses,
                 "amp_scaler": precision.state_dict()}
        if transformer is not None:
            state.update(transformer=transformer.state_dict(), meta_optimizer=meta_optimizer.state_dict())
        if is_main_process():
            save_checkpoint(checkpoint, state, vars(args))

    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    metrics = {
        "test_acc_rotated": accuracy(model, test_x, test_y, args.eval_batch_size),
        "test_acc_rotated_back": accuracy(model, test_x, test_y, args.eval_batch_size, -data.rotation_deg,
                                          FILLS[args.fill]),
        "heldout_acc_upright": accuracy(model, data.heldout_x.to(device), data.heldout_y.to(device),
                                        args.eval_batch_size),
        "val_acc_rotated": accuracy(model, val_x, val_y, args.eval_batch_size),
        "final_train_loss": sum(train_losses[-20:]) / max(1, len(train_losses[-20:])),
        "train_loss_curve": train_losses,
    }
    if transformer is not None:
        metrics.update(angle_deg=transformer.degrees(), angles_deg=angles_deg, val_loss_curve=val_losses)
    return metrics, note_resume(meter.summary(), start_epoch)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with process_group(select_device(args.device)) as device:  # joins the process group under torchrun
        run(args, device)


def check_shardable(data: RotationData, batch_size: int) -> None:
    """CLIError unless every training and validation batch has at least one item per process."""
    for name, n in (("training", len(data.train_y)), ("validation", len(data.val_y))):
        smallest = n % batch_size or batch_size  # the last batch of a pass (the only one if n < batch_size)
        if smallest < world_size():
            raise CLIError(f"--batch-size {batch_size} gives a {name} batch of {smallest} item(s), fewer than the "
                           f"{world_size()} processes; choose another --batch-size")


def run(args: argparse.Namespace, device: torch.device) -> None:
    """Every (method, seed) run of ``args``; under torchrun only rank 0 prints and writes."""
    log = print if is_main_process() else (lambda *_: None)
    if args.quick and args.data_root is not None:
        raise CLIError("--quick runs on the embedded MNIST subset; leave out --data-root (or --quick)")
    asked_seeds = args.seed is not None or args.seeds != list(PAPER_SEEDS)
    seeds = seeds_of(args)[:1] if args.quick and not asked_seeds else seeds_of(args)  # --quick: one seed unless asked
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.download and world_size() > 1:
        raise CLIError("--download under torchrun: download once in one process first, then leave out --download")
    out = prepare_out(args.out)
    data = load_rotation_data(args.data_root, download=args.download, rotation_deg=args.rotation_deg,
                              interpolation=args.data_interpolation)
    check_shardable(data, args.batch_size)
    setting = setting_name(data, args.quick)
    finished = finished_runs([results_path(out, EXPERIMENT, setting, m, s) for m in args.method for s in seeds],
                             args.resume, args.overwrite)
    log(f"rotation: {data.source} {data.sizes()}, setting {setting}, methods {args.method}, seeds {seeds}, "
        f"{args.epochs} epochs, device {device}" + (f", {world_size()} processes" if world_size() > 1 else ""))
    for method in args.method:
        for seed in seeds:
            result_file = results_path(out, EXPERIMENT, setting, method, seed)
            if result_file in finished:
                continue
            start = time.perf_counter()
            checkpoint = out / "checkpoints" / f"{result_file.stem}.pt"
            metrics, efficiency = train_run(method, seed, data, args, device, checkpoint)
            efficiency["run_wall_s"] = time.perf_counter() - start
            config = {**vars(args), "method": method, "seed": seed, "seeds": seeds, "processes": world_size(),
                      "n_params": n_parameters(LeNet(args.width)),
                      "splits": data.sizes(), "data_source": data.source,
                      "second_order_virtual_step": f"{args.inner_steps} SGD step(s), lr {args.inner_lr}"}
            if is_main_process():
                write_results(out, experiment=EXPERIMENT, method=method, seed=seed, setting=setting,
                              config=config, metrics=metrics, efficiency=efficiency,
                              limits={"angle_deg": 360.0, "final_train_loss": 1e3})
            barrier()  # the results file exists for every rank's next --resume check
            angle = f", angle {metrics['angle_deg']:.2f}°" if "angle_deg" in metrics else ""
            step_s = "n/a" if efficiency["meta_step_s"] is None else f"{efficiency['meta_step_s']:.4f}"
            log(f"{method} seed {seed}: rotated test {metrics['test_acc_rotated']:.2f}%, rotated back "
                f"{metrics['test_acc_rotated_back']:.2f}%{angle}; {step_s} s/iter, "
                f"{efficiency['run_wall_s']:.0f} s")
    if is_main_process():
        from rotation.eval import summarise  # after training: table and angle plot of everything in --out
        summarise(out, setting)


if __name__ == "__main__":
    run_cli(main)
