"""The wizard's answers: checking each one where it is given, rank presets, and the config they make.

Every ``parse_*`` function turns one answer into a value or raises ``ValueError`` with the
reason, which the wizard shows before asking again. :class:`WizardAnswers` and
:func:`answers_to_config` / :func:`render_config` are pure: the answers and the
``lightning-fisher analyze --config`` YAML they make.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shlex
import typing
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

import lightning_fisher
from lightning_fisher.allocation_settings import AllocationSettings
from lightning_fisher.atomic_io import write_text_atomic
from lightning_fisher.cli.error_reason import user_frame
from lightning_fisher.errors import DatasetFolderError
from lightning_fisher.tensor_folder import list_sample_files
from lightning_fisher.timesteps import TimestepFocus
from lightning_fisher.wording import a_or_an

__all__ = [
    "DatasetFolder",
    "RankSettings",
    "WizardAnswers",
    "InitArgument",
    "accepts_checkpoint_dir",
    "analyze_command",
    "answers_to_config",
    "fit_command",
    "has_timestep_sampler",
    "default_presets_dir",
    "load_preset",
    "load_presets",
    "parse_config_path",
    "parse_dataset_folder",
    "parse_focus_range",
    "parse_folder",
    "parse_model_class",
    "parse_patterns",
    "parse_positive_int",
    "parse_typed",
    "render_config",
    "required_init_arguments",
    "requires_checkpoint_dir",
    "write_config",
]

DEMO_MODEL = "lightning_fisher.examples.text_classifier.MiniLMClassifier"
DATA_CLASS = "lightning_fisher.TensorDirectoryDataModule"
DEFAULT_BATCH_SIZE = 16
CONFIG_FILENAME = "fisher_analyze.yaml"
#: The fields of a rank preset that the wizard asks for; other keys of a preset are ignored.
RANK_FIELDS = ("rank", "rank_min", "rank_max", "rank_mode")  # the flags of the rank budget, in asking order
#: What ``fit`` needs for a model the user marked fragile (written into the config's comments).
FRAGILE_FIT_FLAGS = "--adaptive_lora.fragile true --adaptive_lora.allow_fragile true"

# --------------------------------------------------------------------------------------------
# Checking one answer


def parse_model_class(text: str) -> str:
    """Check that ``text`` names an importable ``LightningModule`` subclass; return the class path."""
    from lightning.pytorch import LightningModule

    model_class = _import_class(text)
    if not (isinstance(model_class, type) and issubclass(model_class, LightningModule)):
        raise ValueError(f"{text} is {a_or_an(type(model_class).__name__)}, not a LightningModule subclass")
    return text


def _import_class(class_path: str) -> Any:
    module_name, dot, name = class_path.rpartition(".")
    if not dot or not module_name or not name:
        raise ValueError(f"{class_path!r}: give the full class path, module.ClassName (e.g. {DEMO_MODEL})")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any error in the user's module: report it, do not crash the wizard
        frame = user_frame(error)
        where = f" ({frame.filename}, line {frame.lineno}, in {frame.name})" if frame else ""
        raise ValueError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}{where}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {name!r}") from None


def accepts_checkpoint_dir(class_path: str) -> bool:
    """Whether the model's ``__init__`` takes ``checkpoint_dir`` (the ``--checkpoint-dir`` convention)."""
    return "checkpoint_dir" in _init_parameters(class_path)


def _init_parameters(class_path: str) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(_import_class(class_path).__init__).parameters)
    except (TypeError, ValueError):
        return {}


@dataclass(frozen=True)
class InitArgument:
    """A required argument of the model's ``__init__``: its name and annotation (``None``: none)."""

    name: str
    annotation: Any = None

    def describe(self) -> str:
        """The annotation as the question shows it, e.g. ``int``, ``Optional[int]`` or ``linear/cosine``."""
        if self.annotation is None:
            return "any YAML value"
        if typing.get_origin(self.annotation) is typing.Literal:
            return "/".join(str(value) for value in typing.get_args(self.annotation))
        text = getattr(self.annotation, "__name__", None) if not typing.get_args(self.annotation) else None
        return text or str(self.annotation).replace("typing.", "")

    def parse(self, text: str) -> Any:
        """The answer as a value of the annotation (see :func:`parse_typed`)."""
        return parse_typed(text, self.annotation)


def required_init_arguments(class_path: str) -> list[InitArgument]:
    """The model's ``__init__`` arguments without a default (``checkpoint_dir`` has its own question).

    Annotations are resolved (``from __future__ import annotations`` leaves strings); one that
    cannot be resolved is taken as absent, so the answer is read as YAML.
    """
    model_class = _import_class(class_path)
    try:
        hints = typing.get_type_hints(model_class.__init__)
    except Exception:  # a name only the type checker sees; the annotation is then unusable
        hints = {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        InitArgument(name, hints.get(name))
        for name, parameter in _init_parameters(class_path).items()
        if name not in ("self", "checkpoint_dir") and parameter.kind in kinds
        and parameter.default is inspect.Parameter.empty
    ]


