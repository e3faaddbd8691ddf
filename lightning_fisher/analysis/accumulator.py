"""Running per-module Fisher statistics over samples, split into two independent halves.

:class:`FisherAccumulator` keeps, per module, the sum and the sum of squares of the
per-sample Fisher values the collector produces: a few numbers per module, never anything
parameter-sized. Every sample is assigned to one of two halves by the parity of its running
index (the number of samples passed to :meth:`FisherAccumulator.update` before it, counting
skipped ones), so that a stability rule can compare two independent estimates.

All state is one flat float64 tensor (:meth:`FisherAccumulator.state_tensor`) whose entries
are plain sums, so combining processes is one ``all_reduce(SUM)``::

    merged = FisherAccumulator.from_state_tensor(names, all_reduce(acc.state_tensor(device)))

Layout of the state tensor (``M`` modules): ``sum[2, M]``, ``sumsq[2, M]``, ``count[2]``,
``skipped``, ``batches``.

The variance comes from ``sumsq - n * mean**2``; with float64 that loses precision only when
the spread of a module's values is below about 1e-7 of their mean, far below what matters
for ranking modules.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.wording import plural

__all__ = ["FisherAccumulator"]


class FisherAccumulator:
    """Per-module sums of per-sample Fisher values, in two halves.

    Args:
        names: module names, in the row order of the values passed to :meth:`update`.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise FisherAnalysisError("FisherAccumulator names must be unique")
        m = len(self.names)
        self._sum = torch.zeros(2, m, dtype=torch.float64)
        self._sumsq = torch.zeros(2, m, dtype=torch.float64)
        self._count = torch.zeros(2, dtype=torch.float64)
        self._skipped = 0.0
        self._batches = 0.0

    # ----------------------------------------------------------------- updating

    def update(self, values: torch.Tensor, finite: Optional[torch.Tensor] = None) -> None:
        """Add one batch of per-sample values.

        A sample is used only if ``finite`` allows it and all its values are finite; other
        samples are counted as skipped. Skipped samples still take their parity slot, so the
        half a sample lands in depends only on its position in the stream.

        Args:
            values: ``[M, B]`` per-module, per-sample Fisher values (any float dtype/device).
            finite: optional ``[B]`` boolean mask of samples to use.
        """
        values = values.detach().to("cpu", torch.float64)
        if values.dim() != 2 or values.shape[0] != len(self.names):
            raise FisherAnalysisError(
                f"values must have shape [{len(self.names)}, batch] (one row per module), got {tuple(values.shape)}"
            )
        batch = values.shape[1]
        use = torch.isfinite(values).all(dim=0)
        if finite is not None:
            finite = finite.detach().to("cpu", torch.bool).reshape(-1)
            if finite.numel() != batch:
                raise FisherAnalysisError(f"finite mask has {finite.numel()} entries for a batch of {batch}")
            use &= finite
        # torch.where, not multiplication: 0 * nan is nan.
        clean = torch.where(use, values, torch.zeros((), dtype=torch.float64))
        half = (self.samples_seen + torch.arange(batch)) % 2
        for h in (0, 1):
            mask = use & (half == h)
            part = clean[:, mask]
            self._sum[h] += part.sum(dim=1)
            self._sumsq[h] += part.square().sum(dim=1)
            self._count[h] += float(mask.sum())
        self._skipped += float(batch - int(use.sum()))
        self._batches += 1.0

    # ------------------------------------------------------------ distributed

    def state_tensor(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """All state as one flat float64 tensor of sums, ready for ``all_reduce(SUM)``.

        Args:
            device: where to put the tensor (e.g. the process's CUDA device for NCCL).
        """
        extra = torch.tensor([self._skipped, self._batches], dtype=torch.float64)
        flat = torch.cat([self._sum.reshape(-1), self._sumsq.reshape(-1), self._count, extra])
        return flat if device is None else flat.to(device)

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace all state with a tensor from :meth:`state_tensor` (possibly summed over processes).

        Args:
            state: flat tensor of length ``4 * M + 4``.
        """
        m = len(self.names)
        state = state.detach().to("cpu", torch.float64).reshape(-1)
        if state.numel() != 4 * m + 4:
            raise FisherAnalysisError(
                f"state tensor has {state.numel()} entries; {4 * m + 4} expected for {m} modules "
                "(was it made by an accumulator with different module names?)"
            )
        self._sum = state[: 2 * m].reshape(2, m).clone()
        self._sumsq = state[2 * m : 4 * m].reshape(2, m).clone()
        self._count = state[4 * m : 4 * m + 2].clone()
        self._skipped = float(state[4 * m + 2])
        self._batches = float(state[4 * m + 3])

    @classmethod
    def from_state_tensor(cls, names: Sequence[str], state: torch.Tensor) -> "FisherAccumulator":
        """A new accumulator holding ``state`` (see :meth:`load_state_tensor`).

        Args:
            names: module names, the same as the accumulator(s) that made ``state``.
            state: flat state tensor.
        """
        acc = cls(names)
        acc.load_state_tensor(state)
        return acc

    # ---------------------------------------------------------------- reading

    @property
    def num_samples(self) -> int:
        """Finite samples accumulated."""
        return int(self._count.sum())

    @property
    def num_skipped(self) -> int:
        """Samples skipped because a value was non-finite or ``finite`` was False."""
        return int(self._skipped)

    @property
    def num_batches(self) -> int:
        """Calls to :meth:`update` (summed over processes after a merge)."""
        return int(self._batches)

    @property
    def samples_seen(self) -> int:
        """All samples passed to :meth:`update`, finite or not."""
        return self.num_samples + self.num_skipped

    def _require_samples(self) -> float:
        n = float(self._count.sum())
        if n == 0:
            raise FisherAnalysisError(
                f"no finite per-sample gradients in {plural(self.num_batches, 'batch')} "
                f"({plural(self.num_skipped, 'sample')} skipped as non-finite); check the loss for nan/inf "
                "and that the analysis ran at least one batch"
            )
        return n

    def score_tensor(self) -> torch.Tensor:
        """``[M]`` mean Fisher value per module over all finite samples.

        Raises:
            FisherAnalysisError: no finite sample has been accumulated.
        """
        n = self._require_samples()
        return self._sum.sum(dim=0) / n

    def scores(self) -> dict[str, float]:
        """Mean Fisher value per module over all finite samples, by module name.

        Raises:
            FisherAnalysisError: no finite sample has been accumulated.
        """
        return dict(zip(self.names, self.score_tensor().tolist()))

    def stderr(self) -> dict[str, float]:
        """Standard error of each module's mean: ``sqrt(sample variance / n)``.

        With fewer than two finite samples the spread is unknown and every entry is ``nan``
        (so a rule such as ``stderr < tol`` never passes on it).

        Raises:
            FisherAnalysisError: no finite sample has been accumulated.
        """
        n = self._require_samples()
        if n < 2:
            return {name: math.nan for name in self.names}
        total = self._sum.sum(dim=0)
        centred = (self._sumsq.sum(dim=0) - total * total / n).clamp_min(0.0)
        err = torch.sqrt(centred / (n - 1) / n)
        return dict(zip(self.names, err.tolist()))

    def half_counts(self) -> torch.Tensor:
        """``[2]`` finite samples per half."""
        return self._count.clone()

    def half_scores(self) -> torch.Tensor:
        """``[2, M]`` mean Fisher value per half and module; ``nan`` for an empty half."""
        counts = self._count.unsqueeze(1)
        means = self._sum / counts.clamp_min(1.0)
        return torch.where(counts > 0, means, torch.full_like(means, math.nan))

    def __repr__(self) -> str:
        return (
            f"FisherAccumulator(modules={len(self.names)}, samples={self.num_samples}, "
            f"skipped={self.num_skipped}, batches={self.num_batches})"
        )
