"""Figure helpers: a headless backend and PNG + PDF output."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)


def save_figure(fig: "plt.Figure", path_stem: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.png`` and ``.pdf`` (folders created), close it, return the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = stem.parent / f"{stem.name}.{ext}"  # not with_suffix: stems may contain dots ("unif0.4")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths
