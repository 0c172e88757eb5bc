"""Command-line plumbing shared by every experiment: common flags, seeding, devices, errors.

Every experiment's CLI calls ``add_common_args`` and runs its ``main`` through ``run_cli``, so
bad input ends with one clear line on stderr and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.results import RunFileError, check_writable_dir


class CLIError(Exception):
    """A user-facing error: bad argument, missing or corrupt data, non-finite loss."""


class DataError(CLIError):
    """Missing or corrupt data files; the message says where to put them and how to get them."""


class NonFiniteLossError(CLIError):
    """A loss became NaN/inf; the message names the step."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows every flag's default after its help text, e.g. ``(default: 3e-05)``.

    Every CLI's parser uses it (``formatter_class=DefaultsHelpFormatter``), so the paper settings
    that the defaults hold can be read from ``--help``. Unlike ``argparse.ArgumentDefaultsHelpFormatter``
    it also shows the default of a flag without help text, writes a list default as its items
    (``joint_training metaxl``), and leaves out what says nothing: switches (``store_true``),
    required flags, positionals, and a ``None`` default whose help already says what it means.
    """

    def _format_action(self, action: argparse.Action) -> str:
        default = self._default_text(action)
        if not (action.help or "").strip() and default is not None:  # argparse prints no help text at all
            action = copy.copy(action)
            action.help = f"(default: {default.replace('%', '%%')})"
            action.default_shown = True
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = self._default_text(action)
        if default is None or "%(default)" in help_text or getattr(action, "default_shown", False):
            return help_text
        return f"{help_text} (default: {default.replace('%', '%%')})"

    @staticmethod
    def _default_text(action: argparse.Action) -> str | None:
        """The default as shown in the help, or None where it is not shown."""
        if (action.nargs == 0 or action.required or action.default is argparse.SUPPRESS
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return None
        if action.default is None and "default" in (action.help or "").lower():
            return None
        if isinstance(action.default, (list, tuple)):
            return " ".join(str(v) for v in action.default) or "none"
        return str(action.default)


class _DistinctSeeds(argparse.Action):
    """``--seeds``: a seed named twice is refused (it would run twice and rewrite its own results file)."""

    def __call__(self, parser, namespace, values, option_string=None):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            parser.error(f"{option_string} names seed {', '.join(map(str, repeated))} more than once: "
                         "each seed is one run; pass it once")
        setattr(namespace, self.dest, values)


def add_common_args(parser: argparse.ArgumentParser, default_seeds: Sequence[int] = (1,),
                    default_out: str = "results") -> argparse.ArgumentParser:
    """Add the flags every experiment CLI has (DEVELOPERS.md): --quick, --device, --seed(s), ..."""
    parser.add_argument("--quick", action="store_true", help="small run on the embedded default data")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto picks cuda when available")
    parser.add_argument("--seed", type=non_negative(int), default=None, help="run this one seed (overrides --seeds)")
    parser.add_argument("--seeds", type=non_negative(int), nargs="+", default=list(default_seeds),
                        action=_DistinctSeeds, help="seeds to run one after another")
    parser.add_argument("--data-root", default=None,
                        help="folder with the dataset files; default: the embedded offline data")
    parser.add_argument("--out", default=default_out, help="folder for results JSON files and figures")
    parser.add_argument("--resume", action="store_true",
                        help="continue unfinished runs from their checkpoints in --out (same settings); "
                             "skip finished runs")
    parser.add_argument("--overwrite", action="store_true",
                        help="rerun runs whose results file already exists in --out (replacing it)")
    accept_both_spellings(parser)
    return parser


def accept_both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``--inner_steps`` and ``--inner-steps`` (any ``_``/``-`` swap) name the same flag.

    The experiments grew different spellings (rotation ``--inner-steps``, MWN ``--inner_steps``);
    a flag the parser does not know is replaced, before parsing, by its other spelling where the
    parser knows that one. The help shows each flag's own spelling.
    """
    parse_known = parser.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        known = parser._option_string_actions
        fixed = []
        for token in sys.argv[1:] if args is None else args:
            flag, eq, value = token.partition("=")
            if flag.startswith("--") and flag not in known:
                other = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
                if other in known:
                    token = other + eq + value
            fixed.append(token)
        return parse_known(fixed, namespace)

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser


def seeds_of(args: argparse.Namespace) -> list[int]:
    """The seeds to run: ``--seed`` if given, else ``--seeds``."""
    return [args.seed] if args.seed is not None else list(args.seeds)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded with ``seed`` for EvoGrad noise."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def select_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a CLIError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but no CUDA device is available (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise CLIError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def progress(iterable: Iterable, **kwargs) -> Iterable:
    """A tqdm bar on stderr; hidden when stderr is not a terminal or EVOGRAD_NO_PROGRESS is set."""
    disable = bool(os.environ.get("EVOGRAD_NO_PROGRESS")) or not sys.stderr.isatty()
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


def prepare_out(out: str | Path, flag: str = "--out") -> Path:
    """Check before any work that ``out`` is (or can be made) a writable folder; clean stale temp files.

    Raises:
        CLIError: naming ``flag`` if ``out`` is a file or cannot be created or written.
    """
    try:
        return check_writable_dir(out)
    except RunFileError as err:
        raise CLIError(f"{flag} {out}: {err}; pass a writable folder") from None


def prepare_out_file(path: str | Path, flag: str = "--out") -> Path:
    """Check before any work that the file ``path`` can be written (its folder writable, not a folder itself)."""
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; pass a file name (e.g. {path / 'bench.json'})")
    prepare_out(path.parent, flag=f"{flag} {path}: folder")
    return path


def finished_runs(result_files: Iterable[str | Path], resume: bool, overwrite: bool) -> set[Path]:
    """The runs to skip; a finished run (its results file exists) is never rewritten unless asked.

    With ``--resume`` finished runs are skipped and their files left untouched; with ``--overwrite``
    they are run again from scratch; with neither, an existing results file is a ``CLIError`` (before
    any work), so a rerun into the same ``--out`` cannot replace results by accident.
    """
    if resume and overwrite:
        raise CLIError("--resume and --overwrite contradict each other: --resume skips finished runs, "
                       "--overwrite reruns them; pass one")
    finished = [Path(p) for p in result_files if Path(p).is_file()]
    if not finished or overwrite:
        return set()
    if not resume:
        more = f" (and {len(finished) - 1} more)" if len(finished) > 1 else ""
        raise CLIError(f"{finished[0]}{more} exists: that run is finished; pass --resume to skip finished runs, "
                       "--overwrite to rerun them, or another --out")
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not grouped or torch.distributed.get_rank() == 0:
        for path in finished:  # once, not once per torchrun rank
            print(f"skipping finished run {path} (--resume; --overwrite reruns it)", file=sys.stderr)
    return set(finished)


class DivergenceGuard:
    """Stops a run at its first non-finite or implausibly large loss, parameter or buffer, with one
    line naming where.

    Usage (one per run; ``steps_done`` = steps already taken before a resume)::

        guard = DivergenceGuard("rotation", method, seed, [model, transformer], steps_done)
        for epoch ...:
            for batch ...:
                with guard.step(epoch + 1):            # a non-finite loss inside an estimator lands here
                    loss, meta_loss = ...
                guard.check(training_loss=loss, meta_loss=meta_loss)

    ``check`` tests the given losses and every floating parameter and buffer of ``modules`` (BN
    running statistics included): NaN, infinite, or finite beyond the plausible bounds
    (``loss_limit`` for a loss, ``parameter_limit`` for any entry of a parameter or buffer). A run
    past them is diverged even while it stays finite: a cross-entropy loss of 1e10, a learned angle
    of 1e9 radians or weights of 1e8 leave nothing meaningful to report (an exploding meta loss
    with a training loss of 0.0000, say). The error says to keep the last good checkpoint: callers
    raise before saving one and before writing a results file.
    """

    LOSS_LIMIT = 1e4        # cross-entropy and its kin: |loss| > 1e4 means logits off by thousands
    PARAMETER_LIMIT = 1e6   # weights, learned transformations, BN statistics of normalised inputs

    def __init__(self, experiment: str, method: str, seed: int, modules: Sequence[nn.Module | None],
                 steps_done: int = 0, loss_limit: float = LOSS_LIMIT, parameter_limit: float = PARAMETER_LIMIT) -> None:
        self.where = f"{experiment} {method} seed {seed}"
        self.modules = [m for m in modules if m is not None]
        self.epoch = 0
        self.steps = steps_done
        self.loss_limit = loss_limit
        self.parameter_limit = parameter_limit

    def _error(self, what: str, hint: str | None = "lower the learning rate?") -> NonFiniteLossError:
        return NonFiniteLossError(f"{self.where} diverged at epoch {self.epoch} step {self.steps}: {what}; "
                                  "stopped: the last good checkpoint is kept and no results file is written"
                                  + (f" ({hint})" if hint else ""))

    @contextlib.contextmanager
    def step(self, epoch: int) -> Iterator[None]:
        """Count one step of ``epoch`` (1-based); turn a non-finite loss raised inside into the one line.

        The learning-rate hint is added only to an exploding loss; an estimator's own error (an
        overflow of Hessian-vector products, say) carries its own advice.
        """
        self.epoch = epoch
        self.steps += 1
        try:
            yield
        except NonFiniteLossError as err:
            raise self._error(str(err), hint=None) from None
        except ValueError as err:  # common.evograd.check_scalar_loss and the other estimators' checks
            if "non-finite" not in str(err):
                raise
            own_advice = "returned a non-finite loss" not in str(err)
            raise self._error(str(err), hint=None if own_advice else "lower the learning rate?") from None

    def check(self, **losses: float | torch.Tensor | None) -> None:
        """Raise ``NonFiniteLossError`` if a given loss, or any parameter or buffer, is NaN, infinite
        or beyond its plausible bound (one host read for all the tensors)."""
        for name, value in losses.items():
            if value is None:
                continue
            number = float(value.detach().flatten()[0]) if isinstance(value, torch.Tensor) else float(value)
            label = name.replace("_", " ")
            if not math.isfinite(number):
                raise self._error(f"non-finite {label} ({number})")
            if abs(number) > self.loss_limit:
                raise self._error(f"{label} {number:.3g} is beyond the plausible bound ±{self.loss_limit:.0e}")
        named = [(kind, module, name, tensor) for module in self.modules
                 for kind, tensors in (("parameter", module.named_parameters()), ("buffer", module.named_buffers()))
                 for name, tensor in ((n, _local_part(t)) for n, t in tensors)
                 if tensor.is_floating_point() and tensor.numel()]
        if not named:
            return
        device = named[0][3].device
        largest = torch.stack([t.detach().abs().amax().float().to(device) for *_, t in named])
        ok = largest <= self.parameter_limit  # False for NaN too
        if bool(ok.all()):
            return
        kind, module, name, tensor = named[int((~ok).nonzero()[0, 0])]
        value = float(largest[int((~ok).nonzero()[0, 0])])
        where = f"{kind} {type(module).__name__}.{name}"
        if not bool(torch.isfinite(tensor).all()):
            raise self._error(f"non-finite {where}")
        raise self._error(f"{where} reached |value| {value:.3g}, beyond the plausible bound ±{self.parameter_limit:.0e}")


def _local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (an FSDP2 shard, ``--fsdp``), else the tensor itself.

    The guard runs on every rank (``common.distributed.on_every_rank``), so each checks its own part;
    a DTensor's own ``amax`` would not give its local maximum.
    """
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def check_finite(loss: torch.Tensor, step: int, what: str = "loss") -> None:
    """Raise ``NonFiniteLossError`` naming the step if ``loss`` is NaN or infinite."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(f"non-finite {what} ({loss.detach().flatten()[0].item()}) at step {step}; "
                                 "stopping (the last good checkpoint is kept)")