def requires_checkpoint_dir(class_path: str) -> bool:
    """Whether ``checkpoint_dir`` is an argument of the model's ``__init__`` without a default."""
    parameter = _init_parameters(class_path).get("checkpoint_dir")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def has_timestep_sampler(class_path: str) -> bool:
    """Whether the model has a ``timestep_sampler`` (the timestep focus applies only then).

    Read from the class, without building the model: a class attribute, or the name in the
    source of the class or a base class of the user's (where ``__init__`` or ``setup`` sets
    ``self.timestep_sampler``). When no source can be read, the answer is yes: asking the
    question then is harmless, skipping it wrongly is not.
    """
    from lightning.pytorch import LightningModule

    model_class = _import_class(class_path)
    if hasattr(model_class, "timestep_sampler"):
        return True
    readable = False
    for klass in model_class.__mro__:
        if klass is LightningModule:
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        readable = True
        if "timestep_sampler" in source:
            return True
    return not readable


_TRUE = ("true", "yes", "y")
_FALSE = ("false", "no", "n")
_NONE = ("none", "null", "~")


def parse_typed(text: str, annotation: Any) -> Any:
    """An answer as a value of ``annotation``, or ``ValueError`` saying what was expected.

    ``int``, ``float``, ``bool`` (true/false, yes/no), ``str`` and paths (kept as text),
    ``Literal[...]`` (one of its values), ``Optional[X]`` (``none`` or an X); anything else,
    or no annotation, is read as a YAML value (``[1, 2]``, ``{a: 1}``).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if text.lower() in _NONE:
            return None
        rest = [a for a in args if a is not type(None)]
        return parse_typed(text, rest[0] if len(rest) == 1 else typing.Union[tuple(rest)])
    if origin is typing.Literal:
        for value in args:
            if text == str(value):
                return value
        raise ValueError(f"{text!r} is not one of: {', '.join(str(v) for v in args)}")
    if annotation is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{text!r}: answer true or false")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {'a whole number' if annotation is int else 'a number'}") from None
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, os.PathLike)):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{text!r} is not a YAML value: {error}") from None


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
    if text.lower() in ("", "none", "-"):
        return []
    patterns = [item.strip() for item in text.split(",") if item.strip()]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None
    return patterns


@dataclass(frozen=True)
class DatasetFolder:
    """A checked dataset folder: its absolute path and its sample files."""

    path: str
    files: tuple[Path, ...]

    @property
    def suffixes(self) -> dict[str, int]:
        return dict(sorted(Counter(path.suffix.lower() for path in self.files).items()))

    def describe(self) -> str:
        kinds = ", ".join(f"{suffix}: {count}" for suffix, count in self.suffixes.items())
        return f"{len(self.files)} samples ({kinds})"


def parse_dataset_folder(text: str) -> DatasetFolder:
    """A folder that holds sample files (see :func:`~lightning_fisher.tensor_folder.list_sample_files`)."""
    folder = Path(text).expanduser()
    try:
        files = list_sample_files(folder)
    except DatasetFolderError as error:
        raise ValueError(str(error)) from None
    return DatasetFolder(str(folder.resolve()), tuple(files))


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{value} is not positive; give a number of at least 1")
    return value


def parse_focus_range(text: str) -> str:
    """A custom focus ``"LO,HI"``, checked by :meth:`TimestepFocus.parse`; returns its canonical text."""
    if "," not in text:
        raise ValueError(f"{text!r}: give two numbers 'LO,HI' with 0 <= LO < HI <= 1, e.g. 0.2,0.5")
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


# --------------------------------------------------------------------------------------------
# Rank presets


#: The rank budget the wizard asks for: the allocation settings themselves (their flags are the
#: ``analyze`` flags ``rank``, ``rank_min``, ``rank_max``, ``rank_mode``).
RankSettings = AllocationSettings


def default_presets_dir(cwd: Optional[Path] = None) -> Optional[Path]:
    """``configs/presets`` under ``cwd``, else in the checkout next to the package, else ``None``."""
    candidates = (
        Path.cwd() if cwd is None else cwd,
        Path(lightning_fisher.__file__).resolve().parents[1],
    )
    for root in candidates:
        folder = root / "configs" / "presets"
        if folder.is_dir():
            return folder
    return None


def load_preset(path: Path) -> RankSettings:
    """The rank fields of a preset YAML over the wizard's defaults; other keys are ignored.

    Raises:
        ValueError: the file is not a YAML mapping, or a rank field is invalid.
    """
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"preset {path}: cannot read it: {error}") from None
    if not isinstance(content, Mapping):
        raise ValueError(f"preset {path}: expected a YAML mapping of settings")
    try:
        return RankSettings.from_flags({key: content[key] for key in RANK_FIELDS if key in content})
    except ValueError as error:
        raise ValueError(f"preset {path}: {error}") from None


def load_presets(folder: Optional[Path]) -> tuple[dict[str, RankSettings], list[str]]:
    """Rank presets ``NAME.yaml`` of ``folder``, ordered by base rank; and messages for unusable files."""
    if folder is None or not folder.is_dir():
        return {}, []
    presets: dict[str, RankSettings] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.y*ml")):
        if path.suffix.lower() not in (".yaml", ".yml") or path.stem.lower() == "none":
            continue
        try:
            presets[path.stem] = load_preset(path)
        except ValueError as error:
            problems.append(str(error))
    ordered = sorted(presets.items(), key=lambda item: (item[1].rank, item[1].rank_max, item[0]))
    return dict(ordered), problems


# --------------------------------------------------------------------------------------------
# Answers -> config


@dataclass
class WizardAnswers:
    """Everything the wizard asked, in the user's words.

    Args:
        model: class path of the LightningModule.
        dataset_dir: absolute path of the dataset folder.
        checkpoint_dir: ``model.init_args.checkpoint_dir``; ``None`` keeps the model's default.
        init_args: the model's other required ``__init__`` arguments (``model.init_args``).
        exclude: module name patterns to leave out of the analysis.
        num_samples: sample files in the dataset folder (shown, not saved).
        batch_size: ``data.init_args.batch_size``.
        timestep_focus: ``balanced``, ``texture``, ``structure`` or ``"LO,HI"``.
        ranks: the rank budget.
        preset: name of the rank preset the ranks started from, if any.
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
    ranks: RankSettings = field(default_factory=RankSettings)
    preset: Optional[str] = None
    fragile: bool = False


