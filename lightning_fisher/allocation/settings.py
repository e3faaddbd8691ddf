"""The allocation settings: one object holds every option of the rank allocation, its default,
its help text and its check.

:class:`AllocationSettings` is what :func:`~lightning_fisher.allocate_ranks`,
:meth:`FisherMap.from_scores <lightning_fisher.FisherMap.from_scores>`,
:class:`~lightning_fisher.FisherAnalysisModule`, :func:`~lightning_fisher.analyze`, the
``lightning-fisher analyze`` command line and the wizard read their defaults from; the map's
``budget`` record extends it (:class:`~lightning_fisher.fisher_map.map.RankBudget`). A new
allocation option is one new field here: its ``metadata`` gives the command-line flag and help,
and :meth:`AllocationSettings.__post_init__` its check.

Like PEFT's ``LoraConfig``, the object validates itself when it is built, so a bad setting fails
before a long analysis starts, once, with the field's name in the message.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, TypeVar

from lightning_fisher.errors import SettingsError
from lightning_fisher.wording import a_or_an

__all__ = ["ALLOCATION_MODES", "CRITERIA", "AllocationSettings", "allocation_from_options", "field_help",
           "other_spellings", "resolve_settings", "settings_or_options"]

ALLOCATION_MODES = ("median", "budget")
#: The built-in criteria's names; every registered one is ``lightning_fisher.allocation.criteria.criterion_names()``.
CRITERIA = ("trace", "spectrum")

_S = TypeVar("_S")
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class AllocationSettings:
    """How per-module scores become adapter ranks (see :mod:`lightning_fisher.allocation.trace_rule`).

    Args:
        rank: the median rank (``mode="median"``) or the flat rank whose parameter count is
            matched (``mode="budget"``); must lie in ``[rank_min, rank_max]``.
        rank_min: smallest rank any adapted module gets.
        rank_max: largest rank any adapted module gets.
        mode: ``"median"`` or ``"budget"``.
        score_power: exponent of the score-to-rank rule (``0.5``: 4x the score, 2x the rank).
        exclude_threshold: modules scoring below this fraction of the median positive score get
            no adapter; ``0`` keeps every module with a positive score.
        criterion: the name of a registered criterion (:mod:`lightning_fisher.allocation.criteria`):
            ``"trace"`` (score-to-rank rule above, as in Side-Step's Preprocessing++) or
            ``"spectrum"`` (greedy by gain per parameter from the mean gradient's singular
            values above their noise floor; see :mod:`lightning_fisher.allocation.spectrum_rule`).
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
    criterion: str = field(
        default="trace",
        metadata={
            "flag": "criterion",
            # the registered criteria's own help, read when the help is shown (see _criterion_help)
            "help": lambda: _criterion_help(),
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
        # Imported here: the criteria import the allocators, which import this module.
        from lightning_fisher.allocation.criteria.registry import criterion_names, is_registered

        if not isinstance(self.criterion, str) or not is_registered(self.criterion):
            raise SettingsError(
                f"criterion: must be one of {', '.join(criterion_names())}, got {self.criterion!r} (a criterion of "
                "your own is registered first: lightning_fisher.allocation.criteria.register_criterion)",
                field="criterion",
            )
        threshold = self.exclude_threshold
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
            raise SettingsError(f"exclude_threshold: must be in [0, 1), got {threshold!r}", field="exclude_threshold")

    @property
    def rank_mode(self) -> str:
        """``mode`` under its command-line name (``AllocationSettings(rank_mode=...)`` works too)."""
        return self.mode

    def describe(self) -> str:
        """One line for people: ``rank 8, min 2, max 32, mode budget`` (plus ``, criterion spectrum``)."""
        text = f"rank {self.rank}, min {self.rank_min}, max {self.rank_max}, mode {self.mode}"
        return text if self.criterion == _DEFAULT_CRITERION else f"{text}, criterion {self.criterion}"

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
_DEFAULT_CRITERION = AllocationSettings.criterion


def field_help(setting: dataclasses.Field) -> str:
    """A settings field's help text (the criterion's is read from the registry when asked, so
    ``--help`` lists every registered criterion)."""
    text = setting.metadata["help"]
    return text() if callable(text) else text


def _criterion_help() -> str:
    from lightning_fisher.allocation.criteria import criterion_named, criterion_names

    return "; ".join(f"{name}: {criterion_named(name).help}" for name in criterion_names()) + "."


def other_spellings(*, in_signature: bool = False, **spellings: str) -> Callable[[_F], _F]:
    """Accept an option under another spelling: ``@other_spellings(rank_mode="mode")``.

    One name per option across Python, YAML and the command line: the command line's names
    (``rank_mode``, ``convergence_patience``, ``stability_threshold``) work in every Python
    call, and the older Python spellings (``mode``, ``patience``, ``threshold``) keep working
    where they were accepted. Giving both spellings of one option is refused. Outermost of a
    function's decorators, so the others see the parameter's own name.

    Args:
        in_signature: also list the other spellings in the function's signature (keyword-only,
            with the parameter's type and default), so that jsonargparse, and with it a
            LightningCLI YAML config, accepts them. jsonargparse passes every parameter it knows,
            its default included, so there a spelling left at the default gives way to the
            other: only two different values that both differ from the default are refused.
        spellings: ``{other spelling: the parameter's name}``.
    """

    def decorate(function: _F) -> _F:
        owner = function.__qualname__.replace(".__init__", "")
        signature = inspect.signature(function)

        @functools.wraps(function)
        def accepting(*args: Any, **kwargs: Any) -> Any:
            for spelling, name in spellings.items():
                if spelling in kwargs and name in kwargs:
                    value, default = kwargs[spelling], signature.parameters[name].default
                    if in_signature and kwargs[name] in (value, default):
                        del kwargs[name]
                    elif in_signature and value == default:
                        del kwargs[spelling]
                    else:
                        raise TypeError(f"{owner}: {spelling} and {name} are one option; give it once")
                if spelling in kwargs:
                    kwargs[name] = kwargs.pop(spelling)
            return function(*args, **kwargs)

        if in_signature:
            extra = [signature.parameters[name].replace(name=spelling, kind=inspect.Parameter.KEYWORD_ONLY)
                     for spelling, name in spellings.items()]
            accepting.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore[attr-defined]
        return accepting  # type: ignore[return-value]

    return decorate


# The command line's name works in Python too.
AllocationSettings.__init__ = other_spellings(rank_mode="mode")(AllocationSettings.__init__)  # type: ignore[method-assign]


def settings_or_options(settings: str, cls: type, options: Sequence[str]) -> Callable[[_F], _F]:
    """Refuse a call that passes the settings object ``settings`` and any of ``options`` explicitly.

    Functions such as :func:`~lightning_fisher.analyze` take a whole settings object and also
    its options one by one. Given both, which should win would be a guess, so the call is
    refused whenever one of the options is *passed*, whatever its value (``rank=8`` beside
    ``AllocationSettings(rank=8)`` as much as ``rank=64``): the arguments are bound to the
    signature, so positional ones count too. The signature (and its defaults) stays the
    function's own, for ``help()`` and for jsonargparse.

    Args:
        settings: the parameter that takes the object (e.g. ``"allocation"``).
        cls: its class, named in the message.
        options: the parameters that are fields of it (e.g. ``("rank", "rank_mode")``).
    """

    def decorate(function: _F) -> _F:
        signature = inspect.signature(function)
        owner = function.__qualname__.replace(".__init__", "")

        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            passed = signature.bind_partial(*args, **kwargs).arguments
            if passed.get(settings) is not None:
                both = [name for name in options if name in passed]
                if both:
                    raise TypeError(
                        f"{owner}: give either {a_or_an(cls.__name__)} ({settings}=) or the individual "
                        f"options ({', '.join(both)}), not both; e.g. {settings}=dataclasses.replace({settings}, ...). "
                        f"In a YAML config (LightningCLI passes every option) give the options one by one, not {settings}:"
                    )
            return function(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


#: The allocation options that functions take one by one beside ``allocation=`` (``rank_mode``
#: is the ``mode`` field, as the command line spells it).
ALLOCATION_OPTIONS = ("rank", "rank_min", "rank_max", "rank_mode", "mode", "score_power", "exclude_threshold",
                      "criterion")


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
        raise TypeError(f"{owner}: expected {a_or_an(cls.__name__)}, got {type(given).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    changed = sorted(name for name, value in options.items() if value != defaults[name])
    if changed:
        raise TypeError(
            f"{owner}: give either {a_or_an(cls.__name__)} or the individual options ({', '.join(changed)}), "
            f"not both; e.g. dataclasses.replace(settings, {changed[0]}=...)"
        )
    return given


def allocation_from_options(
    given: Optional[AllocationSettings], owner: str, rank: int, rank_min: int, rank_max: int, mode: str,
    score_power: float, exclude_threshold: float, criterion: str = AllocationSettings.criterion,
) -> AllocationSettings:
    """:func:`resolve_settings` for the allocation options, in the order the signatures list them."""
    options = dict(rank=rank, rank_min=rank_min, rank_max=rank_max, mode=mode, score_power=score_power,
                   exclude_threshold=exclude_threshold, criterion=criterion)
    return resolve_settings(AllocationSettings, given, options, owner=owner)
