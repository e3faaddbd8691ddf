"""The wizard's run-time estimate: build the model from the config as ``analyze`` would, time one batch.

The estimate is one batch (loading plus forward and backward) times the fewest and most
batches the analysis can run with its settings, plus the time to build the model.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["RunTimeEstimate", "analysis_batches", "estimate_run_time", "short_reason"]

# --------------------------------------------------------------------------------------------
# Run-time estimate


@dataclass(frozen=True)
class RunTimeEstimate:
    """Time of one batch times the number of batches the analysis may run, plus model loading.

    Args:
        load_seconds: building the model and data from the config.
        batch_seconds: loading one batch plus one forward and backward pass.
        batches_low: batches when the ranking converges as early as the settings allow.
        batches_high: batches when it never converges (one pass, capped by ``max_batches``).
    """

    load_seconds: float
    batch_seconds: float
    batches_low: int
    batches_high: int

    @property
    def low(self) -> float:
        return self.load_seconds + self.batches_low * self.batch_seconds

    @property
    def high(self) -> float:
        return self.load_seconds + self.batches_high * self.batch_seconds

    def describe(self) -> str:
        """E.g. ``about 4.5 s to 34 s (5 to 63 batches x 0.5 s, plus 2.0 s to load the model)``."""
        same = self.batches_low == self.batches_high
        total = _duration(self.low) if same else f"{_duration(self.low)} to {_duration(self.high)}"
        batches = str(self.batches_low) if same else f"{self.batches_low} to {self.batches_high}"
        return (
            f"about {total} ({batches} batches x {_duration(self.batch_seconds)}, "
            f"plus {_duration(self.load_seconds)} to load the model)"
        )


def analysis_batches(
    num_samples: int, batch_size: int, *, min_batches: int, patience: int, max_batches: Optional[int]
) -> tuple[int, int]:
    """Fewest and most batches the analysis runs on ``num_samples`` samples in one pass.

    The split-half correlation exists from the first batch, so the earliest convergence is
    after ``max(min_batches, patience)`` batches; without convergence the analysis runs
    until the data ends (one epoch) or ``max_batches``.
    """
    per_pass = max(1, math.ceil(num_samples / batch_size))
    high = per_pass if max_batches is None else min(per_pass, max_batches)
    return min(high, max(min_batches, patience)), high


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def _output_discarded() -> Iterator[None]:
    """Send file descriptors 1 and 2 to the null device, and ``sys.stdout`` / ``sys.stderr`` nowhere.

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
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (*saved, null):
            os.close(descriptor)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence start-up messages and warnings while the wizard builds the model: the questions stay readable."""
    with warnings.catch_warnings(), _output_discarded():
        warnings.simplefilter("ignore")
        yield


def _analyze_cli(args: list[str]) -> Any:
    """The ``analyze`` parser, exactly as the command builds it, raising instead of exiting."""
    from lightning_fisher.cli.lightning_clis import build_analyze_cli

    return build_analyze_cli(args, exit_on_error=False)


def _forward_backward(model: Any, batch: Any, device: Any) -> float:
    import torch

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    output = model.training_step(batch, 0)
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"{type(model).__name__}.training_step returned {type(output).__name__}, not a loss tensor")
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def estimate_run_time(config_text: str, num_samples: int) -> RunTimeEstimate:
    """Build the model and data from ``config_text`` as ``analyze --config`` does, and time one batch.

    The batch is loaded from the dataset folder and run forward and backward on the device
    the analysis would use, twice (the faster counts: the first run pays one-off set-up costs).
    The Fisher bookkeeping on top of that is small next to the backward pass.

    Raises:
        Exception: whatever building the model or running the batch raised.
    """
    from lightning.pytorch.utilities import move_data_to_device

    with _quiet():
        start = time.perf_counter()
        cli = _analyze_cli(["--config", config_text])  # jsonargparse reads a config given as text
        load_seconds = time.perf_counter() - start
        model, data, settings = cli.model, cli.datamodule, cli.config
        device = cli.trainer.strategy.root_device
        model.to(device)
        model.train(settings.train_mode)
        data.setup("fit")
        start = time.perf_counter()
        batch = move_data_to_device(next(iter(data.train_dataloader())), device)
        load_batch = time.perf_counter() - start
        step = min(_forward_backward(model, batch, device) for _ in range(2))
        model.zero_grad(set_to_none=True)
    low, high = analysis_batches(
        num_samples,
        data.batch_size,
        min_batches=settings.min_batches,
        patience=settings.convergence_patience,
        max_batches=settings.max_batches,
    )
    return RunTimeEstimate(load_seconds, load_batch + step, low, high)


def short_reason(error: BaseException) -> str:
    """The reason of an error on one line (:func:`~lightning_fisher.cli.error_reason.error_reason`), at most 400 characters."""
    from lightning_fisher.cli.error_reason import error_reason

    reason = "; ".join(line.strip() for line in error_reason(error).splitlines() if line.strip())
    return reason if len(reason) <= 400 else reason[:397] + "..."
