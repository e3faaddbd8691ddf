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

import contextlib
import sys
import warnings
from typing import Literal, Optional, Union

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_fisher.allocation import check_rank_settings
from lightning_fisher.cli.arguments import normalize_flags
from lightning_fisher.timesteps import FOCUS_HELP, TimestepFocus
from lightning_fisher.training.adaptive_lora import AdaptiveLoRA

__all__ = ["AnalyzeCLI", "TrainCLI", "build_analyze_cli", "run_analyze", "run_trainer_subcommand"]

DEFAULT_DATA = {"class_path": "lightning_fisher.TensorDirectoryDataModule"}


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

    def add_arguments_to_parser(self, parser) -> None:
        _add_dataset_dir(parser, required=True)
        add = parser.add_argument
        add("--output", type=Optional[str], default=None, help="Map file or folder (default: the dataset folder).")
        add("--rank", type=int, default=64, help="Target median rank (flat-equivalent rank with --rank_mode budget).")
        add("--rank_min", type=int, default=16, help="Minimum rank of an adapted module.")
        add("--rank_max", type=int, default=128, help="Maximum rank of an adapted module.")
        add(
            "--rank_mode",
            type=Literal["median", "budget"],
            default="median",
            help="median: --rank is the median rank; budget: total LoRA parameters equal flat LoRA at --rank.",
        )
        add(
            "--timestep_focus",
            type=str,
            default="balanced",
            help="Diffusion / flow models: " + "; ".join(f"{k}: {v}" for k, v in FOCUS_HELP.items()) + ".",
        )
        add("--convergence_patience", type=int, default=5, help="Stop when the ranking is stable for this many batches.")
        add("--stability_threshold", type=float, default=0.9, help="Split-half Spearman correlation counted as stable.")
        add("--min_batches", type=int, default=5, help="Never stop before this many batches.")
        add("--max_batches", type=Optional[int], default=200, help="Stop after this many batches regardless.")
        add("--seed", type=Optional[int], default=0, help="Seeds sample order, noise and timesteps.")
        add(
            "--include",
            type=Optional[Union[list[str], str]],
            default=None,
            help="Candidate module name patterns, comma-separated or a list (default: every nn.Linear).",
        )
        add(
            "--exclude",
            type=Union[list[str], str],
            default=[],
            help="Module name patterns to leave out, comma-separated or a list (e.g. a freshly initialised head).",
        )
        add("--loss_reduction", type=Literal["mean", "sum"], default="mean", help="The loss is the mean or the sum over samples.")
        add("--train_mode", type=bool, default=False, help="Analyse with dropout on (default: eval mode).")
        add("--score_power", type=float, default=0.5, help="Rank grows as score ** score_power.")
        add("--exclude_threshold", type=float, default=0.05, help="No adapter below this fraction of the median score.")
        add("--lora_alpha", type=Optional[float], default=None, help="Alpha at the base rank recorded in the map (default 2 * rank).")
        add("--use_rslora", type=bool, default=False, help="Record the rsLoRA alpha policy in the map.")

    def before_instantiate_classes(self) -> None:
        config = self.config
        TimestepFocus.parse(config.timestep_focus)
        check_rank_settings(
            rank=config.rank,
            rank_min=config.rank_min,
            rank_max=config.rank_max,
            mode=config.rank_mode,
            score_power=config.score_power,
            exclude_threshold=config.exclude_threshold,
        )


class TrainCLI(LightningCLI):
    """``fit`` / ``validate`` / ``test`` with :class:`AdaptiveLoRA` always present."""

    def add_arguments_to_parser(self, parser) -> None:
        _add_dataset_dir(parser, required=False)
        parser.add_lightning_class_args(AdaptiveLoRA, "adaptive_lora")


def _patterns(value: Union[list[str], str, None]) -> Optional[list[str]]:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]


@contextlib.contextmanager
def _args_from_caller():
    # The console script hands LightningCLI its own argv slice; Lightning warns whenever args
    # are given while sys.argv is not empty, which is always the case here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
        yield


def build_analyze_cli(args: list[str], *, exit_on_error: bool = True) -> AnalyzeCLI:
    """Parse ``analyze`` arguments and instantiate model, datamodule and trainer (nothing runs)."""
    parser_kwargs = {"prog": "lightning-fisher analyze", "description": "Fisher analysis: write fisher_map.json."}
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
            trainer_defaults=dict(
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                max_epochs=1,
                num_sanity_val_steps=0,
                limit_val_batches=0,
            ),
            args=normalize_flags(args),
            parser_kwargs=parser_kwargs,
        )


def run_analyze(argv: list[str]) -> int:
    from lightning_fisher.training.analyze import analyze

    cli = build_analyze_cli(argv)
    c = cli.config
    fisher_map = analyze(
        cli.model,
        cli.datamodule,
        output=c.output,
        rank=c.rank,
        rank_min=c.rank_min,
        rank_max=c.rank_max,
        rank_mode=c.rank_mode,
        timestep_focus=c.timestep_focus,
        convergence_patience=c.convergence_patience,
        stability_threshold=c.stability_threshold,
        min_batches=c.min_batches,
        max_batches=c.max_batches,
        seed=c.seed,
        include=_patterns(c.include),
        exclude=_patterns(c.exclude) or (),
        loss_reduction=c.loss_reduction,
        train_mode=c.train_mode,
        score_power=c.score_power,
        exclude_threshold=c.exclude_threshold,
        lora_alpha=c.lora_alpha,
        use_rslora=c.use_rslora,
        trainer=cli.trainer,
    )
    if cli.trainer.is_global_zero:
        analysis = fisher_map.analysis
        rank_zero_info(
            f"fisher map written to {fisher_map.path}\n  {fisher_map.summary()}\n"
            f"  analysis: {analysis.samples} samples in {analysis.batches} batches, {analysis.stop_reason}"
        )
    return 0


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
        args=[subcommand, *normalize_flags(argv)],
        parser_kwargs={subcommand: {"prog": f"lightning-fisher {subcommand}"}},
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_analyze(sys.argv[1:]))
