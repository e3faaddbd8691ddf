"""``lightning-fisher wizard``: an interactive front end that writes an ``analyze`` config.

The wizard asks, step by step, for what ``lightning-fisher analyze`` needs (model, dataset
folder, timestep focus, rank budget), checks each answer where it is given, shows a summary
with an estimated run time, and saves a YAML config in exactly the format
``lightning-fisher analyze --config FILE`` reads. Running the analysis from the wizard calls
that same command on that file, so the wizard is a way to *write* a config, never a second
way to run the analysis.

Nothing is written before the last question is answered: Ctrl-C (exit status 130) or end of
input (exit status 1) at any prompt leaves no config and no map behind. The saved config goes
by default next to the map it produces, ``<dataset folder>/fisher_analyze.yaml``
(``--save-config`` changes the default offered).

The module is layered so that each part can be tested without a terminal:

- :class:`Prompter`: one question with a default, a check and re-asking; yes/no; a choice.
  It reads and writes through the callables it is given.
- ``parse_*`` functions: turn one answer into a value or raise ``ValueError`` with the reason.
- :class:`WizardAnswers` and :func:`answers_to_config` / :func:`render_config`: the answers
  and the config they make (pure).
- :class:`Wizard`: the order of the questions; :func:`run_wizard`: the subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import math
import os
import re
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml

import lightning_fisher
from lightning_fisher.allocation import ALLOCATION_MODES, check_rank_settings
from lightning_fisher.errors import DatasetFolderError
from lightning_fisher.fisher_map import FISHER_MAP_FILENAME
from lightning_fisher.tensor_folder import list_sample_files
from lightning_fisher.timesteps import FOCUS_HELP, TimestepFocus

__all__ = [
    "Prompter",
    "RankSettings",
    "RunTimeEstimate",
    "Wizard",
    "WizardAnswers",
    "analysis_batches",
    "answers_to_config",
    "default_presets_dir",
    "estimate_run_time",
    "load_presets",
    "render_config",
    "run_wizard",
    "write_config",
]

T = TypeVar("T")

DEMO_MODEL = "lightning_fisher.examples.text_classifier.MiniLMClassifier"
#: Exclusions offered by default for the demo model: its classification head is freshly initialised.
DEMO_EXCLUDE = ("head",)
DATA_CLASS = "lightning_fisher.TensorDirectoryDataModule"
DEFAULT_BATCH_SIZE = 16
CONFIG_FILENAME = "fisher_analyze.yaml"
#: The fields of a rank preset that the wizard asks for; other keys of a preset are ignored.
RANK_FIELDS = ("rank", "rank_min", "rank_max", "rank_mode")

MODE_HELP = {
    "median": "the base rank is the median rank of the adapted modules",
    "budget": "total LoRA parameters equal flat LoRA at the base rank",
}

EXIT_DECLINED = 1
EXIT_END_OF_INPUT = 1
EXIT_NOT_INTERACTIVE = 2
EXIT_INTERRUPTED = 130

NOT_INTERACTIVE = (
    "lightning-fisher wizard needs an interactive terminal; "
    "use `lightning-fisher analyze --config ...` instead"
)
CANCELLED = "wizard cancelled, nothing written"

FRAGILE_WARNING = """\
  ! WARNING: distilled / few-step ("turbo") models are fragile. Adaptive ranks adapt strongly,
    and that can destabilise such a model: loss spikes, outputs that turn to noise.
    The base model is the recommended target for this workflow. If you go on anyway,
    lower the learning rate (e.g. 1e-4 -> 5e-5) and check samples early."""

FRAGILE_FIT_FLAGS = "--adaptive_lora.fragile true --adaptive_lora.allow_fragile true"


# --------------------------------------------------------------------------------------------
# Asking


class Prompter:
    """Asks questions through ``input_fn`` and ``output_fn``; re-asks until an answer is valid.

    Args:
        input_fn: shows a prompt and returns the line typed (``input``). ``EOFError`` and
            ``KeyboardInterrupt`` from it are passed on to the caller.
        output_fn: prints one message (``print``).
    """

    def __init__(self, input_fn: Callable[[str], str] = input, output_fn: Callable[[str], None] = print) -> None:
        self.input_fn = input_fn
        self.output_fn = output_fn

    def say(self, text: str = "") -> None:
        self.output_fn(text)

    def warn(self, reason: str) -> None:
        self.output_fn(f"  ! {reason}")

    def ask(
        self,
        question: str,
        *,
        default: Optional[str] = None,
        parse: Callable[[str], T] = str,  # type: ignore[assignment]
        empty: Optional[str] = None,
    ) -> T:
        """Ask until ``parse`` accepts the answer; return what it returns.

        Args:
            question: the prompt, without the default.
            default: taken for an empty answer and shown as ``[default]``; it goes through
                ``parse`` like a typed answer.
            parse: turns the stripped answer into the value, or raises ``ValueError`` whose
                message is shown before asking again.
            empty: what an empty answer means, shown as ``[Enter: empty]`` when there is no
                default; the empty answer is then passed to ``parse`` as ``""``. Without
                ``default`` or ``empty`` an empty answer is refused.
        """
        if default is not None:
            prompt = f"{question} [{default}]: "
        elif empty is not None:
            prompt = f"{question} [Enter: {empty}]: "
        else:
            prompt = f"{question}: "
        while True:
            answer = self.input_fn(prompt).strip()
            if not answer:
                if default is not None:
                    answer = default
                elif empty is None:
                    self.warn("an answer is needed")
                    continue
            try:
                return parse(answer)
            except ValueError as error:
                self.warn(str(error))

    def yes_no(self, question: str, *, default: bool) -> bool:
        """Ask a y/n question; Enter gives ``default``."""
        prompt = f"{question} [{'Y/n' if default else 'y/N'}]: "
        while True:
            answer = self.input_fn(prompt).strip().lower()
            if not answer:
                return default
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            self.warn("answer y or n")

    def choice(self, question: str, options: Sequence[str], *, default: str) -> str:
        """Ask for one of ``options`` (case-insensitive, or an unambiguous prefix); Enter gives ``default``."""
        if default not in options:
            raise ValueError(f"default {default!r} is not one of the options {list(options)}")

        def parse(text: str) -> str:
            text = text.lower()
            matches = [option for option in options if option.lower() == text]
            if not matches:
                matches = [option for option in options if option.lower().startswith(text)]
            if len(matches) != 1:
                raise ValueError(f"{text!r} is not one of: {', '.join(options)}")
            return matches[0]

        return self.ask(f"{question} ({'/'.join(options)})", default=default, parse=parse)


# --------------------------------------------------------------------------------------------
# Checking one answer


def parse_model_class(text: str) -> str:
    """Check that ``text`` names an importable ``LightningModule`` subclass; return the class path."""
    from lightning.pytorch import LightningModule

    model_class = _import_class(text)
    if not (isinstance(model_class, type) and issubclass(model_class, LightningModule)):
        raise ValueError(f"{text} is a {type(model_class).__name__}, not a LightningModule subclass")
    return text


def _import_class(class_path: str) -> Any:
    module_name, dot, name = class_path.rpartition(".")
    if not dot or not module_name or not name:
        raise ValueError(f"{class_path!r}: give the full class path, module.ClassName (e.g. {DEMO_MODEL})")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any error in the user's module: report it, do not crash the wizard
        raise ValueError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {name!r}") from None


def accepts_checkpoint_dir(class_path: str) -> bool:
    """Whether the model's ``__init__`` takes ``checkpoint_dir`` (the ``--checkpoint-dir`` convention)."""
    try:
        parameters = inspect.signature(_import_class(class_path).__init__).parameters
    except (TypeError, ValueError):
        return False
    return "checkpoint_dir" in parameters


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


