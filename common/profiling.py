"""Efficiency meter: seconds per meta-iteration and peak memory.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU. On the CPU it is the process's peak
resident set size above its level when measuring started: the kernel's high-water mark (VmHWM)
is reset through ``/proc/self/clear_refs`` where Linux allows it, so the peak of the measured
loop is not hidden by an earlier, larger one. For comparisons between methods, measure each
method in its own fresh process (``common.bench`` does).
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """Resident set size now, in MB (MiB)."""
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size in MB: VmHWM (resettable), else ru_maxrss (lifetime peak)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


class EfficiencyMeter:
    """Times meta steps and tracks peak memory of the work done between ``start()`` and ``summary()``.

    Usage::

        meter = EfficiencyMeter(device, warmup=5)
        for batch in loader:
            with meter.step():
                ...one meta-iteration...
        efficiency = meter.summary()   # {"meta_step_s", "peak_mem_mb", "device", ...}

    The first ``warmup`` steps are not timed (allocator and thread-pool warm-up); memory is
    measured from the first step on.
    """

    def __init__(self, device: torch.device | str, warmup: int = 2) -> None:
        self.device = torch.device(device)
        self.warmup = warmup
        self.times: list[float] = []
        self.n_steps = 0
        self._base_mb: float | None = None

    def start(self) -> None:
        """Mark the memory baseline (called by the first ``step`` if not called before)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            reset_peak_rss()
            self._base_mb = current_rss_mb()

    @contextmanager
    def step(self):
        if self._base_mb is None:
            self.start()
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        if self.n_steps >= self.warmup:
            self.times.append(time.perf_counter() - t0)
        self.n_steps += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_mem_mb(self) -> float | None:
        """Peak memory above the baseline, in MB; None before ``start``."""
        if self._base_mb is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base_mb
        return max(0.0, peak_rss_mb() - self._base_mb)

    def summary(self) -> dict:
        """``meta_step_s`` (mean over timed steps, None if none), ``peak_mem_mb``, ``device``."""
        mean = sum(self.times) / len(self.times) if self.times else None
        return {
            "meta_step_s": mean,
            "peak_mem_mb": self.peak_mem_mb(),
            "device": str(self.device),
            "timed_steps": len(self.times),
            "memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss_delta",
        }
