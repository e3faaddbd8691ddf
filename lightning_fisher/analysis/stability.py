"""When to stop the analysis: split-half rank agreement of the module scores.

Why split halves. The obvious rule, "stop when the ranking after this batch agrees with the
ranking after the previous one", measures nothing: two consecutive running means share all but
one batch of their samples, so they agree more and more as samples accumulate, whatever the
data. Instead, every sample goes to one of two halves (by the parity of its position in the
stream; see :class:`~lightning_fisher.analysis.accumulator.FisherAccumulator`), and after each batch
the module scores of half A are rank-correlated with those of half B. The two halves share no
sample, so their agreement is an honest estimate of how reproducible the ranking is at half the
data seen; the ranking from all samples together is more reliable still (by the
Spearman-Brown relation, a split-half reliability ``r`` means about ``2r / (1 + r)`` for the
whole). The correlation is Spearman's over **all** candidate modules, not a match of a top-k
list: it counts the order of every module, which is what rank allocation uses.

**The spectrum criterion** allocates from spectra, not from scores, so its rule compares what
it produces: each half's spectra (and its own noise floor, about twice the whole's) go through
the same allocation, and the two halves' ranks (``0`` for a module left out) are
rank-correlated over all candidates, after every
:data:`~lightning_fisher.analysis.spectrum.STOP_CHECK_EVERY` batches (the latest verdict counts
for the batches between). It starts counting once at least one half gives some module
an adapter (see :func:`~lightning_fisher.allocation.criteria.spectrum.spectrum_split_half_correlation`). Each
criterion's check is its own (:meth:`lightning_fisher.allocation.criteria.Criterion.split_half_correlation`).

The rule stops when that correlation has been at least ``threshold`` for ``patience``
consecutive batches, once at least ``min_batches`` batches are in; it stops at ``max_batches``
regardless. Pure functions and a small state machine, so a plain PyTorch loop can use them;
:class:`~lightning_fisher.FisherStability` drives it from Lightning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from lightning_fisher.allocation.criteria import criterion_named
# Each criterion's split-half check lives with the criterion; importable from here as before.
from lightning_fisher.allocation.criteria.spectrum import spectrum_split_half_correlation
from lightning_fisher.allocation.criteria.trace import split_half_correlation
from lightning_fisher.allocation.settings import other_spellings
from lightning_fisher.errors import SettingsError

__all__ = [
    "STOPPING_OPTIONS", "StabilityRule", "StabilityTracker", "StopReason", "method_for", "spectrum_split_half_correlation",
    "split_half_correlation",
]

def method_for(criterion: str) -> str:
    """The stopping method's name for an allocation criterion, as recorded in the map."""
    return criterion_named(criterion).stopping_method


class StopReason(str, enum.Enum):
    """Why the analysis ended."""

    CONVERGED = "converged"
    """The split-half ranking agreement stayed above the threshold for ``patience`` batches."""
    MAX_BATCHES = "max_batches"
    """The batch limit was reached before the ranking settled."""
    DATA_EXHAUSTED = "data_exhausted"
    """The data ran out before the ranking settled."""
    INTERRUPTED = "interrupted"
    """The run was stopped from outside."""


@dataclass(frozen=True)
class StabilityRule:
    """Settings of the stopping rule: the one home of their defaults and checks.

    :class:`~lightning_fisher.FisherStability`, :func:`~lightning_fisher.analyze` and
    ``lightning-fisher analyze`` take their defaults from these fields; ``metadata["flag"]`` is
    the command-line flag.

    Args:
        patience: consecutive batches the correlation must stay at or above ``threshold``.
        threshold: split-half Spearman correlation that counts as stable.
        min_batches: never stop before this many batches.
        max_batches: always stop after this many batches (``None``: only when data runs out).
    """

    patience: int = field(
        default=5, metadata={"flag": "convergence_patience", "help": "Stop when the ranking is stable for this many batches."}
    )
    threshold: float = field(
        default=0.9, metadata={"flag": "stability_threshold", "help": "Split-half Spearman correlation counted as stable."}
    )
    min_batches: int = field(default=5, metadata={"flag": "min_batches", "help": "Never stop before this many batches."})
    max_batches: Optional[int] = field(
        default=200, metadata={"flag": "max_batches", "help": "Stop after this many batches regardless."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise SettingsError(
                f"patience (convergence_patience): must be a positive integer, got {self.patience!r}", field="patience"
            )
        # A negative threshold would count halves that rank the modules in opposite orders as stable.
        threshold = self.threshold
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise SettingsError(
                f"threshold (stability_threshold): must be a split-half correlation in [0, 1], got {threshold!r}; "
                "below 0 the rule would count halves that disagree as stable (0.9 by default)",
                field="threshold",
            )
        if isinstance(self.min_batches, bool) or not isinstance(self.min_batches, int) or self.min_batches < 0:
            raise SettingsError(f"min_batches: must be a non-negative integer, got {self.min_batches!r}", field="min_batches")
        if self.max_batches is not None:
            if isinstance(self.max_batches, bool) or not isinstance(self.max_batches, int) or self.max_batches < 1:
                raise SettingsError(
                    f"max_batches: must be a positive integer or None, got {self.max_batches!r}", field="max_batches"
                )
            if self.max_batches < self.min_batches:
                raise SettingsError(
                    f"max_batches ({self.max_batches}) is smaller than min_batches ({self.min_batches})", field="max_batches"
                )


    @property
    def convergence_patience(self) -> int:
        """``patience`` under its command-line name (``StabilityRule(convergence_patience=...)`` works too)."""
        return self.patience

    @property
    def stability_threshold(self) -> float:
        """``threshold`` under its command-line name (``StabilityRule(stability_threshold=...)`` works too)."""
        return self.threshold


# The command line's names work in Python too.
StabilityRule.__init__ = other_spellings(  # type: ignore[method-assign]
    convergence_patience="patience", stability_threshold="threshold"
)(StabilityRule.__init__)

#: The stopping options that ``analyze`` takes one by one beside ``stopping=`` (the command line's names).
STOPPING_OPTIONS = ("convergence_patience", "stability_threshold", "min_batches", "max_batches")


@dataclass
class StabilityTracker:
    """Counts stable batches and says when to stop.

    Feed it one correlation per batch with :meth:`update`; it returns a :class:`StopReason`
    once the analysis should end, else ``None``.
    """

    rule: StabilityRule = field(default_factory=StabilityRule)
    batches: int = 0
    stable_batches: int = 0
    history: list = field(default_factory=list)
    reason: Optional[StopReason] = None

    def update(self, correlation: Optional[float]) -> Optional[StopReason]:
        """Record the correlation after one more batch; return why to stop, if it is time."""
        self.batches += 1
        self.history.append(correlation)
        if correlation is not None and correlation >= self.rule.threshold:
            self.stable_batches += 1
        else:
            self.stable_batches = 0
        if self.stable_batches >= self.rule.patience and self.batches >= self.rule.min_batches:
            self.reason = StopReason.CONVERGED
        elif self.rule.max_batches is not None and self.batches >= self.rule.max_batches:
            self.reason = StopReason.MAX_BATCHES
        return self.reason

    @property
    def last_correlation(self) -> Optional[float]:
        """The most recent correlation, ``None`` before the first batch."""
        return self.history[-1] if self.history else None
