"""The wizard's decisions, without a terminal: one answer checked (each ``parse_*`` returns the value or raises
``ValueError`` with the reason shown before asking again), the questions a settings dataclass makes (one per
field with a flag: a new setting or criterion is asked with no change here), rank presets, the config YAML.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

import lightning_fisher
from lightning_fisher.allocation.settings import AllocationSettings, field_help
from lightning_fisher.cli.values import comma_list, parse_typed
from lightning_fisher.errors import DatasetFolderError
from lightning_fisher.analysis.options import AnalysisOptions
from lightning_fisher.analysis.stability import StabilityRule
from lightning_fisher.data.tensor_folder import TensorFolderDataset
from lightning_fisher.analysis.timesteps import TimestepFocus

__all__ = [
    "TypedQuestion", "WizardAnswers", "answers_to_config", "fit_command", "load_presets", "render_config",
    "setting_questions", "settings_flags",
]

DEMO_MODEL = "lightning_fisher.examples.text_classifier.MiniLMClassifier"
DATA_CLASS = "lightning_fisher.TensorDirectoryDataModule"
DEFAULT_BATCH_SIZE = 16
CONFIG_FILENAME = "fisher_analyze.yaml"
#: What ``fit`` needs for a model the user marked fragile (written into the config's comments).
FRAGILE_FIT_FLAGS = "--adaptive_lora.fragile true --adaptive_lora.allow_fragile true"
#: Where the demo model's adapters go, so its new head trains fully (as in configs/reviews_fit.yaml).
DEMO_ADAPTER_ROOT = "encoder"
#: Epochs in the fit command the wizard prints (Lightning's own default is 1000); edit as needed.
FIT_EPOCHS = 3


@dataclass(frozen=True)
class TypedQuestion:
    """A value asked by its type: a required argument of the model, or a field of a settings object.

    The answer is read by :func:`~lightning_fisher.cli.values.parse_typed`. A settings field's flag
    (its ``analyze`` flag and YAML key) is the question and its help is shown above; whether a
    value is allowed is the settings object's own check, when it is built from the answers.
    """

    name: str
    annotation: Any = None
    field: Optional[dataclasses.Field] = None

    @property
    def key(self) -> str:
        return self.field.metadata["flag"] if self.field else self.name

    @property
    def help(self) -> str:
        return field_help(self.field) if self.field else ""  # read when asked: every criterion registered by then

    def parse(self, text: str) -> Any:
        return parse_typed(text, self.annotation)


def setting_questions(settings: type) -> list[TypedQuestion]:
    """A question per field of a settings dataclass that has a flag, in the fields' order (a subclass's too)."""
    hints = typing.get_type_hints(settings)  # the annotations are strings (postponed evaluation)
    return [TypedQuestion(f.name, hints[f.name], f) for f in dataclasses.fields(settings) if "flag" in f.metadata]


def settings_flags(settings: Any) -> dict[str, Any]:
    """``{flag / YAML key: value}`` of a settings object, every field with a flag."""
    return {q.key: getattr(settings, q.name) for q in setting_questions(type(settings))}


def parse_positive_int(text: str) -> int:
    value = parse_typed(text, int)
    if value < 1:
        raise ValueError(f"{value} is not positive; give a number of at least 1")
    return value


def parse_folder(text: str) -> Optional[str]:
    """An existing folder as an absolute path; ``""`` gives ``None``."""
    if not text:
        return None
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not an existing folder")
    return str(folder.resolve())


def parse_patterns(text: str) -> list[str]:
    """Comma-separated module name patterns (regular expressions); ``""`` or ``none`` gives ``[]``."""
    patterns = [] if text.lower() in ("", "none", "-") else comma_list(text)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None
    return patterns


def parse_dataset_folder(text: str) -> TensorFolderDataset:
    """A folder that holds sample files, as the analysis will read it (its files listed, none loaded yet)."""
    try:
        return TensorFolderDataset(Path(text).expanduser().resolve(), validate="none")
    except DatasetFolderError as error:
        raise ValueError(str(error)) from None


def parse_focus(text: str) -> str:
    """A timestep focus, a name or a range ``LO,HI`` (:meth:`TimestepFocus.parse`), as its canonical text."""
    return str(TimestepFocus.parse(text))


def parse_config_path(text: str) -> Path:
    """Where to save the config: a ``.yaml``/``.yml`` file name in a writable place."""
    path = Path(text).expanduser().absolute()
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name such as {path / CONFIG_FILENAME}")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"{path}: the config is YAML; give a file name ending in .yaml")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"cannot write {path}: {existing} is not a writable folder")
    return path


def default_presets_dir(cwd: Optional[Path] = None) -> Optional[Path]:
    """``configs/presets`` under ``cwd``, else in the checkout next to the package, else ``None``."""
    for root in (Path.cwd() if cwd is None else cwd, Path(lightning_fisher.__file__).resolve().parents[1]):
        if (root / "configs" / "presets").is_dir():
            return root / "configs" / "presets"
    return None


def load_preset(path: Path, settings: type = AllocationSettings) -> Any:
    """The ``settings`` a preset YAML gives (its keys are flags; others are ignored), or ``ValueError``."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"preset {path}: cannot read it: {error}") from None
    if not isinstance(content, Mapping):
        raise ValueError(f"preset {path}: expected a YAML mapping of settings")
    try:
        return settings(**{q.name: content[q.key] for q in setting_questions(settings) if q.key in content})
    except ValueError as error:
        raise ValueError(f"preset {path}: {error}") from None