def import_experiment_modules(module_name: str) -> list[str]:
    """Import ``<folder>.<module_name>`` for every ``<folder>/<module_name>.py`` beside ``common/``.

    This is how experiments plug into common tools (benchmarks, study problems) without
    ``common`` naming any experiment. A folder whose module fails to import (an incomplete
    checkout) is skipped with a warning on stderr.

    Returns:
        The imported module names.
    """
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    imported = []
    for path in sorted(root.glob(f"*/{module_name}.py")):
        if path.parent.name == "common":
            continue
        name = f"{path.parent.name}.{module_name}"
        try:
            importlib.import_module(name)
        except ImportError as err:
            print(f"warning: skipping {name}: {err}", file=sys.stderr)
            continue
        imported.append(name)
    return imported


def _number(kind: type, check: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """argparse type: parse ``kind``, then refuse values for which ``check`` is false."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive(kind: type = float) -> Callable[[str], float]:
    """argparse type for a strictly positive number (NaN is refused)."""
    return _number(kind, lambda v: v > 0, "> 0")


def non_negative(kind: type = float) -> Callable[[str], float]:
    """argparse type for a number >= 0 (weight decay, momentum, a seed)."""
    return _number(kind, lambda v: v >= 0, ">= 0")


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """argparse type for a number >= ``minimum`` (EvoGrad's K >= 2, a grid of >= 2 points)."""
    return _number(kind, lambda v: v >= minimum, f">= {minimum}")


def in_range(low: float, high: float, kind: type = float, high_open: bool = False) -> Callable[[str], float]:
    """argparse type for a number in [low, high] (or [low, high) with ``high_open``)."""
    return _number(kind, lambda v: low <= v and (v < high if high_open else v <= high),
                   f"in [{low:g}, {high:g}{')' if high_open else ']'}")


class _Refused(argparse.Action):
    """A flag that is parsed only to be refused with the reason (``refuse_flags``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not used here: {self.reason}")


def refuse_flags(parser: argparse.ArgumentParser, reason: str, *flags: str) -> argparse.ArgumentParser:
    """Refuse shared flags (from ``add_common_args``, ``add_estimator_args``) that an entry point
    does not use: giving one is an argparse error naming it and ``reason``, instead of being ignored.
    The flags leave ``--help`` and the parsed namespace."""
    for flag in flags:
        action = parser._option_string_actions.get(flag)
        if action is None:
            raise ValueError(f"{parser.prog} has no flag {flag}")
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for option in action.option_strings:
            del parser._option_string_actions[option]
        refused = parser.add_argument(*action.option_strings, action=_Refused, nargs="*",
                                      default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        refused.reason = reason
    return parser


@contextlib.contextmanager
def argparse_errors_as_cli_errors() -> Iterator[None]:
    """Within the block, an argparse error (bad flag value, unknown flag) raises ``CLIError`` naming
    the flag, instead of printing the usage block and exiting: ``run_cli`` then prints one line."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str):
        raise CLIError(f"{parser.prog}: {message} (see --help)")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; user-facing errors, argparse's included, become one line on stderr and
    exit status 2."""
    try:
        with argparse_errors_as_cli_errors():
            main(argv)
    except (CLIError, RunFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as err:
        if not lost_a_peer(err):
            raise
        reason = next((r for r in PEER_LOSSES if r in str(err)), type(err).__name__)
        print(f"error: process {os.environ.get('RANK', '?')} of this torchrun job stopped: another process of the "
              f"job ended ({reason}; its own output says why); the last checkpoints are kept: rerun the same "
              "torchrun command with --resume", file=sys.stderr)
        raise SystemExit(1) from None


PEER_LOSSES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def lost_a_peer(err: BaseException) -> bool:
    """True for the error a torchrun rank meets in a collective when another rank has died (gloo's
    "Connection reset by peer", a ``torch.distributed.DistError``); never outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err)
    return ("gloo" in text or "NCCL" in text or "c10d" in text) and any(r in text for r in PEER_LOSSES)
