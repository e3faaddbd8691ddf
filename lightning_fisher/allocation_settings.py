"""The allocation settings: one object holds every option of the rank allocation, its default,
its help text and its check.

:class:`AllocationSettings` is what :func:`~lightning_fisher.allocate_ranks`,
:meth:`FisherMap.from_scores <lightning_fisher.FisherMap.from_scores>`,
:class:`~lightning_fisher.FisherAnalysisModule`, :func:`~lightning_fisher.analyze`, the
``lightning-fisher analyze`` command line and the wizard read their defaults from; the map's
``budget`` record extends it (:class:`~lightning_fisher.fisher_map.RankBudget`). A new
allocation option is one new field here: its ``metadata`` gives the command-line flag and help,
and :meth:`AllocationSettings.__post_init__` its check.

Like PEFT's ``LoraConfig``, the object validates itself when it is built, so a bad setting fails
before a long analysis starts, once, with the field's name in the message.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, TypeVar

from lightning_fisher.errors import SettingsError

__all__ = ["ALLOCATION_MODES", "CRITERIA", "AllocationSettings", "allocation_from_options", "resolve_settings"]

ALLOCATION_MODES = ("median", "budget")
CRITERIA = ("trace", "spectrum")

_S = TypeVar("_S")


@dataclass(frozen=True)
class AllocationSettings:
    """How per-module scores become adapter ranks (see :mod:`lightning_fisher.allocation`).

    Args:
        rank: the median rank (``mode="median"``) or the flat rank whose parameter count is
            matched (``mode="budget"``); must lie in ``[rank_min, rank_max]``.
        rank_min: smallest rank any adapted module gets.
        rank_max: largest rank any adapted module gets.
        mode: ``"median"`` or ``"budget"``.
        score_power: exponent of the score-to-rank rule (``0.5``: 4x the score, 2x the rank).
        exclude_threshold: modules scoring below this fraction of the median positive score get
            no adapter; ``0`` keeps every module with a positive score.
        criterion: ``"trace"`` (score-to-rank rule above; the original feature's behaviour) or
            ``"spectrum"`` (greedy by gain per parameter from the mean gradient's singular
            values above their noise floor; see :mod:`lightning_fisher.spectrum_allocation`).
            ``score_power`` and ``exclude_threshold`` apply to ``"trace"`` only.

    Raises:
        SettingsError: (a ``ValueError``) naming the offending field, when a value is out of range.
    """

    rank: int = field(
        default=64,
        metadata={"flag": "rank", "help": "Target median rank (flat-equivalent rank with --rank_mode budget)."},
    )
    rank_min: int = field(default=16, metadata={"flag": "rank_min", "help": "Minimum rank of an adapted module."})
    rank_max: int = field(default=128, metadata={"flag": "rank_max", "help": "Maximum rank of an adapted module."})
    mode: Literal["median", "budget"] = field(
        default="median",
        metadata={
            "flag": "rank_mode",
            "help": "median: --rank is the median rank; budget: total LoRA parameters equal flat LoRA at --rank.",
        },
    )
    score_power: float = field(default=0.5, metadata={"flag": "score_power", "help": "Rank grows as score ** score_power."})
    exclude_threshold: float = field(
        default=0.05,
        metadata={"flag": "exclude_threshold", "help": "No adapter below this fraction of the median score."},
    )
    criterion: Literal["trace", "spectrum"] = field(
        default="trace",
        metadata={
            "flag": "criterion",
            "help": "trace: rank grows with the module's Fisher trace per parameter (score_power, exclude_threshold); "
            "spectrum: rank units go by gain per parameter, the squared singular values of the mean gradient "
            "above their noise floor (modules with none get no adapter).",
        },
    )

    def __post_init__(self) -> None:
        for name in ("rank", "rank_min", "rank_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name}: must be a positive integer, got {value!r}", field=name)
        if self.rank_min > self.rank_max:
            raise SettingsError(f"rank_min ({self.rank_min}) is greater than rank_max ({self.rank_max})", field="rank_min")
        if not self.rank_min <= self.rank <= self.rank_max:
            # The bound in the way is often a default the caller never set: say so, and which to change.
            bound, more = ("rank_min", "or less") if self.rank < self.rank_min else ("rank_max", "or more")
            value = getattr(self, bound)
            default = " (the default)" if value == AllocationSettings.__dataclass_fields__[bound].default else ""
            raise SettingsError(
                f"rank ({self.rank}) must lie within [rank_min, rank_max] = [{self.rank_min}, {self.rank_max}]: "
                f"{bound} is {value}{default}; pass {bound}={self.rank} {more} with it "
                f"(--{bound.replace('_', '-')} {self.rank} on the command line)",
                field="rank",
            )
        if self.mode not in ALLOCATION_MODES:
            raise SettingsError(f"mode: must be one of {', '.join(ALLOCATION_MODES)}, got {self.mode!r}", field="mode")
        power = self.score_power
        if isinstance(power, bool) or not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
            raise SettingsError(f"score_power: must be a positive number, got {power!r}", field="score_power")
        if self.criterion not in CRITERIA:
            raise SettingsError(f"criterion: must be one of {', '.join(CRITERIA)}, got {self.criterion!r}", field="criterion")
        threshold = self.exclude_threshold
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
            raise SettingsError(f"exclude_threshold: must be in [0, 1), got {threshold!r}", field="exclude_threshold")

    def describe(self) -> str:
        """One line for people: ``rank 8, min 2, max 32, mode budget`` (plus ``, criterion spectrum``)."""
        text = f"rank {self.rank}, min {self.rank_min}, max {self.rank_max}, mode {self.mode}"
        return text if self.criterion == "trace" else f"{text}, criterion {self.criterion}"

    def flags(self) -> dict[str, Any]:
        """``{command-line flag / YAML key: value}``, e.g. ``{"rank_mode": "median", ...}``."""
        return {f.metadata["flag"]: getattr(self, f.name) for f in AllocationSettings.fields()}

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], base: Optional["AllocationSettings"] = None) -> "AllocationSettings":
        """Settings from ``{flag: value}`` (a YAML config's keys); fields not given come from ``base``.

        Raises:
            SettingsError: naming the field, when a value is out of range.
        """
        by_flag = {f.metadata["flag"]: f.name for f in AllocationSettings.fields()}
        given = {by_flag[key]: value for key, value in values.items() if key in by_flag}
        return dataclasses.replace(base if base is not None else cls(), **given)

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        """The settings' fields (with ``metadata["flag"]`` and ``metadata["help"]``), in order."""
        return tuple(f for f in dataclasses.fields(cls) if f.name in _ALLOCATION_FIELD_NAMES)

    def as_dict(self) -> dict[str, Any]:
        """``{field: value}`` for the allocation fields only (a subclass's extra fields left out)."""
        return {f.name: getattr(self, f.name) for f in AllocationSettings.fields()}

    def settings(self) -> "AllocationSettings":
        """These settings as a plain :class:`AllocationSettings` (drops a subclass's extra fields)."""
        return AllocationSettings(**self.as_dict())


_ALLOCATION_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(AllocationSettings))


def resolve_settings(cls: type[_S], given: Optional[_S], options: Mapping[str, Any], *, owner: str) -> _S:
    """The settings object for a call that takes both a settings object and individual options.

    Functions such as :func:`~lightning_fisher.analyze` keep their individual keyword options
    (``rank=``, ``rank_min=``, ...), whose defaults are the fields' defaults, and also take the
    whole object. Without an object the options build one (and it checks itself, once). With an
    object, an option set to anything but its default is refused: which one should win would
    be a guess.

    Args:
        cls: the settings class.
        given: the object the caller passed, or ``None``.
        options: ``{field name: value}`` of the individual options.
        owner: the function's name, for the error message.

    Raises:
        TypeError: both an object and non-default individual options were given.
        ValueError: from the settings' own check, naming the field.
    """
    if given is None:
        return cls(**options)
    if not isinstance(given, cls):
        raise TypeError(f"{owner}: expected a {cls.__name__}, got {type(given).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    changed = sorted(name for name, value in options.items() if value != defaults[name])
    if changed:
        raise TypeError(
            f"{owner}: give either a {cls.__name__} or the individual options ({', '.join(changed)}), "
            f"not both; e.g. dataclasses.replace(settings, {changed[0]}=...)"
        )
    return given


def allocation_from_options(
    given: Optional[AllocationSettings], owner: str, rank: int, rank_min: int, rank_max: int, mode: str,
    score_power: float, exclude_threshold: float,
) -> AllocationSettings:
    """:func:`resolve_settings` for the six allocation options, in the order the signatures list them."""
    options = dict(rank=rank, rank_min=rank_min, rank_max=rank_max, mode=mode, score_power=score_power,
                   exclude_threshold=exclude_threshold)
    return resolve_settings(AllocationSettings, given, options, owner=owner)
