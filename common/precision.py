"""Mixed precision for the trainers: ``torch.autocast`` and, for float16, a gradient scaler.

``--amp none|bf16|fp16`` (``add_amp_arg``) chooses it; ``Precision(amp, device)`` carries it
through a run. One training iteration runs inside ``precision.iteration()``:

    precision = Precision(args.amp, device)
    for batch in batches:
        with precision.iteration():          # autocast(device type, dtype) around the whole iteration
            loss = model_step(...)           # base step: backward(loss); optimizer_step(optimizer)
            meta_step(...)                   # the hypergradient, under the same autocast

Inside an iteration, ``backward(loss)`` is ``scaler.scale(loss).backward()`` and
``optimizer_step(optimizer)`` is ``scaler.step(optimizer)`` (the gradients are unscaled first, and
the step is skipped when they hold inf/NaN); the scale is updated once when the iteration ends.
Outside one (or with ``--amp none``/``bf16``, where no scaler is needed: bfloat16 has float32's
exponent range) they are plain ``loss.backward()`` and ``optimizer.step()``, so the base-step
functions keep their signatures and behave exactly as before without ``--amp``.

Autocast runs without its cache of cast weights (``autocast``): parameters change in place inside
an iteration (λ's optimiser step, a sharded meta step's perturbations), and every forward must
read their current values.

The gradient scaler applies to the base model's step only. The meta step runs under the same
autocast, unscaled: every estimator calls the user's loss functions, which is where autocast
acts (convolutions and matrix products in reduced precision, losses and softmax in float32 as
autocast's op lists decide), and λ's optimiser receives the hypergradient as computed. EvoGrad's
candidate passes run in float32 by default even under autocast (``full_precision``;
``common.evograd``, ``candidates_in_float32``), because the K candidates differ by σ·‖∇ℓ‖, at
the resolution of bfloat16 (common/HYPERGRAD_STUDY.md, "Reduced precision"). Evaluation runs
outside the iterations, in float32.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

AMP_MODES = ("none", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")

_ACTIVE: contextvars.ContextVar[Precision | None] = contextvars.ContextVar("evograd_active_precision", default=None)


def check_amp(amp: str, device: torch.device | str) -> torch.device:
    """The device as a ``torch.device`` if autocast ``amp`` can run there; ``ValueError`` otherwise.

    Raises:
        ValueError: for an ``amp`` outside ``AMP_MODES``, a device that is not a torch device, or
            reduced precision on a device type without autocast (anything but cpu and cuda).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from err
    if amp != "none" and (device.type not in AUTOCAST_DEVICE_TYPES or not torch.amp.is_autocast_available(device.type)):
        raise ValueError(f"--amp {amp}: torch.autocast does not run on device type {device.type!r}; use --amp none")
    return device


def autocast(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype, cache_enabled=False)`` for ``amp`` = "bf16"/"fp16"; a context that
    does nothing for "none".

    Autocast's cache of cast weights is off: it keeps one reduced-precision copy of each parameter
    for the whole region, and an iteration changes parameters in place inside it (λ's optimiser
    step before the base step reads λ again; under ``--fsdp`` the meta step's passes gather θ + δ for
    each δ into the same parameter objects), so a cached copy would be stale.

    Raises:
        ValueError: as ``check_amp``.
    """
    device = check_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp], cache_enabled=False)


@contextlib.contextmanager
def full_precision(enabled: bool = True) -> Iterator[None]:
    """Turn off every active autocast (cpu, cuda) inside: ops run in their inputs' dtype (float32).

    Used by EvoGrad for its candidate passes and by SAMA for its two finite-difference passes
    (``enabled`` = their ``candidates_in_float32`` / ``differences_in_float32``); with
    ``enabled=False``, or outside autocast, it changes nothing.
    """
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICE_TYPES if enabled else ():
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


class Precision:
    """A run's precision: its autocast and, for "fp16", its ``torch.amp.GradScaler``.

    Args:
        amp: "none" (float32), "bf16" or "fp16".
        device: the run's device; autocast uses its type.

    Raises:
        ValueError: as ``check_amp``.
    """

    def __init__(self, amp: str = "none", device: torch.device | str = "cpu") -> None:
        self.device = check_amp(amp, device)
        self.amp = amp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self._stepped = False

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (float32 for "none")."""
        return AMP_DTYPES.get(self.amp, torch.float32)

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """One training iteration under autocast; ``backward``/``optimizer_step`` inside use the scaler.

        The scale is updated once at the end if an optimiser stepped; not after an exception.
        """
        token = _ACTIVE.set(self)
        self._stepped = False
        try:
            with autocast(self.amp, self.device):
                yield
            if self._stepped:
                self.scaler.update()
        finally:
            _ACTIVE.reset(token)

    def state_dict(self) -> dict:
        """The scaler's state (its scale and growth tracker; empty when disabled), for checkpoints."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output (nothing to restore when the scaler is disabled)."""
        if state:
            self.scaler.load_state_dict(state)


def backward(loss: Tensor, **kwargs) -> None:
    """``loss.backward(**kwargs)`` outside autocast, scaled by the active iteration's gradient scaler (fp16) if any.

    Backward ops run in the dtypes their forward ops had (PyTorch's advice: no backward under
    autocast; on CPU a backward under autocast recasts float32 graphs' ops).
    """
    precision = _ACTIVE.get()
    if precision is not None and precision.scaler.is_enabled():
        loss = precision.scaler.scale(loss)
    with full_precision():
        loss.backward(**kwargs)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, or the active iteration's ``scaler.step(optimizer)`` under fp16.

    ``scaler.step`` divides the gradients by the scale and skips the step when they are not finite.
    The optimiser's gradients must come from ``backward`` in the same iteration.
    """
    precision = _ACTIVE.get()
    if precision is None or not precision.scaler.is_enabled():
        optimizer.step()
        return
    precision.scaler.step(optimizer)
    precision._stepped = True


def unscale_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Divide ``optimizer``'s gradients by the active fp16 scale now (before clipping them); else nothing.

    ``optimizer_step`` then does not divide them again.
    """
    precision = _ACTIVE.get()
    if precision is not None and precision.scaler.is_enabled():
        precision.scaler.unscale_(optimizer)


def add_amp_arg(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--amp {none,bf16,fp16}`` (default none) to a CLI."""
    parser.add_argument("--amp", default="none", choices=list(AMP_MODES),
                        help="mixed precision: torch.autocast in bfloat16 or float16 around each training "
                             "iteration (base and meta step; a gradient scaler on the base step for fp16); "
                             "none: float32")
    return parser
