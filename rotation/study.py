"""Rotation LeNet as a problem of the hypergradient study (``python -m common.hypergrad_study``).

λ is the rotation angle applied to the training images (a hyperparameter acting on the input).
θ is a LeNet trained briefly on upright images (a fixed checkpoint, trained once and cached);
each instance is one training batch, one rotated validation batch and one angle, and its
reference hypergradient is a long unroll of SGD steps on that batch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.evograd import perturbable_params
from common.hypergrad_study import ProblemInstance, register_problem, unrolled_reference
from common.results import load_checkpoint, save_checkpoint
from rotation.data import BACKGROUND, batches, load_rotation_data
from rotation.model import LeNet, RotationTransformer
from rotation.train import make_loss_fns, model_step

INNER_LR = 0.01         # η of every unrolled SGD step in the study (0.1 gives chaotic long unrolls)
REFERENCE_STEPS = 100   # T of the reference unroll
CHECKPOINT_STEPS = 100  # Adam steps of the base LeNet before the study (about 3 epochs of the 5k subset)
BATCH = 128
ANGLES_DEG = (0.0, 10.0, 20.0, 45.0)  # λ of the instances; validation images are rotated by 30°


def pretrained_lenet(data, seed: int, device: torch.device, cache_dir: Path) -> LeNet:
    """LeNet after ``CHECKPOINT_STEPS`` Adam steps on upright training batches, cached in ``cache_dir``."""
    path = cache_dir / f"rotation_lenet_{data.source}_seed{seed}.pt"
    model = LeNet().to(device)
    if path.is_file():
        model.load_state_dict(load_checkpoint(path, map_location=device)["model"])
        return model
    torch.manual_seed(seed)
    model = LeNet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    while steps < CHECKPOINT_STEPS:
        for idx in batches(len(data.train_y), BATCH, gen, drop_last=True):
            model_step(model, optimizer, None, data.train_x[idx].to(device), data.train_y[idx].to(device))
            steps += 1
            if steps == CHECKPOINT_STEPS:
                break
    save_checkpoint(path, {"model": model.state_dict()}, {"steps": CHECKPOINT_STEPS, "lr": 1e-3, "batch": BATCH})
    return model


@register_problem("rotation", inner_lr=INNER_LR, hyper_kind="input", evograd_method="evograd_low_memory",
                  instances=len(ANGLES_DEG), unroll_steps=(5, 20, 50), multistep=(20, (2, 5, 20)), max_draws=16,
                  reference=f"{REFERENCE_STEPS}-step SGD unroll (η = {INNER_LR}) from a LeNet checkpoint "
                            f"({CHECKPOINT_STEPS} Adam steps, embedded MNIST subset)")
def build_rotation(n_instances: int, seed: int, device: torch.device, quick: bool,
                   cache_dir: Path) -> list[ProblemInstance]:
    """One instance per angle in ``ANGLES_DEG``, each with its own training and validation batch."""
    data = load_rotation_data(None, interpolation="bilinear")  # fixed instances: bilinear, black corners
    model = pretrained_lenet(data, seed, device, cache_dir)
    gen = torch.Generator().manual_seed(seed + 1)
    steps = 20 if quick else REFERENCE_STEPS
    instances = []
    for angle in ANGLES_DEG[:n_instances]:
        transformer = RotationTransformer(fill=BACKGROUND, init_deg=angle).to(device)
        idx = torch.randperm(len(data.train_y), generator=gen)[:BATCH]
        val_idx = torch.randperm(len(data.val_y), generator=gen)[:BATCH]
        train_fn, val_fn = make_loss_fns(model, transformer, data.train_x[idx].to(device), data.train_y[idx].to(device),
                                         data.val_x[val_idx].to(device), data.val_y[val_idx].to(device))
        params = perturbable_params(model)
        reference = unrolled_reference((params, [transformer.angle], train_fn, val_fn), INNER_LR, steps)
        instances.append(ProblemInstance(params, [transformer.angle], train_fn, val_fn, reference))
    return instances

