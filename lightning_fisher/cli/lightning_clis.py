"""``analyze`` and ``fit`` / ``validate`` / ``test`` on ``LightningCLI``.

Both take the model as a class path (``--model my_pkg.MyModule`` plus ``--model.init_args.*``,
or ``model:`` in a ``--config`` YAML) and the data as a dataset folder: ``--dataset-dir`` is
linked to ``data.init_args.dataset_dir`` of the datamodule, which defaults to
:class:`~lightning_fisher.TensorDirectoryDataModule`. A datamodule given with ``--data`` must
therefore take a ``dataset_dir`` argument. ``fit`` always carries an
:class:`~lightning_fisher.AdaptiveLoRA` callback (``--adaptive_lora.*`` options), which finds
``fisher_map.json`` in that folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_fisher.allocation.settings import AllocationSettings, field_help
from lightning_fisher.data.atomic_io import folders_to_create
from lightning_fisher.cli.arguments import ALIASES, normalize_flags
from lightning_fisher.cli.interrupts import interrupt_signal
from lightning_fisher.errors import CommandInterrupted
from lightning_fisher.fisher_map.codec import resolve_map_path
from lightning_fisher.wording import folders_created, plural
from lightning_fisher.cli.values import comma_list
from lightning_fisher.analysis.stability import StabilityRule
from lightning_fisher.analysis.options import AnalysisOptions
from lightning_fisher.training.defaults import TRAINER_DEFAULTS
from lightning_fisher.training.adaptive_lora import AdaptiveLoRA, flag_spelling

__all__ = ["AnalyzeCLI", "TrainCLI", "build_analyze_cli", "run_analyze", "run_trainer_subcommand"]

DEFAULT_DATA = {"class_path": "lightning_fisher.TensorDirectoryDataModule"}


# The descriptions `--help` starts with.
DESCRIPTIONS = {
    "analyze": "Fisher analysis: run your model's training_step on the dataset folder, score every candidate "
    "module, and write fisher_map.json (per-module LoRA ranks) into the folder, or to --output. A map already "
    "there is kept as fisher_map.json.bak.",
    "fit": "Train with LoRA adapters: a fisher_map.json in the dataset folder sets the ranks (AdaptiveLoRA); "
    "without one, or with --ignore-fisher-map, every candidate module gets flat LoRA.",
    "validate": "Validate with the same adapters as fit (from the map, or flat); --ckpt_path loads a fit checkpoint.",
    "test": "Test with the same adapters as fit (from the map, or flat); --ckpt_path loads a fit checkpoint.",
}

# Command-line shortcuts (rewritten by normalize_flags before parsing): listed in --help, and
# refused in a config file, where the full key is the one place the value goes.
SHORTCUT_HELP = {
    "--checkpoint-dir": ("DIR", "Passed to your model as checkpoint_dir (where its pretrained weights are); "
                         "same as --model.init_args.checkpoint_dir DIR."),
    "--ignore-fisher-map": (None, "Train flat LoRA at the map's base rank even when a map exists; "
                            "same as --adaptive_lora.ignore_fisher_map true."),
}


def _add_shortcuts(parser, flags: tuple[str, ...]) -> None:
    group = parser.add_argument_group("Shortcuts")
    for flag in flags:
        metavar, help_text = SHORTCUT_HELP[flag]
        if metavar is None:
            group.add_argument(flag, nargs="?", metavar="true|false", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, metavar=metavar, default=argparse.SUPPRESS, help=help_text)


def _refuse_shortcuts_in_config(config) -> None:
    for flag in SHORTCUT_HELP:
        key = flag[2:].replace("-", "_")
        if key in config:
            full = ALIASES["--" + key].lstrip("-")
            raise ValueError(f"{key}: in a config file write {full} (the flag {flag} is a command-line shortcut)")


def _add_dataset_dir(parser, *, required: bool) -> None:
    parser.add_argument(
        "--dataset_dir",
        type=Optional[str],
        default=None,
        required=required,
        help="Dataset folder: one .pt or .safetensors sample per file; fisher_map.json is read from / written to it. "
        "Also --dataset-dir.",
    )
    parser.set_defaults({"data": DEFAULT_DATA})
    parser.link_arguments("dataset_dir", "data.init_args.dataset_dir", apply_on="parse")


class AnalyzeCLI(LightningCLI):
    """Parses ``lightning-fisher analyze``; :func:`run_analyze` runs it."""

    def add_default_arguments_to_parser(self, parser) -> None:
        # Lightning's own option, here only as the target of --seed (linked below): analyze has one seed.
        parser.add_argument(
            "--seed_everything",
            type=Union[bool, int],
            default=False,
            help="Set from --seed: seed_everything(seed) runs before the model is built (no seed: not run).",
        )

    def add_arguments_to_parser(self, parser) -> None:
        _add_dataset_dir(parser, required=True)
        _add_shortcuts(parser, ("--checkpoint-dir",))
        add = parser.add_argument
        add("--output", type=Optional[str], default=None, help="Map file or folder (default: the dataset folder).")
        _add_settings_flags(parser, AllocationSettings, only=("rank", "rank_min", "rank_max", "mode", "criterion"))
        _add_option_flag(parser, "timestep_focus", str)
        _add_settings_flags(parser, StabilityRule)
        _add_option_flag(parser, "seed", Optional[int])
        # One seed option: --seed also seeds building the model (Lightning's seed_everything).
        parser.link_arguments("seed", "seed_everything", compute_fn=_seed_or_false, apply_on="parse")
        _add_option_flag(parser, "include", Optional[Union[list[str], str]])
        _add_option_flag(parser, "exclude", Union[list[str], str], default=[])
        _add_option_flag(parser, "loss_reduction", Literal["mean", "sum"])
        _add_option_flag(parser, "train_mode", bool)
        _add_settings_flags(parser, AllocationSettings, only=("score_power", "exclude_threshold"))
        _add_option_flag(parser, "lora_alpha", Optional[float])
        _add_option_flag(parser, "use_rslora", bool)

    def before_instantiate_classes(self) -> None:
        # Parsed and checked once, before the model is built; run_analyze passes the objects on.
        config = self.config
        _refuse_shortcuts_in_config(config)
        self.options = AnalysisOptions(
            **{name: config[name] for name in _OPTION_FLAGS},
            include=_patterns(config.include),
            exclude=_patterns(config.exclude) or (),
        )
        self.allocation = _settings_from(config, AllocationSettings)
        self.stopping = _settings_from(config, StabilityRule)


# The analysis options given as flags under their own names (include / exclude are parsed as lists).
_OPTION_FLAGS = ("timestep_focus", "seed", "loss_reduction", "train_mode", "lora_alpha", "use_rslora")


def _add_option_flag(parser, name: str, cli_type: Any, **overrides: Any) -> None:
    """``--NAME`` for one :class:`AnalysisOptions` field: default and help from the field; the type as parsed."""
    option = AnalysisOptions.field(name)
    kwargs = {"type": cli_type, "default": option.default, "help": option.metadata["help"], **overrides}
    parser.add_argument(f"--{option.metadata['flag']}", **kwargs)


def _seed_or_false(seed: Optional[int]) -> Union[bool, int]:
    return False if seed is None else seed


def _add_settings_flags(parser, settings: type, *, only: Optional[tuple[str, ...]] = None) -> None:
    """One ``--flag`` per field of a settings dataclass: its type, default and help come from the field."""
    types = typing.get_type_hints(settings)  # the fields' annotations are strings (postponed evaluation)
    for f in dataclasses.fields(settings):
        if only is None or f.name in only:
            parser.add_argument(f"--{f.metadata['flag']}", type=types[f.name], default=f.default, help=field_help(f))


def _settings_from(config, settings: type):
    """The settings object from the parsed flags (raises the settings' own error, naming the field)."""
    return settings(**{f.name: config[f.metadata["flag"]] for f in dataclasses.fields(settings)})


class TrainCLI(LightningCLI):
    """``fit`` / ``validate`` / ``test`` with :class:`AdaptiveLoRA` always present."""

    def add_arguments_to_parser(self, parser) -> None:
        _add_dataset_dir(parser, required=False)
        _add_shortcuts(parser, ("--checkpoint-dir", "--ignore-fisher-map"))
        parser.add_lightning_class_args(AdaptiveLoRA, "adaptive_lora")

    def before_instantiate_classes(self) -> None:
        _refuse_shortcuts_in_config(self.config[self.subcommand])

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        use_flag_spelling(self.trainer)


def use_flag_spelling(trainer) -> None:
    """Messages of the trainer's :class:`AdaptiveLoRA` name options as flags (``--adaptive_lora.strict false``)."""
    for callback in trainer.callbacks:
        if isinstance(callback, AdaptiveLoRA):
            callback.spell_option = flag_spelling


def _patterns(value: Union[list[str], str, None]) -> Optional[list[str]]:
    return None if value is None else comma_list(value)


@contextlib.contextmanager
def _args_from_caller():
    # The console script hands LightningCLI its own argv slice; Lightning warns whenever args
    # are given while sys.argv is not empty, which is always the case here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
        yield


def build_analyze_cli(args: list[str], *, exit_on_error: bool = True) -> AnalyzeCLI:
    """Parse ``analyze`` arguments and instantiate model, datamodule and trainer (nothing runs).

    Args:
        args: the command line after ``analyze``.
        exit_on_error: print the usage and exit on a parse error (jsonargparse's way); ``False``
            raises ``argparse.ArgumentError`` instead (the console script prints one line).
    """
    parser_kwargs = {"prog": "lightning-fisher analyze", "description": DESCRIPTIONS["analyze"]}
    if not exit_on_error:
        parser_kwargs["exit_on_error"] = False
    with _args_from_caller():
        return AnalyzeCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            auto_configure_optimizers=False,
            save_config_callback=None,
            # Lightning's default logger, as for fit (CSV under lightning_logs/, or TensorBoard when
            # installed), one row a batch; --trainer.logger false turns it off.
            trainer_defaults={**TRAINER_DEFAULTS, "logger": True},
            args=normalize_flags(args),
            parser_kwargs=parser_kwargs,
        )


