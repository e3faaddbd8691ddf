"""The processes an analysis runs in: one, or every rank of an initialised ``torch.distributed`` group.

The analysis keeps its running statistics as flat tensors of sums, so combining processes is one
``all_reduce(SUM)`` per batch (:class:`~lightning_fisher.analysis.accumulator.FisherAccumulator`). This
module is the plain-PyTorch side of that: :class:`Processes` is what an analysis needs of its
process group (how many there are, and a sum across them), :class:`TorchProcesses` provides it
from ``torch.distributed`` (the group Lightning Fabric, ``torchrun`` or accelerate initialise),
and the Lightning adapter provides it from its Trainer's strategy. The rank-zero messages
(:func:`info_on_rank_zero`, :func:`warn_on_rank_zero`) follow Lightning's ``rank_zero_info`` /
``rank_zero_warn`` without importing Lightning.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

__all__ = ["Processes", "TorchProcesses", "info_on_rank_zero", "is_global_zero", "warn_on_rank_zero"]

#: The library's own logger; set up on first use as Lightning sets up its own (see :func:`_logger`).
LOGGER_NAME = "lightning_fisher"


class Processes(Protocol):
    """What an analysis needs of the processes it runs in."""

    @property
    def world_size(self) -> int:
        """How many processes analyse (each its own share of the batches)."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (the tensor itself in one process); a collective."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class TorchProcesses:
    """The ``torch.distributed`` default group when one is initialised, else this process alone.

    Args:
        device: where the tensors go before a collective: the model's device (NCCL needs CUDA
            tensors; gloo takes CPU ones).
    """

    def __init__(self, device: Any = None) -> None:
        self.device = device

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if _distributed() else 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.to(self.device).clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (the same answer on every process)."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], dtype=torch.float64)) > 0)

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every process (the same answer on every process)."""
        if self.world_size == 1:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], dtype=torch.float64)) == self.world_size)

    def barrier(self) -> None:
        """Wait for every process (nothing in one process)."""
        if self.world_size > 1:
            dist.barrier()


def is_global_zero() -> bool:
    """Whether this is the process that writes files and says things (rank 0, or the only one)."""
    return not _distributed() or dist.get_rank() == 0


def _logger() -> logging.Logger:
    # As Lightning does for its own logger: shown at INFO by default, unless the application
    # configured logging itself (a root handler), in which case records go there.
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
        if not logging.getLogger().hasHandlers():
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False
    return logger


def info_on_rank_zero(message: str) -> None:
    """Log ``message`` at INFO on rank zero only (Lightning's ``rank_zero_info``)."""
    if is_global_zero():
        _logger().info(message)


def warn_on_rank_zero(message: str, stacklevel: Optional[int] = None) -> None:
    """Warn ``message`` (``UserWarning``) on rank zero only (Lightning's ``rank_zero_warn``).

    Args:
        stacklevel: as for ``warnings.warn``; default the first caller outside this package
            (the user's line, however many of the package's wrappers lie between).
    """
    if is_global_zero():
        warnings.warn(message, UserWarning, stacklevel=stacklevel or _first_level_outside_package())


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_level_outside_package() -> int:
    # Level 1 is warn_on_rank_zero itself (warnings.warn's stacklevel=1); count up from there.
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    return level
