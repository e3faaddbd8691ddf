"""``lightning-fisher compare``: does the map help on my data? Flat LoRA versus the map, same budget, same seeds.

Takes exactly the ``--config fit.yaml`` and flags of ``lightning-fisher fit`` (it is the same
:class:`~lightning_fisher.cli.lightning_clis.TrainCLI` parser), plus ``--budgets``, ``--criteria``,
``--seeds``, ``--lrs``, ``--lr_key``, ``--max_steps``, ``--output`` and ``--plot``. Every fisher arm
at a budget below or above the map's rank is judged against its flat twin at the same budget
(see :mod:`lightning_fisher.compare.plan`). The config is parsed once and
instantiated anew for every run (with ``--lrs``, with the run's learning rate written to the
config key that holds it: ``--lr_key``, or found as described in :func:`learning_rate_key`); :mod:`lightning_fisher.training.compare_runner` does the rest. What compare changes so that the
runs are short probes that leave no files behind (no checkpoints, logger or export; validation
data where there is none) is printed under the table.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_fisher.data.atomic_io import folders_to_create, unwritable_reason
from lightning_fisher.cli.arguments import normalize_flags
from lightning_fisher.cli.interrupts import interrupt_signal
from lightning_fisher.cli.lightning_clis import TrainCLI, _args_from_caller, use_flag_spelling
from lightning_fisher.cli.values import comma_list, import_class
from lightning_fisher.compare.results import MONITOR, CompareResult
from lightning_fisher.errors import CommandInterrupted, CompareError, FisherMapNotFoundError
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.peft_factory import fisher_map_path
from lightning_fisher.report.frontier import check_frontier_destination, plot_frontier
from lightning_fisher.training.compare_runner import compare_fisher_map
from lightning_fisher.training.datamodule import TensorDirectoryDataModule
from lightning_fisher.wording import folders_created, plural

__all__ = ["CompareCLI", "build_compare_cli", "run_compare"]

#: Validation share held out of the training folder when the datamodule has no validation data.
DEFAULT_VAL_FRACTION = 0.2
#: Seeds go to numpy's generator as well (``seed_everything``), which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1

# Callbacks that write files or need a logger; compare runs have neither.
_DROPPED_CALLBACKS = (ModelCheckpoint, LearningRateMonitor, DeviceStatsMonitor)


class CompareCLI(TrainCLI):
    """The ``fit`` parser plus compare's options; classes are instantiated per run by :meth:`new_run`."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        add = parser.add_argument
        add(
            "--budgets",
            type=Union[list[float], float, str],
            default="1.0",
            help="Rank budgets of the fisher arms as fractions of the map's rank, comma-separated "
            "(e.g. 1.0,0.5); 1.0 always runs. Each budget F other than 1 also runs its flat twin flat@F, flat LoRA at "
            "the same budget rank (round(rank * F), half up), and fisher@F is judged against it; full-rank flat is "
            "shown as context.",
        )
        add(
            "--criteria",
            type=Optional[Union[list[str], str]],
            default=None,
            help="Allocation criteria of the fisher arms, comma-separated (trace, spectrum); default the map's own. "
            "Each criterion gets its arm at every budget; spectrum needs a map analysed with --criterion spectrum.",
        )
        add("--seeds", type=Union[list[int], int, str], default="0,1,2", help="Seeds, comma-separated; every arm runs once per seed.")
        add(
            "--lrs",
            type=Optional[Union[list[float], float, str]],
            default=None,
            help="Learning rates, comma-separated (e.g. 1e-4,3e-4,1e-3): every arm trains at each with every seed, "
            "chooses its own on validation, and the arms are compared at their best and at equal learning rates. "
            "Default: the config's one learning rate.",
        )
        add(
            "--lr_key",
            type=Optional[str],
            default=None,
            help="Config key the --lrs values go to (default: optimizer.init_args.lr with --optimizer, else the "
            "model's learning_rate or lr argument).",
        )
        add("--max_steps", type=Optional[int], default=None, help="Train every run for this many steps (default: the config's epochs).")
        add("--output", type=Optional[str], default=None,
            help="Write the raw per-run results to this JSON file (each arm names its twin; the verdicts name the twin "
            "they were judged against).")
        add(
            "--plot",
            type=Optional[str],
            default=None,
            help="Write the frontier to this PNG: LoRA parameters (log x) against val_loss (mean ± sample std over "
            "seeds, at each arm's chosen learning rate with --lrs), one line per family (flat, fisher, "
            "fisher-CRITERION). Needs matplotlib: pip install 'lightning-fisher[plot]'.",
        )

    def before_instantiate_classes(self) -> None:
        # Fail on bad options before any model is built.
        self.budgets = parse_list(self.config.budgets, float, "--budgets")
        self.seeds = parse_list(self.config.seeds, int, "--seeds")
        criteria = self.config.criteria
        self.criteria = None if criteria is None else comma_list(criteria) or None
        out_of_range = [seed for seed in self.seeds if not 0 <= seed <= MAX_SEED]
        if out_of_range:
            raise CompareError(f"--seeds: each seed must be a whole number from 0 to {MAX_SEED}, got {out_of_range[0]}")
        if len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"--seeds: each seed once, got {self.seeds}")
        self.lrs = None if self.config.lrs is None else parse_list(self.config.lrs, float, "--lrs", noun="learning rate")
        if self.lrs is not None and len(set(self.lrs)) != len(self.lrs):
            raise CompareError(f"--lrs: each learning rate once, got {self.lrs}")
        self.lr_key = None if self.lrs is None else learning_rate_key(self.config, self.config.lr_key)
        max_steps = self.config.max_steps
        if max_steps is not None and max_steps < 1:
            raise CompareError(f"--max_steps: must be a positive number of steps, got {max_steps}")
        # Refused now, not after the last run: no matplotlib, or a place the PNG cannot go.
        self.plot = None if self.config.plot is None else check_frontier_destination(self.config.plot, option="--plot")
        if self.config.output is not None:
            check_output(Path(self.config.output))

    def instantiate_classes(self) -> None:
        """Nothing yet: every run instantiates its own model, datamodule and trainer (:meth:`new_run`)."""

    def new_run(self, learning_rate: Optional[float] = None) -> tuple[LightningModule, Optional[LightningDataModule], Any]:
        """Fresh model, datamodule and trainer from the parsed config, at ``learning_rate`` when given."""
        if learning_rate is not None:
            self.config[self.lr_key] = learning_rate
            # LightningCLI hands the model's save_hyperparameters a YAML dump of the config made
            # once and cached; without a fresh dump, hparams (read by configure_optimizers in
            # most models) would keep the first run's learning rate.
            self.__dict__.pop("config_dump", None)
        LightningCLI.instantiate_classes(self)
        use_flag_spelling(self.trainer)
        return self.model, self.datamodule, self.trainer