def load_presets(folder: Optional[Path]) -> tuple[dict[str, AllocationSettings], list[str]]:
    """Rank presets ``NAME.yaml`` of ``folder``, ordered by base rank; and messages for unusable files."""
    presets: dict[str, AllocationSettings] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.y*ml")) if folder is not None and folder.is_dir() else ():
        if path.suffix.lower() in (".yaml", ".yml") and path.stem.lower() != "none":
            try:
                presets[path.stem] = load_preset(path)
            except ValueError as error:
                problems.append(str(error))
    return dict(sorted(presets.items(), key=lambda item: (item[1].rank, item[1].rank_max, item[0]))), problems


@dataclass
class WizardAnswers:
    """Everything the wizard asked, in the user's words.

    Args:
        model, init_args, checkpoint_dir: the LightningModule's class path and ``init_args``
            (``checkpoint_dir=None`` keeps the model's default).
        dataset_dir, num_samples, batch_size: the dataset folder (absolute), its sample files
            (shown, not saved) and ``data.init_args.batch_size``.
        include, exclude: module name patterns (``include=None``: every ``nn.Linear``).
        timestep_focus: ``balanced``, ``texture``, ``structure`` or ``"LO,HI"``.
        ranks, preset: the allocation settings, and the preset they started from, if any.
        stopping, seed: the stopping rule; ``analyze``'s ``--seed`` (``None``: unseeded).
        fragile: the model is distilled / few-step ("turbo"); recorded as a comment.
    """

    model: str
    dataset_dir: str
    checkpoint_dir: Optional[str] = None
    init_args: dict[str, Any] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    num_samples: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    timestep_focus: str = "balanced"
    ranks: AllocationSettings = field(default_factory=AllocationSettings)
    preset: Optional[str] = None
    fragile: bool = False
    stopping: StabilityRule = field(default_factory=StabilityRule)
    seed: Optional[int] = AnalysisOptions.seed
    include: Optional[list[str]] = None


def answers_to_config(answers: WizardAnswers) -> dict[str, Any]:
    """The ``lightning-fisher analyze --config`` content for ``answers`` (a plain dict)."""
    init_args = dict(answers.init_args)
    if answers.checkpoint_dir is not None:
        init_args["checkpoint_dir"] = answers.checkpoint_dir
    return {
        "model": {"class_path": answers.model, **({"init_args": init_args} if init_args else {})},
        "dataset_dir": answers.dataset_dir,
        "data": {"class_path": DATA_CLASS, "init_args": {"batch_size": answers.batch_size}},
        "timestep_focus": answers.timestep_focus,
        **settings_flags(answers.ranks),
        **settings_flags(answers.stopping),
        "seed": answers.seed,
        "include": None if answers.include is None else list(answers.include),
        "exclude": list(answers.exclude),
    }


def render_config(answers: WizardAnswers) -> str:
    """The YAML text of :func:`answers_to_config`, with comments on how to use it."""
    lines = [
        "# Fisher analysis settings written by `lightning-fisher wizard`.",
        "# Run with: lightning-fisher analyze --config THIS_FILE  (flags after it override fields)",
    ]
    if answers.preset:
        lines.append(f"# Rank fields started from the preset {answers.preset!r}.")
    if answers.fragile:
        lines += [
            "# fragile: true -- distilled / few-step ('turbo') model, confirmed by the user.",
            "# The analysis itself has no fragile option; training on the map needs",
            f"#   lightning-fisher fit ... {FRAGILE_FIT_FLAGS}",
            "# and a lower learning rate. The base model is the recommended target.",
        ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(answers_to_config(answers), sort_keys=False)


def fit_command(answers: WizardAnswers) -> str:
    """The ``lightning-fisher fit`` command that trains on the map these answers produce: ``fit`` takes no analyze
    config, so it carries the model, the data (where the map is), the fragile opt-in, the demo's adapter root."""
    parts = ["lightning-fisher", "fit", "--model", answers.model]
    for name, value in answers.init_args.items():
        parts += [f"--model.init_args.{name}", value if isinstance(value, str) else json.dumps(value)]
    if answers.checkpoint_dir is not None:
        parts += ["--checkpoint-dir", answers.checkpoint_dir]
    parts += ["--dataset-dir", answers.dataset_dir, "--data.batch_size", str(answers.batch_size)]
    if answers.model == DEMO_MODEL:
        parts += ["--adaptive_lora.adapter_root", DEMO_ADAPTER_ROOT]
    if answers.fragile:
        parts += FRAGILE_FIT_FLAGS.split()
    return shlex.join([*parts, "--trainer.max_epochs", str(FIT_EPOCHS)])
