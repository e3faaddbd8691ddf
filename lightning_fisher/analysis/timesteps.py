"""Timestep focus: which part of a diffusion / flow-matching schedule the analysis listens to.

The protocol is one attribute. A model whose ``training_step`` samples diffusion or flow time
exposes the sampler it uses as ``timestep_sampler``::

    class MyFlowModel(LightningModule):
        def __init__(self):
            super().__init__()
            self.timestep_sampler = UniformTimestepSampler()   # or any callable below

        def training_step(self, batch, batch_idx):
            x0 = batch["x"]
            t = self.timestep_sampler(x0.shape[0], x0.device)   # shape [B], values in [0, 1]
            ...

``timestep_sampler(batch_size, device)`` returns a float tensor of shape ``[batch_size]`` with
values in ``[0, 1]``, where ``t = 0`` is clean data and ``t = 1`` is pure noise (rectified-flow
convention; a DDPM model maps ``t`` to its integer steps itself). It must draw from torch's
global random generator (or one it seeds from it) so that the analysis seed fixes it.

During the analysis, :func:`timestep_focus_applied` swaps the attribute for a sampler that
draws ``t`` uniformly from the focus range, and restores the model's own sampler afterwards,
even on error. ``balanced`` keeps the model's own sampler (its training distribution) and only
records what it draws. Models without the attribute run unchanged; asking them for a
non-balanced focus warns, because there is nothing to focus.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol, Union, runtime_checkable

import torch

__all__ = [
    "FOCUS_RANGES",
    "TIMESTEP_SAMPLER_ATTRIBUTE",
    "LogitNormalTimestepSampler",
    "RecordingTimestepSampler",
    "TimestepFocus",
    "TimestepSampler",
    "UniformTimestepSampler",
    "timestep_focus_applied",
]

TIMESTEP_SAMPLER_ATTRIBUTE = "timestep_sampler"

#: Named focus presets (from Side-Step's Preprocessing++): texture is the low-noise end, structure the high-noise end.
FOCUS_RANGES: dict[str, Optional[tuple[float, float]]] = {
    "balanced": None,
    "texture": (0.0, 0.4),
    "structure": (0.6, 1.0),
}

FOCUS_HELP = {
    "balanced": "the model's own training distribution of timesteps (recommended for most uses)",
    "texture": "low-noise end, t in [0, 0.4]: timbre, fine detail, sound design (style transfer)",
    "structure": "high-noise end, t in [0.6, 1.0]: rhythm, layout, composition",
    "custom": "your own range 'LO,HI' with 0 <= LO < HI <= 1",
}


@runtime_checkable
class TimestepSampler(Protocol):
    """What ``model.timestep_sampler`` must be: ``sampler(batch_size, device) -> Tensor[batch_size]``."""

    def __call__(self, batch_size: int, device: Union[torch.device, str, None] = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class TimestepFocus:
    """A parsed ``timestep_focus`` setting.

    Args:
        name: ``balanced``, ``texture``, ``structure`` or ``custom``.
        range: ``(lo, hi)`` within ``[0, 1]``; ``None`` for ``balanced``.
    """

    name: str
    range: Optional[tuple[float, float]] = None

    @classmethod
    def parse(cls, value: Union[str, "TimestepFocus", tuple, list]) -> "TimestepFocus":
        """Parse ``balanced`` / ``texture`` / ``structure`` / ``"LO,HI"`` (or a 2-tuple).

        Raises:
            ValueError: naming ``timestep_focus`` and the accepted values.
        """
        if isinstance(value, TimestepFocus):
            return value
        if isinstance(value, (tuple, list)):
            return cls._custom(value, str(value))
        if not isinstance(value, str):
            raise ValueError(f"timestep_focus must be a string, got {type(value).__name__}")
        text = value.strip().lower()
        if text in FOCUS_RANGES:
            return cls(text, FOCUS_RANGES[text])
        if "," in text:
            return cls._custom(text.split(","), value)
        raise ValueError(
            f"timestep_focus={value!r} is not one of balanced, texture, structure, or a range 'LO,HI' "
            "such as '0.2,0.5'"
        )

    @classmethod
    def _custom(cls, parts, original: str) -> "TimestepFocus":
        try:
            lo, hi = (float(p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(
                f"timestep_focus={original!r}: a custom range is two numbers 'LO,HI', e.g. '0.2,0.5'"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
            raise ValueError(f"timestep_focus={original!r}: need 0 <= LO < HI <= 1, got LO={lo}, HI={hi}")
        for name, preset in FOCUS_RANGES.items():
            if preset == (lo, hi):
                return cls(name, preset)
        return cls("custom", (lo, hi))

    def __str__(self) -> str:
        if self.name == "custom":
            assert self.range is not None
            return f"{self.range[0]:g},{self.range[1]:g}"
        return self.name

    def describe(self) -> str:
        """For people: ``balanced``, ``texture (t in [0, 0.4])``, ``0.2,0.5 (t in [0.2, 0.5])``."""
        if self.range is None:
            return str(self)
        return f"{self} (t in [{self.range[0]:g}, {self.range[1]:g}])"


class UniformTimestepSampler:
    """``t ~ U(lo, hi)`` from torch's global generator.

    Args:
        lo: lower end of the range, in ``[0, 1]``.
        hi: upper end of the range, in ``(lo, 1]``.
    """

    def __init__(self, lo: float = 0.0, hi: float = 1.0) -> None:
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"UniformTimestepSampler needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        self.lo = float(lo)
        self.hi = float(hi)

    def __call__(self, batch_size: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.rand(batch_size, device=device)

    def __repr__(self) -> str:
        return f"UniformTimestepSampler(lo={self.lo:g}, hi={self.hi:g})"


class LogitNormalTimestepSampler:
    """``t = sigmoid(n)``, ``n ~ N(mean, std)``, from torch's global generator.

    The timestep distribution of Stable Diffusion 3 style rectified-flow training: more
    weight in the middle of the schedule than :class:`UniformTimestepSampler`. Follows the
    :class:`TimestepSampler` protocol, with values in ``(0, 1)``.

    Args:
        mean: location of ``n``.
        std: scale of ``n`` (positive).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not std > 0.0:
            raise ValueError(f"LogitNormalTimestepSampler needs std > 0, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def __call__(self, batch_size: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        return torch.sigmoid(self.mean + self.std * torch.randn(batch_size, device=device))

    def __repr__(self) -> str:
        return f"LogitNormalTimestepSampler(mean={self.mean:g}, std={self.std:g})"


class RecordingTimestepSampler:
    """Delegates to another sampler and records the range and count of what it returned."""

    def __init__(self, sampler: Callable[..., torch.Tensor]) -> None:
        self.sampler = sampler
        self.count = 0
        self.minimum = math.inf
        self.maximum = -math.inf

    def __call__(self, batch_size: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        t = self.sampler(batch_size, device)
        if t.numel():
            detached = t.detach()
            self.minimum = min(self.minimum, float(detached.min()))
            self.maximum = max(self.maximum, float(detached.max()))
            self.count += t.numel()
        return t

    @property
    def observed_range(self) -> Optional[tuple[float, float]]:
        """``(min, max)`` of the timesteps drawn so far, ``None`` before the first draw."""
        return (self.minimum, self.maximum) if self.count else None


@contextlib.contextmanager
def timestep_focus_applied(
    model: torch.nn.Module, focus: Union[str, TimestepFocus]
) -> Iterator[Optional[RecordingTimestepSampler]]:
    """Swap ``model.timestep_sampler`` for the focused one for the duration of the block.

    Yields the recording sampler in place (``None`` when the model has no sampler), so the
    caller can read what was actually drawn. The model's own sampler is restored on exit.
    """
    focus = TimestepFocus.parse(focus)
    original = getattr(model, TIMESTEP_SAMPLER_ATTRIBUTE, None)
    if original is None:
        if focus.name != "balanced":
            warnings.warn(
                f"timestep_focus={str(focus)!r} was asked for, but {type(model).__name__} has no "
                f"`{TIMESTEP_SAMPLER_ATTRIBUTE}` attribute, so the analysis runs on the model's own "
                "inputs unchanged. Diffusion / flow-matching models expose their sampler as "
                "`self.timestep_sampler` (see lightning_fisher.analysis.timesteps).",
                UserWarning,
                stacklevel=3,
            )
        yield None
        return
    if not callable(original):
        raise TypeError(
            f"{type(model).__name__}.{TIMESTEP_SAMPLER_ATTRIBUTE} must be callable "
            f"(batch_size, device) -> Tensor, got {type(original).__name__}"
        )
    inner = original if focus.range is None else UniformTimestepSampler(*focus.range)
    recorder = RecordingTimestepSampler(inner)
    setattr(model, TIMESTEP_SAMPLER_ATTRIBUTE, recorder)
    try:
        yield recorder
    finally:
        setattr(model, TIMESTEP_SAMPLER_ATTRIBUTE, original)
