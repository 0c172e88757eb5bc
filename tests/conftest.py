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


@pytest.fixture
def repo_root() -> Path:
    return ROOT
