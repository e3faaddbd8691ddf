"""``lightning-fisher wizard``: asks what ``lightning-fisher analyze`` needs and saves it as its YAML config.

Each answer is checked where it is given; ``back`` returns to the previous question. The summary
is the config as it will be saved, with an estimated run time; nothing is written before the last
question (Ctrl-C: exit status 130, end of input: 1). The questions are one table,
:meth:`Wizard.questions`; the rank, criterion and stopping questions are made from the fields of
:class:`~lightning_fisher.AllocationSettings` and :class:`~lightning_fisher.StabilityRule` and
checked by building them. :class:`Prompter` does the I/O; :mod:`.wizard_answers` the decisions.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.analysis.options import AnalysisOptions
from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.cli.model_class import (
    accepts_checkpoint_dir, has_timestep_sampler, parse_model_class, required_init_arguments, requires_checkpoint_dir,
)
from lightning_fisher.cli.wizard_answers import (
    CONFIG_FILENAME, DEFAULT_BATCH_SIZE, DEMO_MODEL, TypedQuestion, WizardAnswers,
    default_presets_dir, fit_command, load_presets, parse_config_path, parse_dataset_folder, parse_focus,
    parse_folder, parse_patterns, parse_positive_int, render_config, setting_questions, settings_flags,
)
from lightning_fisher.cli.values import type_name
from lightning_fisher.cli.wizard_estimate import RunTimeEstimate, estimate_run_time, short_reason
from lightning_fisher.errors import SettingsError
from lightning_fisher.fisher_map.map import FISHER_MAP_FILENAME
from lightning_fisher.analysis.stability import StabilityRule
from lightning_fisher.analysis.timesteps import FOCUS_HELP
from lightning_fisher.wording import plural

__all__ = ["BACK", "GoBack", "Prompter", "Question", "Wizard", "WizardPlan", "run_wizard"]

T = TypeVar("T")
BACK = "back"  # typed at any question, returns to the previous one
DEMO_EXCLUDE = ("head",)  # offered for the demo model: its classification head is freshly initialised
PATTERNS = "comma-separated name patterns (regular expressions)"
CANCELLED = "wizard cancelled, nothing written"
NOT_INTERACTIVE = "lightning-fisher wizard needs an interactive terminal; use `lightning-fisher analyze --config ...` instead"
FRAGILE_WARNING = """\
  ! WARNING: distilled / few-step ("turbo") models are fragile. Adaptive ranks adapt strongly,
    and that can destabilise such a model: loss spikes, outputs that turn to noise.
    The base model is the recommended target for this workflow. If you go on anyway,
    lower the learning rate (e.g. 1e-4 -> 5e-5) and check samples early."""


class GoBack(Exception):
    """The user typed ``back``: the previous question is asked again."""


class Prompter:
    """All the wizard's terminal I/O: asks through ``input_fn`` (its ``EOFError`` and ``KeyboardInterrupt`` pass
    on), prints through ``output_fn``, re-asks until valid; ``back`` (any case) raises :class:`GoBack`."""

    def __init__(self, input_fn: Callable[[str], str] = input, output_fn: Callable[[str], None] = print) -> None:
        self.input_fn, self.output_fn = input_fn, output_fn

    def say(self, text: str = "") -> None:
        self.output_fn(text)

    def warn(self, reason: str) -> None:
        self.output_fn(f"  ! {reason}")

    def ask(
        self, question: str, *, default: Optional[str] = None, parse: Callable[[str], T] = str, empty: Optional[str] = None
    ) -> T:
        """Ask until ``parse`` returns a value (its ``ValueError`` is shown and the question asked again).

        An empty answer is ``default`` (shown ``[default]``), else ``""`` when ``empty`` says what that means
        (shown ``[Enter: empty]``), else refused.
        """
        hint = f" [{default}]" if default is not None else f" [Enter: {empty}]" if empty is not None else ""
        while True:
            answer = self._read(f"{question}{hint}: ") or (default or "")
            if not answer and default is None and empty is None:
                self.warn("an answer is needed")
                continue
            try:
                return parse(answer)
            except ValueError as error:
                self.warn(str(error))

    def _read(self, prompt: str) -> str:
        answer = self.input_fn(prompt).strip()
        if answer.lower() == BACK:
            raise GoBack
        return answer

    def yes_no(self, question: str, *, default: bool) -> bool:
        """Ask a y/n question; Enter gives ``default``."""
        while True:
            answer = self._read(f"{question} [{'Y/n' if default else 'y/N'}]: ").lower()
            if answer in ("", "y", "yes", "n", "no"):
                return answer.startswith("y") if answer else default
            self.warn("answer y or n")

    def choice(self, question: str, options: Sequence[str], *, default: str) -> str:
        """Ask for one of ``options`` (case-insensitive, or an unambiguous prefix); Enter gives ``default``."""
        if default not in options:
            raise ValueError(f"default {default!r} is not one of the options {list(options)}")

        def parse(text: str) -> str:
            text = text.lower()
            matches = [o for o in options if o.lower() == text] or [o for o in options if o.lower().startswith(text)]
            if len(matches) != 1:
                raise ValueError(f"{text!r} is not one of: {', '.join(options)}")
            return matches[0]

        return self.ask(f"{question} ({'/'.join(options)})", default=default, parse=parse)


#: Returned by a question's ``ask`` instead of an answer: nothing was asked (the summary, a check;
#: ``back`` passes over it), or the user stopped (the fragile-model warning).
SKIPPED, STOPPED = object(), object()


@dataclass(frozen=True)
class Redo:
    """Ask again from the earlier question ``question`` (an invalid setting, a refused overwrite)."""

    question: str


@dataclass(frozen=True)
class Question:
    """A row of the question table.

    Args:
        name: what ``back`` and :class:`Redo` refer to; the answer is kept as ``state[name]``.
        step: the title it is shown under (``[n/N] step``; the steps are numbered in table order).
        ask: asks and returns the answer, or ``SKIPPED``, ``STOPPED`` or a :class:`Redo`.
        help: shown before asking (text, or a function of the answers so far).
        skip: ``False`` to ask; ``True``, or a note to show, to skip it (its earlier answer is dropped).
    """

    name: str
    step: str
    ask: Callable[[], Any]
    help: Union[str, Callable[[], str]] = ""
    skip: Callable[[], Union[bool, str]] = lambda: False


@dataclass(frozen=True)
class WizardPlan:
    """What the wizard decided: the answers, where to save them, and whether to run now."""

    answers: WizardAnswers
    config_path: Path
    run_now: bool


MODEL, DATASET, FOCUS, RANKS, STOPPING, FRAGILE, SUMMARY, SAVE = (
    "Model", "Dataset", "Timestep focus (diffusion / flow models)", "Rank budget and criterion",
    "Stopping rule and seed", "Fragile model", "Summary", "Save and run",
)


class Wizard:
    """Asks the questions of :meth:`questions` in order; :meth:`collect` returns the plan, or ``None`` when the user stops.

    ``back`` asks the previous *asked* question again (skipped ones are passed over); later answers are kept as
    defaults. ``presets``: rank presets by name (:func:`.load_presets`); ``save_config``: where to save, offered;
    ``estimate(config_text, samples)``: the run-time estimate; ``allocation``, ``stopping``: the settings asked.
    """

    def __init__(self, prompter: Prompter, *, presets: Optional[Mapping[str, AllocationSettings]] = None,
                 save_config: Optional[str] = None, estimate: Callable[[str, int], RunTimeEstimate] = estimate_run_time,
                 allocation: type = AllocationSettings, stopping: type = StabilityRule) -> None:
        self.prompter, self.presets, self.save_config, self.estimate = prompter, dict(presets or {}), save_config, estimate
        self.allocation, self.stopping = allocation, stopping
        self.state: dict[Any, Any] = {}

    def questions(self) -> list[Question]:
        """The question table, in asking order (the model's arguments are known once the model is)."""
        p, s = self.prompter, self.state
        arguments = self.arguments()
        return [
            Question("model", MODEL, lambda: p.ask("LightningModule class path", default=self.model, parse=parse_model_class)),
            *(Question(f"arg:{a.name}", MODEL, partial(self.ask_typed, f"arg:{a.name}", a), "" if i else (
                f"  {_short(self.model)} needs: {', '.join(a.name for a in arguments)}")) for i, a in enumerate(arguments)),
            Question("checkpoint_dir", MODEL, lambda: p.ask("Checkpoint folder", parse=parse_folder, empty=None if (
                requires_checkpoint_dir(self.model)) else "the model's own default"), skip=lambda: not accepts_checkpoint_dir(
                self.model) and f"  ({_short(self.model)} takes no checkpoint_dir argument: no checkpoint folder to ask for)"),
            Question("include", MODEL, partial(self.ask_patterns, "include", "every nn.Linear"), f"  Modules to analyse: {PATTERNS}."),
            Question("exclude", MODEL, partial(self.ask_patterns, "exclude", "none"),
                     f"  Modules to leave out of the analysis, e.g. a freshly initialised head\n  ({PATTERNS}; 'none' for none)."),
            Question("dataset", DATASET, self.ask_dataset),
            Question("batch_size", DATASET, lambda: p.ask(
                "Batch size", default=str(s.get("batch_size", DEFAULT_BATCH_SIZE)), parse=parse_positive_int)),
            Question("focus", FOCUS, lambda: p.ask("Timestep focus (balanced/texture/structure/LO,HI)", default=s.get(
                "focus", "balanced"), parse=parse_focus), "\n".join(
                f"  {name:<10} {text}" for name, text in FOCUS_HELP.items()), lambda: not has_timestep_sampler(self.model) and (
                f"  ({_short(self.model)} has no timestep_sampler: the analysis draws what its training_step\n"
                "  draws, so there is no timestep focus to choose)")),
            Question("preset", RANKS, self.ask_preset, skip=lambda: not self.presets),
            *self.settings_questions(self.allocation, RANKS),
            Question("change_stopping", STOPPING, lambda: p.yes_no("Change the stopping rule?", default=False), lambda: (
                f"  The analysis stops once the module ranking is stable: {_pairs(settings_flags(s[self.stopping]))}.")),
            *self.settings_questions(self.stopping, STOPPING, skip=lambda: not s["change_stopping"]),
            Question("seed", STOPPING, partial(self.ask_typed, "seed", TypedQuestion("seed", Optional[int])),
                     f"  {AnalysisOptions.field('seed').metadata['help'][:-1]} ('none': unseeded)."),
            Question("fragile", FRAGILE, lambda: p.yes_no("Is this a distilled / few-step ('turbo') model?", default=False)),
            Question("fragile_confirm", FRAGILE, self.ask_fragile_confirm, FRAGILE_WARNING, lambda: not s["fragile"]),
            Question("summary", SUMMARY, self.show_summary),
            Question("config_path", SAVE, lambda: p.ask("Save the config to", parse=parse_config_path, default=(
                self.save_config or str(s["dataset"].dataset_dir / CONFIG_FILENAME)))),
            Question("overwrite", SAVE, lambda: p.yes_no(f"{s['config_path']} exists. Overwrite it?", default=False)
                     or Redo("config_path"), skip=lambda: not s["config_path"].exists()),
            Question("run_now", SAVE, lambda: p.yes_no("Run the analysis now?", default=True)),
        ]

    def settings_questions(self, settings: type, step: str, skip: Callable[[], bool] = lambda: False) -> list[Question]:
        """A question per field of ``settings`` (named by its flag), then the check that builds the object."""
        fields = setting_questions(settings)
        rows = [Question(q.key, step, partial(self.ask_typed, q.key, q, settings), f"  {q.help}", skip) for q in fields]
        return [*rows, Question(f"check:{settings.__name__}", step, partial(self.check_settings, settings, fields), skip=skip)]

    def collect(self) -> Optional[WizardPlan]:
        p = self.prompter
        p.say("lightning-fisher wizard: set up a Fisher analysis, which writes fisher_map.json (per-module")
        p.say(f"LoRA ranks) into your dataset folder. Enter takes the [default]; '{BACK}' returns to the")
        p.say("previous question; Ctrl-C cancels. Nothing is written until the last question.")
        self.state = {self.allocation: self.allocation(), self.stopping: self.stopping(), "seed": AnalysisOptions.seed}
        asked: list[str] = []
        name: Optional[str] = "model"
        shown = None
        while name is not None:
            table = self.questions()
            steps = list(dict.fromkeys(q.step for q in table))
            question = next(q for q in table if q.name == name)
            if question.step != shown:
                p.say(f"\n[{steps.index(question.step) + 1}/{len(steps)}] {question.step}")
                shown = question.step
            try:
                skip = question.skip()
                note = skip if skip else question.help() if callable(question.help) else question.help
                if isinstance(note, str) and note:
                    p.say(note)
                outcome = SKIPPED if skip else question.ask()
            except GoBack:
                if asked:
                    name, shown = asked.pop(), None  # the step is shown again
                else:
                    p.warn("this is the first question")
                continue
            if outcome is STOPPED:
                return None
            if isinstance(outcome, Redo):
                while asked and asked.pop() != outcome.question:
                    pass
                name = outcome.question
                continue
            if skip:
                self.state.pop(name, None)
            elif outcome is not SKIPPED:
                self.state[name] = outcome
                asked.append(name)
            names = [q.name for q in self.questions()]
            name = next(iter(names[names.index(name) + 1:]), None)
        return WizardPlan(self.answers(), self.state["config_path"], self.state["run_now"])

    def answers(self) -> WizardAnswers:
        s = self.state
        return WizardAnswers(
            model=s["model"], dataset_dir=str(s["dataset"].dataset_dir), checkpoint_dir=s.get("checkpoint_dir"),
            init_args={a.name: s[f"arg:{a.name}"] for a in self.arguments()}, exclude=s["exclude"],
            num_samples=len(s["dataset"].files), batch_size=s["batch_size"],
            timestep_focus=s.get("focus", "balanced"), ranks=s[self.allocation],
            preset=s.get("preset"), fragile=s["fragile"], stopping=s[self.stopping], seed=s["seed"], include=s["include"],
        )

    # -- what the answers so far decide ----------------------------------------------------------

    @property
    def model(self) -> str:
        return self.state.get("model", DEMO_MODEL)

    def arguments(self) -> list[TypedQuestion]:
        """The model's required ``__init__`` arguments, once the model is known."""
        known = "model" in self.state
        return [TypedQuestion(name, annotation) for name, annotation in (required_init_arguments(self.model) if known else {}).items()]

    def ask_typed(self, name: str, question: TypedQuestion, settings: Optional[type] = None) -> Any:
        """A model argument, the seed, or a settings field (whose default is the last valid object's: Enter cannot loop)."""
        value = getattr(self.state[settings], question.name) if settings else self.state.get(name)
        default = None if settings is None and name not in self.state else _text(value)
        return self.prompter.ask(f"{question.key} ({type_name(question.annotation)})", default=default, parse=question.parse)

    def ask_patterns(self, name: str, empty: str) -> Optional[list[str]]:
        """Include (``None``: every ``nn.Linear``) or exclude patterns; the earlier answer is the default."""
        default = DEMO_EXCLUDE if name == "exclude" and self.model == DEMO_MODEL else ()
        text = ", ".join(self.state.get(name, default) or ()) or None
        patterns = self.prompter.ask(name.capitalize(), default=text, parse=parse_patterns, empty=empty)
        return patterns or (None if name == "include" else [])

    def ask_dataset(self) -> Any:
        dataset = self.prompter.ask("Dataset folder (one .pt / .safetensors sample per file)", parse=parse_dataset_folder)
        self.prompter.say(f"  found {dataset.describe()}")
        existing = dataset.dataset_dir / FISHER_MAP_FILENAME
        if existing.exists():
            self.prompter.warn(f"{existing} already exists; the analysis will replace it and keep it as {existing.name}.bak")
        return dataset

    def ask_preset(self) -> Optional[str]:
        """A preset's name (``None``: none); the rank questions then offer its values."""
        for name, values in self.presets.items():
            self.prompter.say(f"  {name:<10} {values.describe()}")
        answer = self.prompter.choice("Start from a preset?", ["none", *self.presets], default="none")
        self.state[self.allocation] = self.presets.get(answer, self.allocation())
        return answer if answer in self.presets else None

    def check_settings(self, settings: type, fields: list[TypedQuestion]) -> Union[object, Redo]:
        """Build the settings object from the answers: its own check decides; an error re-asks from the field it names."""
        try:
            self.state[settings] = dataclasses.replace(self.state[settings], **{q.name: self.state[q.key] for q in fields})
        except SettingsError as error:
            again = next((q.key for q in fields if q.name == error.field), fields[0].key)
            self.prompter.warn(f"{error}; answer again from {again}")
            return Redo(again)
        return SKIPPED

    def ask_fragile_confirm(self) -> Any:
        self.prompter.say("  Any answer but 'yes' stops here without writing anything.")
        if self.prompter.ask("Type 'yes' to continue with this model anyway", empty="stop").lower() != "yes":
            self.prompter.say("stopped: nothing written. Prefer the base model, or train flat-rank LoRA without a map.")
            return STOPPED
        return True

    def show_summary(self) -> object:
        """The config exactly as it will be saved, the samples it reads and an estimated run time."""
        p, answers = self.prompter, self.answers()
        config = render_config(answers)
        p.say("  estimating run time (loading the model and timing one batch)...")
        try:
            estimate = self.estimate(config, answers.num_samples).describe()
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - any failure of the user's model is reported, not raised
            p.warn(f"could not time a batch: {short_reason(error)}")
            estimate = "unknown"
        batches = plural(max(1, math.ceil(answers.num_samples / answers.batch_size)), "batch")
        p.say("\n".join(f"  | {line}" for line in config.splitlines()))
        p.say(f"  samples             {self.state['dataset'].describe()} ({batches} per pass)")
        p.say(f"  estimated run time  {estimate}")
        return SKIPPED


def _text(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _pairs(flags: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in flags.items())


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]


def run_wizard(argv: list[str]) -> int:
    """``lightning-fisher wizard [--save-config PATH] [--presets-dir DIR]``.

    Returns:
        The analysis' exit status when it is run; 0 when only the config is saved; 1 when the user
        stops at the fragile-model warning or input ends; 2 without a terminal; 130 on Ctrl-C.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-fisher wizard",
        description="Interactive set-up of a Fisher analysis: asks for the settings, saves a config for "
        "`lightning-fisher analyze --config FILE`, and can run it.",
    )
    parser.add_argument("--save-config", metavar="PATH", help=f"where to save the YAML config (default offered: DATASET_FOLDER/{CONFIG_FILENAME})")
    parser.add_argument("--presets-dir", metavar="DIR", type=Path,
                        help="folder of rank presets NAME.yaml (default: ./configs/presets, else the checkout's configs/presets)")
    args = parser.parse_args(argv)
    if args.presets_dir is not None and not args.presets_dir.is_dir():
        print(f"lightning-fisher wizard: error: --presets-dir {args.presets_dir} is not a folder", file=sys.stderr)
        return 2
    if not sys.stdin.isatty():
        print(NOT_INTERACTIVE, file=sys.stderr)
        return 2
    presets, problems = load_presets(args.presets_dir or default_presets_dir())
    prompter = Prompter()
    for problem in problems:
        prompter.warn(f"skipping a preset: {problem}")
    try:
        plan = Wizard(prompter, presets=presets, save_config=args.save_config).collect()
    except KeyboardInterrupt:
        prompter.say(f"\n{CANCELLED}")
        return 130
    except EOFError:
        prompter.say(f"\n{CANCELLED} (end of input)")
        return 1
    if plan is None:
        return 1
    try:
        write_text_atomic(plan.config_path, render_config(plan.answers), make_parents=True)
    except OSError as error:
        print(f"lightning-fisher wizard: error: cannot write {plan.config_path}: {error}", file=sys.stderr)
        return 1
    command = shlex.join(["lightning-fisher", "analyze", "--config", str(plan.config_path)])
    prompter.say(f"config saved to {plan.config_path}")
    fit_hint = "then train with the map (fit takes these flags, not the analysis config):\n  " + fit_command(plan.answers)
    if plan.answers.exclude and plan.answers.model != DEMO_MODEL:
        fit_hint += ("\n  (modules you left out get no adapter; PEFT freezes every other weight under the adapter root, so to "
                     "train a new head fully add --adaptive_lora.adapter_root NAME of the submodule that holds the adapted layers)")
    if not plan.run_now:
        prompter.say(f"run the analysis later with:\n  {command}\n{fit_hint}")
        return 0
    prompter.say(f"running: {command}\n")
    from lightning_fisher.cli.lightning_clis import run_analyze

    status = run_analyze(["--config", str(plan.config_path)])
    if status == 0:
        prompter.say(fit_hint)
    return status