def parse_list(value: Any, cast: type, option: str, noun: str = "fraction") -> list:
    """``"1.0,0.5"``, ``0.5`` or ``[1.0, 0.5]`` -> ``[1.0, 0.5]``; a message naming ``option`` otherwise.

    Floats must be positive and finite (``noun`` names what they are in that message).
    """
    parsed = []
    for text in comma_list(value):
        try:
            number = cast(text) if cast is int else float(text)
        except ValueError:
            kind = "integers" if cast is int else "numbers"
            raise CompareError(f"{option}: expected comma-separated {kind}, got {value!r}") from None
        if cast is float and not (math.isfinite(number) and number > 0):
            raise CompareError(f"{option}: each must be a positive {noun}, got {text}")
        parsed.append(number)
    if not parsed:
        raise CompareError(f"{option}: give at least one value")
    return parsed


#: Keys every results file of compare has; a file with them is an earlier run's and may be replaced.
_RESULT_KEYS = frozenset({"monitor", "arms", "runs"})


def check_output(path: Path) -> None:
    """Refuse ``--output`` before any run when writing it would fail, or would replace a file that is not compare's.

    Raises:
        CompareError: naming the file and what to do.
    """
    reason = unwritable_reason(path)
    if reason is not None:
        raise CompareError(f"--output: cannot write {path} ({reason}); pass another --output")
    if not path.exists():
        return
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        ours = isinstance(document, dict) and _RESULT_KEYS <= document.keys()
        why = "" if ours else "JSON without compare's keys monitor, arms, runs"
    except (OSError, ValueError) as error:
        ours, why = False, f"not readable as JSON: {str(error).splitlines()[0]}"
    if not ours:
        raise CompareError(
            f"--output: {path} exists and is not a compare results file ({why}); it is not replaced. Pass another "
            "--output, or move that file away first"
        )


def learning_rate_key(config, lr_key: Optional[str]) -> str:
    """The config key that ``--lrs`` sets for each run.

    ``lr_key`` when given (it must exist in the config); otherwise ``optimizer.init_args.lr``
    when the config has an ``--optimizer``, else the model's ``learning_rate`` or ``lr`` argument.

    Raises:
        CompareError: ``lr_key`` is not in the config, or none of the defaults is.
    """
    if lr_key is not None:
        if lr_key not in config:
            raise CompareError(f"--lr_key: {lr_key!r} is not a key of the config; give a dotted key such as "
                               "model.init_args.learning_rate")
        return lr_key
    if config.get("optimizer") is not None:
        return "optimizer.init_args.lr"
    init_args = config.get("model.init_args")
    for name in ("learning_rate", "lr"):
        if init_args is not None and name in init_args:
            return f"model.init_args.{name}"
    arguments = ", ".join(sorted(init_args.keys())) if init_args is not None else "none"
    raise CompareError(
        f"--lrs: the model has no learning_rate or lr argument (its arguments: {arguments}); name the one that sets "
        "the learning rate with --lr_key model.init_args.NAME, or give an --optimizer"
    )