def answers_to_config(answers: WizardAnswers) -> dict[str, Any]:
    """The ``lightning-fisher analyze --config`` content for ``answers`` (a plain dict)."""
    model: dict[str, Any] = {"class_path": answers.model}
    init_args = dict(answers.init_args)
    if answers.checkpoint_dir is not None:
        init_args["checkpoint_dir"] = answers.checkpoint_dir
    if init_args:
        model["init_args"] = init_args
    return {
        "model": model,
        "dataset_dir": answers.dataset_dir,
        "data": {"class_path": DATA_CLASS, "init_args": {"batch_size": answers.batch_size}},
        "timestep_focus": answers.timestep_focus,
        **{key: answers.ranks.flags()[key] for key in RANK_FIELDS},
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


#: Where the demo model's adapters go, so its new head trains fully (as in configs/reviews_fit.yaml).
DEMO_ADAPTER_ROOT = "encoder"
#: Epochs in the fit command the wizard prints (Lightning's own default is 1000); edit as needed.
FIT_EPOCHS = 3


def _flag_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true / false / null
    return value if isinstance(value, str) else json.dumps(value)


def analyze_command(config_path: Path) -> str:
    """The command that runs the analysis a saved config describes."""
    return shlex.join(["lightning-fisher", "analyze", "--config", str(config_path)])


def fit_command(answers: WizardAnswers) -> str:
    """The ``lightning-fisher fit`` command that trains on the map these answers produce.

    ``fit`` takes no analyze config (the rank settings are not its options), so the command
    carries what the analysis config says about the model and the data: the model with its
    arguments, the dataset folder (where ``fit`` finds the map) and the batch size; the
    fragile-model opt-in when the user gave it; and the demo model's adapter root.
    """
    parts = ["lightning-fisher", "fit", "--model", answers.model]
    for name, value in answers.init_args.items():
        parts += [f"--model.init_args.{name}", _flag_value(value)]
    if answers.checkpoint_dir is not None:
        parts += ["--checkpoint-dir", answers.checkpoint_dir]
    parts += ["--dataset-dir", answers.dataset_dir, "--data.batch_size", str(answers.batch_size)]
    if answers.model == DEMO_MODEL:
        parts += ["--adaptive_lora.adapter_root", DEMO_ADAPTER_ROOT]
    if answers.fragile:
        parts += FRAGILE_FIT_FLAGS.split()
    parts += ["--trainer.max_epochs", str(FIT_EPOCHS)]
    return shlex.join(parts)


def write_config(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, creating its folder if needed."""
    return write_text_atomic(path, text, make_parents=True)
