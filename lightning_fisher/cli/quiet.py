"""Lightning's output that says nothing about the user's run, filtered while a command runs.

Only the ``lightning-fisher`` command filters these, and only while it runs: a library user's
own script sees Lightning exactly as Lightning prints it.

- the "💡 Tip: ... litlogger / litmodels" advertisements Lightning logs when a Trainer starts;
- the ``torch.utils._pytree`` deprecation warning Lightning's own code triggers with recent
  torch (``isinstance(treespec, LeafSpec)``), which no user can act on;
- "Total length of `list` across ranks is zero" and "You passed in a `val_dataloader` but have
  no `validation_step`": the empty list is how :class:`~lightning_fisher.TensorDirectoryDataModule`
  says "no validation data" on purpose, and it defines ``val_dataloader`` for every model;
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" note, logged on
  CPUs with AVX512-BF16 whenever ``peft`` imports bitsandbytes (installed with the ``quant``
  extra), whether or not the run has a quantized layer; it names an optional faster kernel;
  with the ``kernels`` package installed and the Hub offline, the same attempt logs "Skipping
  publisher trust check for 'kernels-community/...'" instead;
- Lightning's "Detected KeyboardInterrupt, attempting graceful shutdown ...": the command says
  itself, in one line, what an interruption left undone (:mod:`lightning_fisher.cli.interrupts`);
- "GPU available: False, used: False" / "TPU available: False, ..." on every Trainer: nothing to
  use, nothing to act on (a device that is there but unused is still reported, with Lightning's
  own advice to use it);
- Lightning's paragraph that ``tensorboardX`` is no longer its dependency, on every ``fit`` with
  the default logger: the run logs to CSV either way, and the log folder says so.

The library's own warnings, which Lightning's warning format prefixes with this package's
source path and line (``.../stability_callback.py:116: analysis did NOT converge``), are
printed as ``lightning-fisher SUBCOMMAND: warning: MESSAGE``: the message is the point, the
path only says which file of ours raised it.

(Lightning's "No seed found" warning is not filtered: the commands pass their seed instead.)
Nothing here imports Lightning or bitsandbytes: the filters attach to their loggers by name.

:func:`all_output_discarded` goes further, for the wizard's run-time estimate, which builds the
user's model between two questions: everything printed or warned in the block is dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["all_output_discarded", "lightning_noise_filtered"]

#: Loggers Lightning's ``rank_zero_info`` writes to (whichever of the two set it up last).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_TIP_PREFIX = "💡 Tip:"
_NO_DEVICE = re.compile(r"^[A-Z]PU available: False")
_INTERRUPT_PREFIX = "\nDetected KeyboardInterrupt"
#: The logger bitsandbytes' CPU backend notes its optional kernel on, and the note's start.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
_KERNELS_TRUST_NOTE = "Skipping publisher trust check for 'kernels-community/"
_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Total length of `list` across ranks is zero",
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency",
)
_PACKAGE = Path(__file__).resolve().parents[1]


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _DropMatch(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.msg))


def _ours(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def lightning_noise_filtered(command: str = "lightning-fisher") -> Iterator[None]:
    """Drop Lightning's tips and the listed warnings inside the block; everything else passes.

    Args:
        command: what the library's own warnings are prefixed with (``lightning-fisher analyze``).
    """
    filters: list[tuple[logging.Logger, logging.Filter]] = [
        (logging.getLogger(name), drop)
        for name in _RANK_ZERO_LOGGERS
        for drop in (_DropPrefix(_TIP_PREFIX), _DropPrefix(_INTERRUPT_PREFIX), _DropMatch(_NO_DEVICE))
    ]
    filters.append((logging.getLogger(_BNB_CPU_LOGGER), _DropPrefix(_BNB_KERNEL_NOTE)))
    filters.append((logging.getLogger(_KERNELS_HUB_LOGGER), _DropPrefix(_KERNELS_TRUST_NOTE)))
    for logger, drop in filters:
        logger.addFilter(drop)
    previous_show = warnings.showwarning

    # showwarning, not formatwarning: Lightning replaces formatwarning when it is imported,
    # which happens inside this block.
    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if _ours(filename):
            (file or sys.stderr).write(f"{command}: warning: {message}\n")
        else:
            previous_show(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():  # puts showwarning back on the way out
            for message in _WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            warnings.showwarning = show_warning
            yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


@contextlib.contextmanager
def all_output_discarded() -> Iterator[None]:
    """Send file descriptors 1 and 2 to the null device, ``sys.stdout`` / ``sys.stderr`` nowhere, and ignore warnings.

    Both levels: libraries log through handlers bound to the original streams (Hugging Face's
    load report, Lightning's device summary), and a model's ``print`` goes to ``sys.stdout``.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (*saved, null):
            os.close(descriptor)