def build_compare_cli(argv: list[str]) -> CompareCLI:
    """Parse ``compare`` arguments (the ``fit`` ones plus compare's); nothing is instantiated."""
    with _args_from_caller():
        return CompareCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            save_config_callback=None,
            # Every run seeds itself with its --seeds value; a seed here would only say "No seed found".
            seed_everything_default=False,
            args=normalize_flags(argv),
            parser_kwargs={
                "prog": "lightning-fisher compare",
                "description": "Short fits with flat LoRA and with the fisher map at the same parameter budget "
                "(and at the --budgets fractions, each against its flat twin flat@F at that budget), on the same "
                "seeds; prints validation loss and metrics side by side and which is ahead at each budget.",
            },
        )


def _import(class_path: str) -> Optional[type]:
    try:
        return import_class(class_path)
    except ValueError:  # not importable here: kept as given, for the parser to judge
        return None


def map_to_compare(config) -> FisherMap:
    """The map ``fit`` would apply (the rule of :func:`~lightning_fisher.peft_factory.fisher_map_path`); it must exist.

    Args:
        config: the parsed ``fit`` config: ``adaptive_lora.fisher_map``, ``adaptive_lora.dataset_dir``,
            the data's ``init_args.dataset_dir``, the top-level ``dataset_dir``.

    Raises:
        CompareError: the config names no map and no dataset folder.
        FisherMapNotFoundError: the place named holds no map.
    """
    adaptive = config.adaptive_lora
    data = config.get("data")
    init_args = data.get("init_args") if data is not None and hasattr(data, "get") else None
    data_dir = init_args.get("dataset_dir") if init_args is not None else None
    path = fisher_map_path(adaptive.fisher_map, adaptive.dataset_dir or data_dir or config.dataset_dir)
    if path is None:
        raise CompareError(
            "no fisher map to compare: give the dataset folder (--dataset_dir) that holds fisher_map.json, or "
            "--adaptive_lora.fisher_map PATH"
        )
    try:
        return FisherMap.load(path)
    except FisherMapNotFoundError as error:
        # Unlike fit, compare has nothing to do without a map: say so on top of the loader's advice.
        raise FisherMapNotFoundError(
            f"{error}. compare needs a map: run lightning-fisher analyze first (as above), or pass "
            "--adaptive_lora.fisher_map PATH",
            path=error.path,
        ) from None


def check_validation_step(config) -> None:
    """Refuse, before any run, a model that cannot be scored: compare ranks the arms on validation.

    Raises:
        CompareError: the model class has no ``validation_step`` of its own.
    """
    model = config.get("model")
    class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
    cls = _import(class_path) if class_path else None
    if isinstance(cls, type) and issubclass(cls, LightningModule) and cls.validation_step is LightningModule.validation_step:
        raise CompareError(
            f"{class_path} has no validation_step, and compare scores every arm on validation: add a validation_step "
            f"that logs {MONITOR!r} (self.log({MONITOR!r}, loss)) to {cls.__name__}"
        )


