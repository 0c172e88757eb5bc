"""Shared pytest setup: repo root on sys.path, quiet progress bars, small thread pools."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("EVOGRAD_NO_PROGRESS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def quadratic_problem(d: int = 6, dtype: torch.dtype = torch.float64):
    """θ ∈ R^d with L_train = ||θ − a||² + Σ λ_i θ_i² and L_val = ||θ − b||² (λ_i > 0).

    Returns (θ, a, b, λ, train_loss_fn, val_loss_fn) with λ a leaf that requires grad.
    """
    g = torch.Generator().manual_seed(0)
    theta, a, b = (torch.randn(d, generator=g, dtype=dtype) for _ in range(3))
    lam = (torch.rand(d, generator=g, dtype=dtype) + 0.1).requires_grad_()

    def train(p):
        return ((p["theta"] - a) ** 2).sum() + (lam * p["theta"] ** 2).sum()

    def val(p):
        return ((p["theta"] - b) ** 2).sum()
    return theta, a, b, lam, train, val


@pytest.fixture
def repo_root() -> Path:
    return ROOT
