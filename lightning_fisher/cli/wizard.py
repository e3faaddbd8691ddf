"""``lightning-fisher wizard``: an interactive front end that writes an ``analyze`` config.

The wizard asks, step by step, for what ``lightning-fisher analyze`` needs (model and its
required ``__init__`` arguments, dataset folder, timestep focus, rank budget), checks each
answer where it is given, shows a summary with an estimated run time, and saves a YAML config
in exactly the format ``lightning-fisher analyze --config FILE`` reads. Running the analysis
from the wizard calls that same command on that file, so the wizard is a way to *write* a
config, never a second way to run the analysis. At the end it prints the exact ``analyze``
and ``fit`` commands (``fit`` takes flags, not the analysis config).

``back`` at any question returns to the previous one. The timestep focus is asked only for a
model with a ``timestep_sampler`` (read from its class, see
:func:`~lightning_fisher.cli.wizard_answers.has_timestep_sampler`), the checkpoint folder only
for one that takes ``checkpoint_dir``.

Nothing is written before the last question is answered: Ctrl-C (exit status 130) or end of
input (exit status 1) at any prompt leaves no config and no map behind. The saved config goes
by default next to the map it produces, ``<dataset folder>/fisher_analyze.yaml``
(``--save-config`` changes the default offered).

The module is layered so that each part can be tested without a terminal:

- :class:`Prompter`: one question with a default, a check and re-asking; yes/no; a choice.
  It reads and writes through the callables it is given.
- :mod:`~lightning_fisher.cli.wizard_answers`: checking one answer (``parse_*``), rank
  presets, and :class:`WizardAnswers` -> config (pure).
- :mod:`~lightning_fisher.cli.wizard_estimate`: the run-time estimate in the summary.
- :class:`Wizard`: the order of the questions; :func:`run_wizard`: the subcommand.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from lightning_fisher.allocation import ALLOCATION_MODES
from lightning_fisher.cli.wizard_answers import (
    CONFIG_FILENAME,
    DEMO_MODEL,
    DEFAULT_BATCH_SIZE,
    FRAGILE_FIT_FLAGS,
    DatasetFolder,
    RankSettings,
    WizardAnswers,
    accepts_checkpoint_dir,
    analyze_command,
    answers_to_config,
    fit_command,
    has_timestep_sampler,
    default_presets_dir,
    load_presets,
    parse_config_path,
    parse_dataset_folder,
    parse_focus_range,
    parse_folder,
    parse_model_class,
    parse_patterns,
    parse_positive_int,
    render_config,
    required_init_arguments,
    requires_checkpoint_dir,
    write_config,
)
from lightning_fisher.cli.wizard_estimate import RunTimeEstimate, analysis_batches, estimate_run_time, short_reason
from lightning_fisher.fisher_map import FISHER_MAP_FILENAME
from lightning_fisher.timesteps import FOCUS_HELP, TimestepFocus
from lightning_fisher.wording import plural

__all__ = [
    "BACK",
    "GoBack",
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
    "parse_config_path",
    "render_config",
    "run_wizard",
    "write_config",
]

T = TypeVar("T")

#: Exclusions offered by default for the demo model: its classification head is freshly initialised.
DEMO_EXCLUDE = ("head",)

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


# --------------------------------------------------------------------------------------------
# Asking


#: Typed at any question, returns to the previous one.
BACK = "back"


class GoBack(Exception):
    """The user typed ``back``: the previous question is asked again."""


class Prompter:
    """Asks questions through ``input_fn`` and ``output_fn``; re-asks until an answer is valid.

    The answer ``back`` (any case) raises :class:`GoBack` from every kind of question.

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
            answer = self._read(prompt)
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

    def _read(self, prompt: str) -> str:
        answer = self.input_fn(prompt).strip()
        if answer.lower() == BACK:
            raise GoBack
        return answer

    def yes_no(self, question: str, *, default: bool) -> bool:
        """Ask a y/n question; Enter gives ``default``."""
        prompt = f"{question} [{'Y/n' if default else 'y/N'}]: "
        while True:
            answer = self._read(prompt).lower()
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
# The flow


@dataclass(frozen=True)
class WizardPlan:
    """What the wizard decided: the answers, where to save them, and whether to run now."""

    answers: WizardAnswers
    config_path: Path
    run_now: bool


# What a question handler returns besides its normal ``None`` (answered).
SKIPPED = "skipped"  # nothing asked: ``back`` from the next question goes further back
STOPPED = "stopped"  # the user stopped the wizard (the fragile-model warning)


