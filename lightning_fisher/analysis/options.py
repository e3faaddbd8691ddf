"""The analysis options: what to analyse and how, the one home of their defaults and checks.

:class:`AnalysisOptions` sits beside :class:`~lightning_fisher.AllocationSettings` (how scores
become ranks) and :class:`~lightning_fisher.StabilityRule` (when to stop): which modules are
candidates, the timestep focus, how the loss is reduced, train or eval mode, the seed, and the
alpha policy recorded in the map. :func:`~lightning_fisher.analyze`,
:class:`~lightning_fisher.FisherAnalysisModule`, the plain loop, the
:class:`~lightning_fisher.analysis.session.AnalysisSession` and ``lightning-fisher analyze``
read their defaults from these fields (``metadata["flag"]`` is the command-line flag and YAML
key, ``metadata["help"]`` its help), so a new option is added once.

Like the other settings objects it checks itself when built, naming the field, so a bad value
fails before a long analysis starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from lightning_fisher.analysis.timesteps import FOCUS_HELP, TimestepFocus
from lightning_fisher.errors import SettingsError

__all__ = ["ANALYSIS_OPTIONS", "LOSS_REDUCTIONS", "AnalysisOptions", "options_from"]

LOSS_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class AnalysisOptions:
    """What the analysis measures and records, besides the allocation and the stopping rule.

    Args:
        include: name patterns of candidate modules (PEFT-style: a regex matching the full
            name, or a name suffix; a single string is one pattern); default every module of
            ``module_types``.
        exclude: name patterns to leave out (e.g. a freshly initialised head).
        module_types: candidate module classes; default ``nn.Linear``.
        timestep_focus: ``balanced``, ``texture``, ``structure`` or ``"LO,HI"`` (diffusion and
            flow models; see :mod:`lightning_fisher.analysis.timesteps`). Kept parsed, as a
            :class:`~lightning_fisher.analysis.timesteps.TimestepFocus`.
        loss_reduction: ``"mean"`` when the loss is the mean of per-sample losses, ``"sum"``
            for a sum.
        train_mode: analyse in train mode (dropout on); default eval mode.
        seed: seeds sample order, noise, timesteps and the spectrum's sketches, and is recorded
            in the map; ``None`` leaves the random state alone.
        lora_alpha: alpha at the base rank recorded in the map; default ``2 * rank``.
        use_rslora: record the rsLoRA alpha policy in the map.

    Raises:
        SettingsError: (a ``ValueError``) naming the offending field.
    """

    include: Optional[tuple[str, ...]] = field(
        default=None,
        metadata={"flag": "include",
                  "help": "Candidate module name patterns, comma-separated or a list (default: every nn.Linear)."},
    )
    exclude: tuple[str, ...] = field(
        default=(),
        metadata={"flag": "exclude",
                  "help": "Module name patterns to leave out, comma-separated or a list (e.g. a freshly initialised head)."},
    )
    module_types: Optional[tuple[type, ...]] = field(
        default=None, metadata={"flag": None, "help": "Candidate module classes (default nn.Linear)."}
    )
    timestep_focus: Union[str, TimestepFocus] = field(
        default="balanced",
        metadata={"flag": "timestep_focus",
                  "help": "Diffusion / flow models: " + "; ".join(f"{k}: {v}" for k, v in FOCUS_HELP.items()) + "."},
    )
    loss_reduction: Literal["mean", "sum"] = field(
        default="mean", metadata={"flag": "loss_reduction", "help": "The loss is the mean or the sum over samples."}
    )
    train_mode: bool = field(
        default=False, metadata={"flag": "train_mode", "help": "Analyse with dropout on (default: eval mode)."}
    )
    seed: Optional[int] = field(
        default=0, metadata={"flag": "seed", "help": "Seeds building the model, sample order, noise and timesteps."}
    )
    lora_alpha: Optional[float] = field(
        default=None, metadata={"flag": "lora_alpha", "help": "Alpha at the base rank recorded in the map (default 2 * rank)."}
    )
    use_rslora: bool = field(
        default=False, metadata={"flag": "use_rslora", "help": "Record the rsLoRA alpha policy in the map."}
    )

    def __post_init__(self) -> None:
        # Frozen: normalised values are set through object.__setattr__, once, here.
        set_ = object.__setattr__
        set_(self, "include", None if self.include is None else _patterns("include", self.include))
        set_(self, "exclude", _patterns("exclude", self.exclude))
        if self.module_types is not None:
            types = tuple(self.module_types) if isinstance(self.module_types, Sequence) else (self.module_types,)
            if not types or not all(isinstance(t, type) for t in types):
                raise SettingsError(
                    f"module_types: must be module classes such as torch.nn.Linear, got {self.module_types!r}",
                    field="module_types",
                )
            set_(self, "module_types", types)
        try:
            set_(self, "timestep_focus", TimestepFocus.parse(self.timestep_focus))
        except ValueError as error:
            raise SettingsError(str(error), field="timestep_focus") from None
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise SettingsError(
                f"loss_reduction: must be one of {', '.join(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}",
                field="loss_reduction",
            )
        if not isinstance(self.train_mode, bool):
            raise SettingsError(f"train_mode: must be True or False, got {self.train_mode!r}", field="train_mode")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SettingsError(f"seed: must be an integer or None, got {self.seed!r}", field="seed")
        alpha = self.lora_alpha
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0
        ):
            raise SettingsError(f"lora_alpha: must be a positive number or None, got {alpha!r}", field="lora_alpha")
        if not isinstance(self.use_rslora, bool):
            raise SettingsError(f"use_rslora: must be True or False, got {self.use_rslora!r}", field="use_rslora")

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        """The options' fields (``metadata["flag"]``: the command-line flag, ``None`` for none)."""
        return dataclasses.fields(cls)

    @classmethod
    def field(cls, name: str) -> dataclasses.Field:
        """The field ``name`` (its ``metadata["flag"]`` and ``metadata["help"]``).

        Raises:
            KeyError: no such option.
        """
        return {f.name: f for f in dataclasses.fields(cls)}[name]

    @property
    def candidate_selection(self) -> dict:
        """``include`` / ``exclude`` / ``module_types`` as keyword arguments of ``select_candidates``."""
        return dict(include=self.include, exclude=self.exclude, module_types=self.module_types)


def _patterns(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):  # one pattern (as PEFT's target_modules), not one per character
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise SettingsError(f"{name}: expected a list of name patterns (strings), got {value!r}", field=name)
    return tuple(value)


def options_from(given: Optional[AnalysisOptions], owner: str, **values: object) -> AnalysisOptions:
    """The options object of a call that takes ``options=`` and the options one by one.

    The call's :func:`~lightning_fisher.allocation.settings.settings_or_options` decorator has
    refused any individual option passed beside ``given``, so ``values`` are the signature's
    defaults then, and ``given`` wins.

    Raises:
        TypeError: ``given`` is not an :class:`AnalysisOptions`.
        SettingsError: from the options' own check, naming the field.
    """
    if given is None:
        return AnalysisOptions(**values)
    if not isinstance(given, AnalysisOptions):
        raise TypeError(f"{owner}: options must be an AnalysisOptions, got {type(given).__name__}")
    return given


#: The options that functions take one by one beside ``options=``.
ANALYSIS_OPTIONS = tuple(f.name for f in dataclasses.fields(AnalysisOptions))
