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
  extra), whether or not the run has a quantized layer; it names an optional faster kernel.

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
import sys
import warnings
from collections.abc import Iterator

__all__ = ["all_output_discarded", "lightning_noise_filtered"]

#: Loggers Lightning's ``rank_zero_info`` writes to (whichever of the two set it up last).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_TIP_PREFIX = "💡 Tip:"
#: The logger bitsandbytes' CPU backend notes its optional kernel on, and the note's start.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Total length of `list` across ranks is zero",
    r"You passed in a `val_dataloader` but have no `validation_step`",
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def lightning_noise_filtered() -> Iterator[None]:
    """Drop Lightning's tips and the listed warnings inside the block; everything else passes."""
    filters = [(logging.getLogger(name), _DropPrefix(_TIP_PREFIX)) for name in _RANK_ZERO_LOGGERS]
    filters.append((logging.getLogger(_BNB_CPU_LOGGER), _DropPrefix(_BNB_KERNEL_NOTE)))
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message in _WARNINGS:
                warnings.filterwarnings("ignore", message=message)
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