@dataclass(frozen=True)
class Redo:
    """Ask again from the earlier question ``question`` (an invalid rank budget, a refused overwrite)."""

    question: str


#: Step of each question (the ``[n/7]`` headers); ``arg:NAME`` questions belong to the model step.
STEP_TITLES = {
    1: "Model",
    2: "Dataset",
    3: "Timestep focus (diffusion / flow models)",
    4: "Rank budget",
    5: "Fragile model",
    6: "Summary",
    7: "Save and run",
}
QUESTION_STEPS = {
    "model": 1, "checkpoint_dir": 1, "exclude": 1,
    "dataset": 2, "batch_size": 2,
    "focus": 3, "focus_range": 3,
    "preset": 4, "rank": 4, "rank_min": 4, "rank_max": 4, "rank_mode": 4,
    "fragile": 5, "fragile_confirm": 5,
    "summary": 6,
    "config_path": 7, "overwrite": 7, "run_now": 7,
}
_ARG = "arg:"


class Wizard:
    """The questions, in order. :meth:`collect` returns the plan, or ``None`` when the user stops.

    Each question is a method ``ask_<name>`` that reads and writes :attr:`state`. ``back`` at
    any question asks the previous *asked* question again (those skipped, e.g. the timestep
    focus of a model without a ``timestep_sampler``, are passed over); answers already given
    further on are kept and offered again where they are defaults.

    Args:
        prompter: asks the questions.
        presets: rank presets by name (see :func:`load_presets`).
        save_config: default offered for where to save the config.
        estimate: run-time estimate of a config text and sample count (for tests; default
            :func:`estimate_run_time`).
    """

    STEPS = len(STEP_TITLES)

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
        self.state: dict[str, Any] = {}

    def _step(self, number: int, title: str) -> None:
        self.prompter.say(f"\n[{number}/{self.STEPS}] {title}")

    def _questions(self) -> list[str]:
        arguments = [_ARG + argument.name for argument in self.state.get("required", [])]
        return [
            "model", *arguments, "checkpoint_dir", "exclude", "dataset", "batch_size", "focus", "focus_range",
            "preset", "rank", "rank_min", "rank_max", "rank_mode", "fragile", "fragile_confirm", "summary",
            "config_path", "overwrite", "run_now",
        ]

    def collect(self) -> Optional[WizardPlan]:
        p = self.prompter
        p.say("lightning-fisher wizard: set up a Fisher analysis, which writes fisher_map.json (per-module")
        p.say(f"LoRA ranks) into your dataset folder. Enter takes the [default]; '{BACK}' returns to the")
        p.say("previous question; Ctrl-C cancels. Nothing is written until the last question.")
        self.state = {"ranks": RankSettings(), "preset": None, "init_args": {}}
        asked: list[str] = []
        question: Optional[str] = "model"
        shown_step = 0
        while question is not None:
            step = QUESTION_STEPS.get(question, 1)
            if step != shown_step:
                self._step(step, STEP_TITLES[step])
                shown_step = step
            try:
                outcome = self._ask(question)
            except GoBack:
                if not asked:
                    p.warn("this is the first question")
                    continue
                question = asked.pop()
                shown_step = 0  # show where we are again
                continue
            if outcome == STOPPED:
                return None
            if isinstance(outcome, Redo):
                while asked and asked[-1] != outcome.question:
                    asked.pop()
                if asked:
                    asked.pop()
                question = outcome.question
                continue
            if outcome != SKIPPED:
                asked.append(question)
            questions = self._questions()
            position = questions.index(question) + 1
            question = questions[position] if position < len(questions) else None
        return WizardPlan(self._answers(), self.state["config_path"], self.state["run_now"])

    def _ask(self, question: str) -> Any:
        if question.startswith(_ARG):
            return self.ask_init_argument(question[len(_ARG):])
        return getattr(self, f"ask_{question}")()

    def _answers(self) -> WizardAnswers:
        state = self.state
        dataset: DatasetFolder = state["dataset"]
        required = [argument.name for argument in state.get("required", [])]
        return WizardAnswers(
            model=state["model"],
            dataset_dir=dataset.path,
            checkpoint_dir=state.get("checkpoint_dir"),
            init_args={name: state["init_args"][name] for name in required},
            exclude=state["exclude"],
            num_samples=len(dataset.files),
            batch_size=state["batch_size"],
            timestep_focus=state.get("focus", "balanced"),
            ranks=state["ranks"],
            preset=state["preset"],
            fragile=state["fragile"],
        )

    # -- step 1: model -----------------------------------------------------------------------

    def ask_model(self) -> None:
        model = self.prompter.ask(
            "LightningModule class path", default=self.state.get("model", DEMO_MODEL), parse=parse_model_class
        )
        if model != self.state.get("model"):
            self.state["init_args"] = {}
        self.state["model"] = model
        self.state["required"] = required_init_arguments(model)
        if self.state["required"]:
            names = ", ".join(argument.name for argument in self.state["required"])
            self.prompter.say(f"  {model.rpartition('.')[2]} needs: {names}")

    def ask_init_argument(self, name: str) -> None:
        argument = next(a for a in self.state["required"] if a.name == name)
        previous = self.state["init_args"].get(name)
        self.state["init_args"][name] = self.prompter.ask(
            f"{name} ({argument.describe()})",
            default=None if previous is None else str(previous),
            parse=argument.parse,
        )

    def ask_checkpoint_dir(self) -> Any:
        model = self.state["model"]
        if not accepts_checkpoint_dir(model):
            self.prompter.say(f"  ({model.rpartition('.')[2]} takes no checkpoint_dir argument: no checkpoint folder to ask for)")
            self.state["checkpoint_dir"] = None
            return SKIPPED
        empty = None if requires_checkpoint_dir(model) else "the model's own default"
        self.state["checkpoint_dir"] = self.prompter.ask("Checkpoint folder", parse=parse_folder, empty=empty)
        return None

    def ask_exclude(self) -> None:
        p = self.prompter
        p.say("  Modules to leave out of the analysis, e.g. a freshly initialised head")
        p.say("  (comma-separated name patterns; 'none' for none).")
        self.state["exclude"] = p.ask(
            "Exclude",
            default=",".join(DEMO_EXCLUDE) if self.state["model"] == DEMO_MODEL else None,
            parse=parse_patterns,
            empty="none",
        )

    # -- step 2: dataset ---------------------------------------------------------------------

    def ask_dataset(self) -> None:
        p = self.prompter
        dataset = p.ask("Dataset folder (one .pt / .safetensors sample per file)", parse=parse_dataset_folder)
        p.say(f"  found {dataset.describe()}")
        existing_map = Path(dataset.path) / FISHER_MAP_FILENAME
        if existing_map.exists():
            p.warn(f"{existing_map} already exists; the analysis will replace it and keep it as {existing_map.name}.bak")
        self.state["dataset"] = dataset

    def ask_batch_size(self) -> None:
        default = str(self.state.get("batch_size", DEFAULT_BATCH_SIZE))
        self.state["batch_size"] = self.prompter.ask("Batch size", default=default, parse=parse_positive_int)

    # -- step 3: timestep focus --------------------------------------------------------------

    def ask_focus(self) -> Any:
        p = self.prompter
        model = self.state["model"]
        if not has_timestep_sampler(model):
            p.say(f"  ({model.rpartition('.')[2]} has no timestep_sampler: the analysis draws what its training_step")
            p.say("  draws, so there is no timestep focus to choose)")
            self.state["focus"] = "balanced"
            return SKIPPED
        for name, text in FOCUS_HELP.items():
            p.say(f"  {name:<10} {text}")
        self.state["focus"] = p.choice("Timestep focus", list(FOCUS_HELP), default="balanced")
        return None

    def ask_focus_range(self) -> Any:
        if self.state["focus"] != "custom":
            return SKIPPED
        self.state["focus"] = self.prompter.ask("Range LO,HI", default="0.2,0.5", parse=parse_focus_range)
        return None

    # -- step 4: rank budget -----------------------------------------------------------------

    def ask_preset(self) -> Any:
        p = self.prompter
        if not self.presets:
            return SKIPPED
        for name, values in self.presets.items():
            p.say(f"  {name:<10} {values.describe()}")
        answer = p.choice("Start from a preset?", ["none", *self.presets], default="none")
        self.state["ranks"], self.state["preset"] = (
            (RankSettings(), None) if answer == "none" else (self.presets[answer], answer)
        )
        return None

    def ask_rank(self) -> None:
        for mode, text in MODE_HELP.items():
            self.prompter.say(f"  {mode:<10} {text}")
        self.state["rank"] = self.prompter.ask(
            "Base rank", default=str(self.state["ranks"].rank), parse=parse_positive_int
        )

    def ask_rank_min(self) -> None:
        self.state["rank_min"] = self.prompter.ask(
            "Minimum rank", default=str(self.state["ranks"].rank_min), parse=parse_positive_int
        )

    def ask_rank_max(self) -> None:
        self.state["rank_max"] = self.prompter.ask(
            "Maximum rank", default=str(self.state["ranks"].rank_max), parse=parse_positive_int
        )

    def ask_rank_mode(self) -> Any:
        mode = self.prompter.choice("Rank mode", list(ALLOCATION_MODES), default=self.state["ranks"].mode)
        try:
            # the defaults offered next time are the last valid budget, so Enter cannot loop
            self.state["ranks"] = RankSettings(
                self.state["rank"], self.state["rank_min"], self.state["rank_max"], mode
            )
        except ValueError as error:
            self.prompter.warn(f"{error}; enter the rank budget again")
            return Redo("rank")
        return None

    # -- step 5: fragile model ---------------------------------------------------------------

    def ask_fragile(self) -> None:
        self.state["fragile"] = self.prompter.yes_no("Is this a distilled / few-step ('turbo') model?", default=False)

    def ask_fragile_confirm(self) -> Any:
        if not self.state["fragile"]:
            return SKIPPED
        self.prompter.say(FRAGILE_WARNING)
        self.prompter.say("  Any answer but 'yes' stops here without writing anything.")
        answer = self.prompter.ask("Type 'yes' to continue with this model anyway", empty="stop")
        if answer.lower() != "yes":
            self.prompter.say("stopped: nothing written. Prefer the base model, or train flat-rank LoRA without a map.")
            return STOPPED
        return None

    # -- step 6: summary ---------------------------------------------------------------------

    def ask_summary(self) -> str:
        self.show_summary(self._answers(), self.state["dataset"])
        return SKIPPED

    def show_summary(self, answers: WizardAnswers, dataset: DatasetFolder) -> None:
        p = self.prompter
        p.say("  estimating run time (loading the model and timing one batch)...")
        try:
            estimate = self.estimate(render_config(answers), answers.num_samples).describe()
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - any failure of the user's model is reported, not raised
            p.warn(f"could not time a batch: {short_reason(error)}")
            estimate = "unknown"
        focus = TimestepFocus.parse(answers.timestep_focus)
        focus_text = focus.describe()
        ranks = answers.ranks.describe() + (f" (from preset {answers.preset})" if answers.preset else "")
        batches = max(1, math.ceil(answers.num_samples / answers.batch_size))
        rows = [("model", answers.model)]
        if answers.init_args:
            rows.append(("model arguments", ", ".join(f"{k}={v!r}" for k, v in answers.init_args.items())))
        rows += [
            ("checkpoint", answers.checkpoint_dir or "(the model's own default)"),
            ("exclude", ", ".join(answers.exclude) or "(nothing)"),
            ("dataset folder", answers.dataset_dir),
            ("samples", dataset.describe()),
            ("batch size", f"{answers.batch_size} ({plural(batches, 'batch')} per pass)"),
            ("timestep focus", focus_text),
            ("rank budget", ranks),
            ("fragile model", "YES (opted in; see the warning above)" if answers.fragile else "no"),
            ("estimated run time", estimate),
        ]
        for label, value in rows:
            p.say(f"  {label:<19} {value}")
        if answers.fragile:
            p.warn(f"fragile model: train on the map with `lightning-fisher fit ... {FRAGILE_FIT_FLAGS}`")

    # -- step 7: save and run ----------------------------------------------------------------

    def ask_config_path(self) -> None:
        default = self.save_config or str(Path(self.state["dataset"].path) / CONFIG_FILENAME)
        self.state["config_path"] = self.prompter.ask("Save the config to", default=default, parse=parse_config_path)

    def ask_overwrite(self) -> Any:
        path = self.state["config_path"]
        if not path.exists():
            return SKIPPED
        return None if self.prompter.yes_no(f"{path} exists. Overwrite it?", default=False) else Redo("config_path")

    def ask_run_now(self) -> None:
        self.state["run_now"] = self.prompter.yes_no("Run the analysis now?", default=True)


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
    command = analyze_command(plan.config_path)
    prompter.say(f"config saved to {plan.config_path}")
    fit_hint = "then train with the map (fit takes these flags, not the analysis config):\n  " + fit_command(plan.answers)
    if plan.answers.exclude and plan.answers.model != DEMO_MODEL:
        fit_hint += (
            "\n  (modules you left out get no adapter; PEFT freezes every other weight under the adapter root, "
            "so to train a new head fully add --adaptive_lora.adapter_root NAME of the submodule that holds the "
            "adapted layers)"
        )
    if not plan.run_now:
        prompter.say(f"run the analysis later with:\n  {command}\n{fit_hint}")
        return 0
    prompter.say(f"running: {command}\n")
    from lightning_fisher.cli.lightning_clis import run_analyze

    status = run_analyze(["--config", str(plan.config_path)])
    if status == 0:
        prompter.say(fit_hint)
    return status
