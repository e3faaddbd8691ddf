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
from typing import Callable, Optional, TypeVar

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
    answers_to_config,
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
    write_config,
)
from lightning_fisher.cli.wizard_estimate import RunTimeEstimate, analysis_batches, estimate_run_time, short_reason
from lightning_fisher.fisher_map import FISHER_MAP_FILENAME
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
            p.warn(f"{existing_map} already exists; the analysis will replace it and keep it as {existing_map.name}.bak")
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
                p.say(f"  {name:<10} {values.describe()}")
            answer = p.choice("Start from a preset?", ["none", *self.presets], default="none")
            if answer != "none":
                settings, preset = self.presets[answer], answer
        for mode, text in MODE_HELP.items():
            p.say(f"  {mode:<10} {text}")
        while True:
            rank = p.ask("Base rank", default=str(settings.rank), parse=parse_positive_int)
            rank_min = p.ask("Minimum rank", default=str(settings.rank_min), parse=parse_positive_int)
            rank_max = p.ask("Maximum rank", default=str(settings.rank_max), parse=parse_positive_int)
            mode = p.choice("Rank mode", list(ALLOCATION_MODES), default=settings.mode)
            try:
                return RankSettings(rank, rank_min, rank_max, mode), preset
            except ValueError as error:
                p.warn(f"{error}; enter the rank budget again")

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
            p.warn(f"could not time a batch: {short_reason(error)}")
            estimate = "unknown"
        focus = TimestepFocus.parse(answers.timestep_focus)
        focus_text = focus.describe()
        ranks = answers.ranks.describe() + (f" (from preset {answers.preset})" if answers.preset else "")
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
