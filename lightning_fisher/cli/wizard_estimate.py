"""The wizard's run-time estimate: build the model from the config as ``analyze`` would and time one batch."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from lightning_fisher.cli.quiet import all_output_discarded

__all__ = ["RunTimeEstimate", "analysis_batches", "estimate_run_time", "short_reason"]


@dataclass(frozen=True)
class RunTimeEstimate:
    """Building the model (``load_seconds``), then one batch (loading, forward, backward: ``batch_seconds``) times
    the batches the analysis runs: ``batches_low`` when the ranking converges as early as the settings allow,
    ``batches_high`` when it never does (one pass, capped by ``max_batches``)."""

    load_seconds: float
    batch_seconds: float
    batches_low: int
    batches_high: int

    def describe(self) -> str:
        """E.g. ``about 4.5 s to 34 s (5 to 63 batches x 0.5 s, plus 2.0 s to load the model)``."""
        low, high = (self.load_seconds + n * self.batch_seconds for n in (self.batches_low, self.batches_high))
        same = self.batches_low == self.batches_high
        total = _duration(low) if same else f"{_duration(low)} to {_duration(high)}"
        batches = str(self.batches_low) if same else f"{self.batches_low} to {self.batches_high}"
        return f"about {total} ({batches} batches x {_duration(self.batch_seconds)}, plus {_duration(self.load_seconds)} to load the model)"


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


def _forward_backward(model: Any, batch: Any, device: Any) -> float:
    import torch

    from lightning_fisher.training.analysis_module import training_step_loss  # the analysis' own reading of the loss

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    training_step_loss(model.training_step(batch, 0), type(model).__name__).backward()
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

    from lightning_fisher.cli.lightning_clis import build_analyze_cli

    with all_output_discarded():
        start = time.perf_counter()
        # the parser exactly as `analyze` builds it (raising instead of exiting); it reads a config given as text
        cli = build_analyze_cli(["--config", config_text], exit_on_error=False)
        load_seconds = time.perf_counter() - start
        model, data, device = cli.model, cli.datamodule, cli.trainer.strategy.root_device
        model.to(device)
        model.train(cli.config.train_mode)
        data.setup("fit")
        start = time.perf_counter()
        batch = move_data_to_device(next(iter(data.train_dataloader())), device)
        load_batch = time.perf_counter() - start
        step = min(_forward_backward(model, batch, device) for _ in range(2))
        model.zero_grad(set_to_none=True)
    rule = cli.stopping
    low, high = analysis_batches(
        num_samples, data.batch_size, min_batches=rule.min_batches, patience=rule.patience, max_batches=rule.max_batches
    )
    return RunTimeEstimate(load_seconds, load_batch + step, low, high)


def short_reason(error: BaseException) -> str:
    """The reason of an error on one line (:func:`~lightning_fisher.cli.error_reason.error_reason`), at most 400 characters."""
    from lightning_fisher.cli.error_reason import error_reason

    reason = "; ".join(line.strip() for line in error_reason(error).splitlines() if line.strip())
    return reason if len(reason) <= 400 else reason[:397] + "..."