def prepare_config(config, scratch_dir: str) -> list[str]:
    """Turn the fit config into short probe runs in place; returns what changed, for the user.

    No checkpoints, logger, config file or adapter export; files anything else writes under the
    trainer's root go to ``scratch_dir``; validation data where the datamodule has none.
    """
    notes = []
    trainer = config.trainer
    trainer.enable_checkpointing = False
    trainer.logger = False
    trainer.enable_model_summary = False  # the same model table once per run; the arms' table says what differs
    trainer.default_root_dir = scratch_dir
    callbacks = trainer.callbacks
    if callbacks is not None:
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        kept = []
        for callback in callbacks:
            class_path = callback.get("class_path") if hasattr(callback, "get") else None
            cls = _import(class_path) if class_path else type(callback)
            if isinstance(cls, type) and issubclass(cls, _DROPPED_CALLBACKS):
                notes.append(f"trainer callback {cls.__name__} left out (compare writes no checkpoints or logs)")
            else:
                kept.append(callback)
        trainer.callbacks = kept
    if trainer.devices in (None, "auto"):
        trainer.devices = 1  # fits run one after another; "auto" would start DDP on a multi-GPU machine
    if config.max_steps is not None:
        trainer.max_steps = config.max_steps
        # The step count alone decides the length: an epoch has at least one step, so this many
        # epochs is never the limit (-1, unlimited, would show as "Epoch 0/-2" on the progress bar).
        trainer.max_epochs = config.max_steps
    adaptive = config.adaptive_lora
    if adaptive.export_dir is not None:
        notes.append(f"adaptive_lora.export_dir ({adaptive.export_dir}) not written: compare runs are probes")
    adaptive.export_dir = None
    if adaptive.ignore_fisher_map:
        notes.append("ignore_fisher_map: has no effect here, compare runs flat LoRA and the map alike")
        adaptive.ignore_fisher_map = False

    data = config.get("data")
    if data is not None and hasattr(data, "get") and data.get("class_path"):
        cls = _import(data.class_path)
        init_args = data.init_args
        if (
            isinstance(cls, type)
            and issubclass(cls, TensorDirectoryDataModule)
            and init_args.get("val_dir") is None
            and not init_args.get("val_fraction")
        ):
            init_args.val_fraction = DEFAULT_VAL_FRACTION
            notes.append(
                f"no validation data in the config: {DEFAULT_VAL_FRACTION:.0%} of the training folder is held out "
                f"(data.init_args.val_fraction={DEFAULT_VAL_FRACTION}, split seed {init_args.get('seed', 0)}); "
                "set val_dir or val_fraction to choose"
            )
    return notes


def interrupted_compare(output: Optional[str], started: float) -> str:
    """What an interrupted compare leaves: the runs that finished are in ``output`` (written after each)."""
    if output is None:
        return "interrupted: no results kept (--output FILE keeps each finished run's results)"
    path = Path(output)
    runs = 0
    if path.is_file() and path.stat().st_mtime >= started:
        try:
            runs = len(json.loads(path.read_text(encoding="utf-8"))["runs"])
        except (OSError, ValueError, KeyError, TypeError):
            runs = 0
    if runs:
        return f"interrupted; the results of {plural(runs, 'finished run')} are in {output}"
    kept = "; the earlier results there are unchanged" if path.is_file() else ""
    return f"interrupted before the first run finished: nothing written to {output}{kept}"


def run_compare(argv: list[str]) -> int:
    """``lightning-fisher compare [fit options] [--budgets 1.0,0.5] [--criteria trace,spectrum] [--seeds 0,1,2] [--lrs ...] [--plot F.png]``."""
    cli = build_compare_cli(argv)
    config = cli.config
    fisher_map = map_to_compare(config)
    check_validation_step(config)
    created = [] if config.output is None else folders_to_create(config.output)
    scratch = tempfile.mkdtemp(prefix="lightning-fisher-compare-")
    started = time.time()
    try:
        notes = prepare_config(config, scratch)
        result: CompareResult = compare_fisher_map(
            cli.new_run,
            fisher_map,
            budgets=cli.budgets,
            seeds=cli.seeds,
            lrs=cli.lrs,
            criteria=cli.criteria,
            output=config.output,
            notes=notes,
        )
    except (KeyboardInterrupt, SystemExit) as error:
        signal_number = interrupt_signal(error)
        if signal_number is None:
            raise
        raise CommandInterrupted(interrupted_compare(config.output, started), signal_number=signal_number) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    where = f" {result.fisher_map_path}" if result.fisher_map_path else ""
    steps = sorted({run.steps for run in result.runs})
    rates = "" if cli.lrs is None else f", learning rates {', '.join(f'{lr:g}' for lr in result.lrs)} ({cli.lr_key})"
    twins = [f"{arm.name} at rank {arm.rank}" for arm in result.arms if arm.is_flat and arm.name != "flat"]
    twins_text = f" (and each smaller or larger budget against its flat twin: {', '.join(twins)})" if twins else ""
    print(
        f"\nfisher map{where} vs flat LoRA at rank {fisher_map.budget.rank}{twins_text}: {plural(len(result.seeds), 'seed')}"
        f"{rates}, {'/'.join(map(str, steps))} step{'' if steps == [1] else 's'} per run\n"
    )
    print("\n".join([result.to_markdown(), "", *result.verdicts()]))
    if result.notes:
        print("\nnotes:\n" + "\n".join(f"  - {note}" for note in result.notes))
    if config.output:
        print(f"\nper-run results written to {config.output}{folders_created(created)}")
    if cli.plot is not None:
        print(f"frontier (LoRA parameters against {MONITOR}) written to {plot_frontier(result, cli.plot)}")
    summary = result.summary()
    if summary:
        print(f"\n{summary}")
    return 0