@dataclass(frozen=True)
class RankSettings:
    """The rank budget the wizard asks for (the ``analyze`` flags of the same names)."""

    rank: int = 64
    rank_min: int = 16
    rank_max: int = 128
    rank_mode: str = "median"

    def check(self) -> None:
        """Raises ``ValueError`` (from :func:`check_rank_settings`) naming the bad field."""
        check_rank_settings(rank=self.rank, rank_min=self.rank_min, rank_max=self.rank_max, mode=self.rank_mode)

    def __str__(self) -> str:
        return f"rank {self.rank}, min {self.rank_min}, max {self.rank_max}, mode {self.rank_mode}"


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
    settings = replace(RankSettings(), **{key: content[key] for key in RANK_FIELDS if key in content})
    try:
        settings.check()
    except ValueError as error:
        raise ValueError(f"preset {path}: {error}") from None
    return settings


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
    if answers.checkpoint_dir is not None:
        model["init_args"] = {"checkpoint_dir": answers.checkpoint_dir}
    return {
        "model": model,
        "dataset_dir": answers.dataset_dir,
        "data": {"class_path": DATA_CLASS, "init_args": {"batch_size": answers.batch_size}},
        "timestep_focus": answers.timestep_focus,
        "rank": answers.ranks.rank,
        "rank_min": answers.ranks.rank_min,
        "rank_max": answers.ranks.rank_max,
        "rank_mode": answers.ranks.rank_mode,
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


def write_config(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a hidden temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


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


def _short_reason(error: BaseException) -> str:
    """The informative lines of an error (jsonargparse repeats the Union alternatives)."""
    noise = ("Does not validate against any", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>", "Given value")
    lines = [line.strip(" -") for line in str(error).splitlines()]
    kept = [line for line in lines if line and not any(marker in line for marker in noise)]
    reason = "; ".join(kept) or type(error).__name__
    return reason if len(reason) <= 400 else reason[:397] + "..."


# --------------------------------------------------------------------------------------------
# The flow


@dataclass(frozen=True)
class WizardPlan:
    """What the wizard decided: the answers, where to save them, and whether to run now."""

    answers: WizardAnswers
    config_path: Path
    run_now: bool


class Wizard:
    """The questions, in order. :meth:`collect` returns the plan, or ``None`` when the user stops.

    Args:
        prompter: asks the questions.
        presets: rank presets by name (see :func:`load_presets`).
        save_config: default offered for where to save the config.
        estimate: run-time estimate of a config text and sample count (for tests; default
            :func:`estimate_run_time`).
    """

    STEPS = 7

    def __init__(
        self,
        prompter: Prompter,
        *,
        presets: Optional[Mapping[str, RankSettings]] = None,
        save_config: Optional[str] = None,
        estimate: Callable[[str, int], RunTimeEstimate] = estimate_run_time,
    ) -> None:
        self.prompter = prompter
        self.presets = dict(presets or {})
        self.save_config = save_config
        self.estimate = estimate

    def _step(self, number: int, title: str) -> None:
        self.prompter.say(f"\n[{number}/{self.STEPS}] {title}")

    def collect(self) -> Optional[WizardPlan]:
        p = self.prompter
        p.say("lightning-fisher wizard: set up a Fisher analysis, which writes fisher_map.json (per-module")
        p.say("LoRA ranks) into your dataset folder. Enter takes the [default]; Ctrl-C cancels.")
        p.say("Nothing is written until the last question.")

        self._step(1, "Model")
        model, checkpoint_dir, exclude = self.ask_model()
        self._step(2, "Dataset")
        dataset, batch_size = self.ask_dataset()
        self._step(3, "Timestep focus (diffusion / flow models; other models: keep balanced)")
        focus = self.ask_focus()
        self._step(4, "Rank budget")
        ranks, preset = self.ask_ranks()
        self._step(5, "Fragile model")
        fragile = p.yes_no("Is this a distilled / few-step ('turbo') model?", default=False)
        if fragile and not self.confirm_fragile():
            p.say("stopped: nothing written. Prefer the base model, or train flat-rank LoRA without a map.")
            return None
        answers = WizardAnswers(
            model=model,
            dataset_dir=dataset.path,
            checkpoint_dir=checkpoint_dir,
            exclude=exclude,
            num_samples=len(dataset.files),
            batch_size=batch_size,
            timestep_focus=focus,
            ranks=ranks,
            preset=preset,
            fragile=fragile,
        )
        self._step(6, "Summary")
        self.show_summary(answers, dataset)
        self._step(7, "Save and run")
        config_path = self.ask_config_path(answers)
        run_now = p.yes_no("Run the analysis now?", default=True)
        return WizardPlan(answers, config_path, run_now)

    # -- steps -------------------------------------------------------------------------------

    def ask_model(self) -> tuple[str, Optional[str], list[str]]:
        p = self.prompter
        model = p.ask("LightningModule class path", default=DEMO_MODEL, parse=parse_model_class)
        checkpoint_dir = None
        if accepts_checkpoint_dir(model):
            checkpoint_dir = p.ask("Checkpoint folder", parse=parse_folder, empty="the model's own default")
        else:
            p.say(f"  ({model.rpartition('.')[2]} takes no checkpoint_dir argument: no checkpoint folder to ask for)")
        p.say("  Modules to leave out of the analysis, e.g. a freshly initialised head")
        p.say("  (comma-separated name patterns; 'none' for none).")
        exclude = p.ask(
            "Exclude",
            default=",".join(DEMO_EXCLUDE) if model == DEMO_MODEL else None,
            parse=parse_patterns,
            empty="none",
        )
        return model, checkpoint_dir, exclude

    def ask_dataset(self) -> tuple[DatasetFolder, int]:
        p = self.prompter
        dataset = p.ask("Dataset folder (one .pt / .safetensors sample per file)", parse=parse_dataset_folder)
        p.say(f"  found {dataset.describe()}")
        existing_map = Path(dataset.path) / FISHER_MAP_FILENAME
        if existing_map.exists():
            p.warn(f"{existing_map} already exists; the analysis will overwrite it")
        batch_size = p.ask("Batch size", default=str(DEFAULT_BATCH_SIZE), parse=parse_positive_int)
        return dataset, batch_size

    def ask_focus(self) -> str:
        p = self.prompter
        for name, text in FOCUS_HELP.items():
            p.say(f"  {name:<10} {text}")
        name = p.choice("Timestep focus", list(FOCUS_HELP), default="balanced")
        if name != "custom":
            return name
        return p.ask("Range LO,HI", default="0.2,0.5", parse=parse_focus_range)

    def ask_ranks(self) -> tuple[RankSettings, Optional[str]]:
        p = self.prompter
        settings, preset = RankSettings(), None
        if self.presets:
            for name, values in self.presets.items():
                p.say(f"  {name:<10} {values}")
            answer = p.choice("Start from a preset?", ["none", *self.presets], default="none")
            if answer != "none":
                settings, preset = self.presets[answer], answer
        for mode, text in MODE_HELP.items():
            p.say(f"  {mode:<10} {text}")
        while True:
            rank = p.ask("Base rank", default=str(settings.rank), parse=parse_positive_int)
            rank_min = p.ask("Minimum rank", default=str(settings.rank_min), parse=parse_positive_int)
            rank_max = p.ask("Maximum rank", default=str(settings.rank_max), parse=parse_positive_int)
            mode = p.choice("Rank mode", list(ALLOCATION_MODES), default=settings.rank_mode)
            settings = RankSettings(rank, rank_min, rank_max, mode)
            try:
                settings.check()
            except ValueError as error:
                p.warn(f"{error}; enter the rank budget again")
                continue
            return settings, preset

    def confirm_fragile(self) -> bool:
        self.prompter.say(FRAGILE_WARNING)
        self.prompter.say("  Any answer but 'yes' stops here without writing anything.")
        answer = self.prompter.ask("Type 'yes' to continue with this model anyway", empty="stop")
        return answer.lower() == "yes"

    def show_summary(self, answers: WizardAnswers, dataset: DatasetFolder) -> None:
        p = self.prompter
        p.say("  estimating run time (loading the model and timing one batch)...")
        try:
            estimate = self.estimate(render_config(answers), answers.num_samples).describe()
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - any failure of the user's model is reported, not raised
            p.warn(f"could not time a batch: {_short_reason(error)}")
            estimate = "unknown"
        focus = TimestepFocus.parse(answers.timestep_focus)
        focus_text = str(focus) if focus.range is None else f"{focus} (t in [{focus.range[0]:g}, {focus.range[1]:g}])"
        ranks = str(answers.ranks) + (f" (from preset {answers.preset})" if answers.preset else "")
        batches = max(1, math.ceil(answers.num_samples / answers.batch_size))
        rows = [
            ("model", answers.model),
            ("checkpoint", answers.checkpoint_dir or "(the model's own default)"),
            ("exclude", ", ".join(answers.exclude) or "(nothing)"),
            ("dataset folder", answers.dataset_dir),
            ("samples", dataset.describe()),
            ("batch size", f"{answers.batch_size} ({batches} batches per pass)"),
            ("timestep focus", focus_text),
            ("rank budget", ranks),
            ("fragile model", "YES (opted in; see the warning above)" if answers.fragile else "no"),
            ("estimated run time", estimate),
        ]
        for label, value in rows:
            p.say(f"  {label:<19} {value}")
        if answers.fragile:
            p.warn(f"fragile model: train on the map with `lightning-fisher fit ... {FRAGILE_FIT_FLAGS}`")

    def ask_config_path(self, answers: WizardAnswers) -> Path:
        default = self.save_config or str(Path(answers.dataset_dir) / CONFIG_FILENAME)
        while True:
            path = self.prompter.ask("Save the config to", default=default, parse=parse_config_path)
            if not path.exists() or self.prompter.yes_no(f"{path} exists. Overwrite it?", default=False):
                return path


# --------------------------------------------------------------------------------------------
# The subcommand


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-fisher wizard",
        description="Interactive set-up of a Fisher analysis: asks for the settings, saves a config for "
        "`lightning-fisher analyze --config FILE`, and can run it.",
    )
    parser.add_argument(
        "--save-config",
        metavar="PATH",
        help=f"where to save the YAML config (default offered: DATASET_FOLDER/{CONFIG_FILENAME})",
    )
    parser.add_argument(
        "--presets-dir",
        metavar="DIR",
        type=Path,
        help="folder of rank presets NAME.yaml (default: ./configs/presets, else the checkout's configs/presets)",
    )
    return parser


def run_wizard(argv: list[str]) -> int:
    """``lightning-fisher wizard [--save-config PATH] [--presets-dir DIR]``.

    Returns:
        The analysis' exit status when it is run; 0 when only the config is saved; 1 when the
        user stops at the fragile-model warning or input ends; 2 without a terminal;
        130 on Ctrl-C.
    """
    args = _argument_parser().parse_args(argv)
    if args.presets_dir is not None and not args.presets_dir.is_dir():
        print(f"lightning-fisher wizard: error: --presets-dir {args.presets_dir} is not a folder", file=sys.stderr)
        return 2
    if not sys.stdin.isatty():
        print(NOT_INTERACTIVE, file=sys.stderr)
        return EXIT_NOT_INTERACTIVE
    presets, problems = load_presets(args.presets_dir or default_presets_dir())
    prompter = Prompter()
    for problem in problems:
        prompter.warn(f"skipping a preset: {problem}")
    try:
        plan = Wizard(prompter, presets=presets, save_config=args.save_config).collect()
    except KeyboardInterrupt:
        prompter.say(f"\n{CANCELLED}")
        return EXIT_INTERRUPTED
    except EOFError:
        prompter.say(f"\n{CANCELLED} (end of input)")
        return EXIT_END_OF_INPUT
    if plan is None:
        return EXIT_DECLINED

    try:
        write_config(plan.config_path, render_config(plan.answers))
    except OSError as error:
        print(f"lightning-fisher wizard: error: cannot write {plan.config_path}: {error}", file=sys.stderr)
        return 1
    command = f"lightning-fisher analyze --config {plan.config_path}"
    prompter.say(f"config saved to {plan.config_path}")
    fit_hint = f"then train: lightning-fisher fit ... --dataset-dir {plan.answers.dataset_dir}"
    if plan.answers.fragile:
        fit_hint += f" {FRAGILE_FIT_FLAGS}"
    if not plan.run_now:
        prompter.say(f"run the analysis later with:\n  {command}\n{fit_hint}")
        return 0
    prompter.say(f"running: {command}\n")
    from lightning_fisher.cli.lightning_clis import run_analyze

    status = run_analyze(["--config", str(plan.config_path)])
    if status == 0:
        prompter.say(fit_hint)
    return status
