"""Evaluate a saved MWN checkpoint: test accuracy of the base model, and the learned weighting curve.

    python -m label_noise_mwn.eval results/label_noise_mwn/checkpoints/<run>.pt [--data-root DIR]

Rebuilds the model from the configuration stored in the checkpoint, reads the same dataset
(``--data-root`` overrides the stored one), prints the test accuracy and VNet's weight v(ℓ) at a
few loss values (MWN's learned curve: low weight for high-loss, likely mislabelled, examples) next
to the curve of the run's initial VNet (rebuilt from the run's seed) and the relative change
‖λ − λ_init‖ / ‖λ_init‖ of VNet's parameters, and writes them to ``<checkpoint>.eval.json``.
``headline_figure`` draws the README's figure (test accuracy per epoch) from results files.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from common.plotting import plt, save_figure
from common.results import atomic_write_json, load_checkpoint
from common.runtime import CLIError, DefaultsHelpFormatter, run_cli, select_device
from label_noise_mwn.data import load_dataset, normalize_batch
from label_noise_mwn.models import VNet
from label_noise_mwn.mwn import accuracy, init_models

LOSS_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
CONFIG_KEYS = {"dataset", "data_root", "seed", "depth", "width", "base_channels", "vnet_hidden", "method", "setting"}
METHOD_ORDER = ("baseline", "mwn_second_order", "mwn_evograd")


def draw_test_acc(ax: "plt.Axes", records: list[dict]) -> None:
    """Test accuracy against epoch on ``ax``, one line per (method, seed), one colour per method."""
    methods = sorted({r["method"] for r in records},
                     key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    for colour, method in enumerate(methods):
        runs = sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"])
        label = f"{method} (seed{'s' if len(runs) > 1 else ''} {', '.join(str(r['seed']) for r in runs)})"
        for i, r in enumerate(runs):
            acc = r["metrics"]["test_acc_per_epoch"]
            epochs = r["metrics"].get("test_epoch_per_epoch") or range(1, len(acc) + 1)
            ax.plot(epochs, acc, color=f"C{colour}", alpha=0.8, marker=".", label=label if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    # below the axes: the curves fill the whole panel
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(methods), 2), frameon=False)


def headline_figure(records: list[dict], stem: Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Test accuracy against epoch of every run in ``records``, one panel per setting; at ``stem`` in ``formats``."""
    settings = sorted({r["setting"] for r in records})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 3.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        draw_test_acc(ax, [r for r in records if r["setting"] == setting])
        ax.set_title(f"label_noise_mwn: {setting}")
    return save_figure(fig, stem, formats)


def evaluate(checkpoint: str | Path, data_root: str | None = None, device: str = "auto") -> dict:
    """Test accuracy and VNet weights of one checkpoint written by ``label_noise_mwn.train``."""
    fix = "pass a checkpoint that python -m label_noise_mwn.train wrote (in <out>/checkpoints/)"
    try:
        state = load_checkpoint(checkpoint, fix=fix)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is a user-facing error here
        raise CLIError(f"cannot read checkpoint {checkpoint}: {err}") from None
    config = state.get("config")
    missing = sorted(CONFIG_KEYS - set(config)) if isinstance(config, dict) else None
    if "model" not in state or "vnet" not in state or missing is None or missing:
        what = "no config" if missing is None else f"no {missing} in its config" if missing else "no VNet"
        raise CLIError(f"{checkpoint} is not a label_noise_mwn checkpoint ({what}; another experiment's?): {fix}")
    dev = select_device(device)
    data = load_dataset(config["dataset"], data_root if data_root is not None else config["data_root"])
    # the run's models as initialised from its seed: the classifier gets the saved weights, VNet is
    # kept as the reference for how far training moved it
    model, vnet_init = init_models(config["seed"], data.num_classes, data.train_images.shape[1], config["depth"],
                                   config["width"], config["base_channels"], config["vnet_hidden"])
    model, vnet_init = model.to(dev), vnet_init.to(dev)
    model.load_state_dict(state["model"])
    vnet = VNet(config["vnet_hidden"]).to(dev)
    vnet.load_state_dict(state["vnet"])
    acc = accuracy(model, data.test_images, data.test_labels,
                   lambda imgs: normalize_batch(imgs, data.mean, data.std).to(dev))
    grid = torch.tensor(LOSS_GRID, device=dev).reshape(-1, 1)
    with torch.no_grad():
        curve, curve_init = (v(grid).reshape(-1).tolist() for v in (vnet, vnet_init))
        final, init = (torch.cat([p.flatten() for p in v.parameters()]) for v in (vnet, vnet_init))
        change = ((final - init).norm() / init.norm()).item()
    return {"checkpoint": str(checkpoint), "method": config["method"], "seed": config["seed"],
            "setting": config["setting"], "epoch": state["epoch"], "test_acc": acc,
            "vnet_weight_at_loss": dict(zip(map(str, LOSS_GRID), curve)),
            "vnet_weight_at_loss_init": dict(zip(map(str, LOSS_GRID), curve_init)),
            "vnet_relative_change": change}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m label_noise_mwn.eval", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a .pt file from <out>/checkpoints/")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the one used for training)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    args = parser.parse_args(argv)
    result = evaluate(args.checkpoint, args.data_root, args.device)
    atomic_write_json(Path(args.checkpoint).with_suffix(".eval.json"), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_cli(main)
