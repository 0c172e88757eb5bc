"""Meta-Weight-Net on noisy MNIST as a problem of the hypergradient study (``python -m common.hypergrad_study``).

λ are the VNet parameters (a hyperparameter acting on the loss: per-example weights). θ is a
ResNet-8 trained briefly on the 40%-uniform-noise embedded MNIST subset (a fixed checkpoint,
trained once and cached); VNet is freshly initialised. Each instance is one noisy training batch
and one clean meta batch; its reference hypergradient is a long unroll of SGD steps on that batch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.evograd import perturbable_params
from common.hypergrad_study import ProblemInstance, register_problem, unrolled_reference
from common.results import load_checkpoint, save_checkpoint
from label_noise_mwn.data import load_dataset, make_noisy_split, normalize_batch
from label_noise_mwn.models import CifarResNet, VNet
from label_noise_mwn.mwn import actual_step, make_optimizers, mwn_loss_fns

INNER_LR = 0.1         # η of every unrolled SGD step in the study (the MWN base learning rate)
REFERENCE_STEPS = 40   # T of the reference unroll (60 steps keep ~4 GB of graphs alive)
CHECKPOINT_STEPS = 80  # SGD steps of the base ResNet-8 before the study (about 2 epochs of the subset)
BATCH = 50
DEPTH = 8
NOISE = ("unif", 0.4)
NUM_META = 200


def pretrained_resnet(data, split, seed: int, device: torch.device, cache_dir: Path) -> CifarResNet:
    """ResNet-8 after ``CHECKPOINT_STEPS`` plain (baseline) SGD steps on noisy batches, cached."""
    path = cache_dir / f"mwn_resnet{DEPTH}_{data.source}_seed{seed}.pt"
    torch.manual_seed(seed)
    model = CifarResNet(data.num_classes, DEPTH, 1, data.train_images.shape[1]).to(device)
    if path.is_file():
        model.load_state_dict(load_checkpoint(path, map_location=device)["model"])
        return model
    optimizer, _ = make_optimizers(model, VNet(), 0.1, 0.9, True, 5e-4, 1e-3, 0.9, 5e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(CHECKPOINT_STEPS):
        idx = torch.randint(0, len(split.train_index), (100,), generator=gen)
        x = normalize_batch(data.train_images[split.train_index[idx]], data.mean, data.std).to(device)
        actual_step(model, None, optimizer, x, split.train_labels[idx].to(device))
    save_checkpoint(path, {"model": model.state_dict()}, {"steps": CHECKPOINT_STEPS, "lr": 0.1, "batch": 100})
    return model


@register_problem("mwn_mnist", inner_lr=INNER_LR, hyper_kind="loss", instances=2,
                  unroll_steps=(5, 20), multistep=(20, (2, 5, 20)), max_draws=8,
                  reference=f"{REFERENCE_STEPS}-step SGD unroll (η = {INNER_LR}) from a ResNet-{DEPTH} checkpoint "
                            f"({CHECKPOINT_STEPS} SGD steps on 40% uniform label noise, embedded MNIST subset)")
def build_mwn(n_instances: int, seed: int, device: torch.device, quick: bool, cache_dir: Path) -> list[ProblemInstance]:
    """``n_instances`` (noisy batch, clean meta batch) pairs of ``BATCH`` images at the checkpoint."""
    data = load_dataset("mnist", None)
    split = make_noisy_split(data.train_labels, data.num_classes, NUM_META, *NOISE, seed, meta_seed=None)  # disjoint
    model = pretrained_resnet(data, split, seed, device, cache_dir)
    torch.manual_seed(seed)
    vnet = VNet().to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    steps = 10 if quick else REFERENCE_STEPS
    instances = []
    for _ in range(n_instances):
        idx = torch.randperm(len(split.train_index), generator=gen)[:BATCH]
        meta_idx = split.meta_index[torch.randperm(NUM_META, generator=gen)[:BATCH]]
        x = normalize_batch(data.train_images[split.train_index[idx]], data.mean, data.std).to(device)
        meta_x = normalize_batch(data.train_images[meta_idx], data.mean, data.std).to(device)
        train_fn, val_fn = mwn_loss_fns(model, vnet, x, split.train_labels[idx].to(device), meta_x,
                                        data.train_labels[meta_idx].to(device))
        params, hyperparams = perturbable_params(model), list(vnet.parameters())
        reference = unrolled_reference((params, hyperparams, train_fn, val_fn), INNER_LR, steps)
        instances.append(ProblemInstance(params, hyperparams, train_fn, val_fn, reference))
    return instances