def run_analyze(argv: list[str]) -> int:
    cli = build_analyze_cli(argv, exit_on_error=False)
    from lightning_fisher.training.analyze import map_destination

    destination = map_destination(cli.datamodule, None, cli.config.output)
    created = [] if destination is None else folders_to_create(resolve_map_path(destination))
    with _interruption_said(cli, destination):
        fisher_map = _analyze(cli)
    if cli.trainer.is_global_zero:
        analysis = fisher_map.analysis
        made = folders_created([folder for folder in created if folder.is_dir()])
        rank_zero_info(
            f"fisher map written to {fisher_map.path}{made}\n  {fisher_map.summary()}\n"
            f"  analysis: {analysis.samples} samples in {plural(analysis.batches, 'batch')}, {analysis.stop_reason}"
        )
    return 0


def _analyze(cli: AnalyzeCLI):
    # Imported after parsing: --help would otherwise list the analysis wrapper among the
    # known LightningModule subclasses, as if it were a model to pass.
    from lightning_fisher.training.analyze import analyze

    c = cli.config
    return analyze(
        cli.model,
        cli.datamodule,
        output=c.output,
        allocation=cli.allocation,
        stopping=cli.stopping,
        options=cli.options,
        trainer=cli.trainer,
    )


@contextlib.contextmanager
def _interruption_said(cli: AnalyzeCLI, destination: Optional[Path]):
    """Ctrl-C or SIGTERM during the analysis: one line saying that no map was written, exit 130 / 143.

    Lightning ends ``fit`` on Ctrl-C with ``sys.exit(1)`` and on SIGTERM with a ``SystemExit``
    that would exit 0; either way nothing was written, and the user should hear it. (A signal
    in the moment after the map was saved says so instead.)
    """
    file = None if destination is None else resolve_map_path(destination)
    before = _file_state(file)
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as error:
        signal_number = interrupt_signal(error)
        if signal_number is None:
            raise
        batches = cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed
        if _file_state(file) != before:
            message = f"interrupted after the fisher map was written to {file}"
        else:
            message = f"analysis interrupted after {plural(batches, 'batch')}: no map written" + (
                "; the previous map is unchanged" if before is not None else ""
            )
        raise CommandInterrupted(message, signal_number=signal_number) from None


def _file_state(file: Optional[Path]) -> Optional[tuple[int, int]]:
    """``(mtime_ns, inode)`` of a file, ``None`` when there is none: changed by any atomic replace."""
    try:
        stat = file.stat() if file is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_mtime_ns, stat.st_ino)


def run_trainer_subcommand(subcommand: str, argv: list[str]) -> int:
    with _args_from_caller():
        _run_train_cli(subcommand, argv)
    return 0


def _run_train_cli(subcommand: str, argv: list[str]) -> None:
    TrainCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # 0 is the seed Lightning would pick anyway, without its "No seed found" warning.
        seed_everything_default=0,
        args=[subcommand, *normalize_flags(argv)],
        parser_kwargs={
            "exit_on_error": False,
            subcommand: {
                "prog": f"lightning-fisher {subcommand}",
                "description": DESCRIPTIONS[subcommand],
                "exit_on_error": False,
            },
        },
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_analyze(sys.argv[1:]))
