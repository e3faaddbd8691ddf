"""Quality benchmark: at an equal number of trainable LoRA parameters, does the Fisher map beat flat LoRA?

Two tasks, each a real model on real data, every arm trained with the same optimizer, schedule,
steps and head learning rate; only where the adapters go (and at what rank) differs.

``reviews``: all-MiniLM-L6-v2 + a 9-class head on the drug-review condition task (8 most
frequent training conditions + other), 128 tokens, batch 16. The 600 training reviews are split
once (fixed seed, independent of the run seeds) into 480 train / 120 validation; the test set is
the 379 test reviews. Baselines measured in the same run: majority class, a linear probe on
frozen mean-pooled features (C chosen on validation), and a head-only fit for the same steps.

``digits``: a rectified-flow model pretrained on scikit-learn digits 0-4, adapted to digits 5-9.
The 5-9 train folder is split once (20 % validation, fixed seed); the metric is the held-out
denoising loss (fixed timesteps and noise, the model's ``test_step``) on the 5-9 test folder.
Baseline: the pretrained model's loss before adaptation. Fisher arms run once per timestep focus.

Arms (candidates: the 36 encoder Linear modules of MiniLM, or every Linear of the flow model):
flat LoRA at the base rank; Fisher map in budget mode at the base rank (equal parameters);
PEFT's EVA (data-driven init + rank redistribution, equal total rank); Fisher map in median
mode (the seed tool's rule; parameters float); Fisher budget at 50 % and 25 % of flat; Fisher
budget with rsLoRA scaling. Alpha policy: alpha/r constant (alpha = 2r at the base rank), so
every module of every arm has PEFT scaling 2; the rsLoRA arm scales each module by
alpha/sqrt(r_m) with alpha = 2*sqrt(r_base), i.e. scaling 2 at the base rank.

Selection: for every arm the adapter learning rate is chosen on VALIDATION (mean over seeds of
the validation loss; ties within 1e-4 go to the higher validation accuracy); the table reports
TEST metrics at that learning rate, mean and spread over seeds. Every run re-seeds before
fitting, so the same seed gives the same head init, data order and dropout in every arm.

Protocol size. The full grid (every arm x 3 LRs x 3 seeds, ``--full``) takes about 3.5-4 hours
on 2 quiet CPU cores. The default is the largest protocol that takes about 90 minutes there:
flat LoRA and the equal-budget Fisher map (and the head-only baseline) get the full grid;
the other arms are *staged*: LR sweep on seed 0, then seeds 1 and 2 at the LR seed 0 chose on
validation; on reviews only EVA among them runs by default (the other Fisher variants with
``--full`` or ``--arms``, which add their runs to the same results file).

Epochs. Reviews: 3 (114 steps on 600 reviews in the demo; 90 here on 480). In a check on seed 0,
5 epochs gave no better test accuracy than 3 (0.734 / 0.747 vs 0.739 / 0.734 at LR 1e-3 / 3e-3),
so 3 is kept; the report states whether flat LoRA clearly beats the baselines. Digits: 10 epochs
(90 steps), which bring the held-out loss on 5-9 from 0.641 (pretrained on 0-4) to about 0.59.

Resumable: every finished run is appended to ``benchmarks/results/quality.json`` (written
atomically); a rerun skips runs already there. Fisher maps and EVA initialisations are cached
per seed (and focus) in the work folder, so an interrupted benchmark does not analyse twice.

Run (from the repository root):
    python benchmarks/quality.py                   # the default protocol, both tasks
    python benchmarks/quality.py --full            # every arm on the full grid (extends the same file)
    python benchmarks/quality.py --quick           # smoke test, ~2-3 minutes, separate result files
    python benchmarks/quality.py --report-only     # rewrite quality.md from quality.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional

# OpenMP threads that spin while waiting made a MiniLM step 4x slower (10 s instead of 2.5 s)
# when another process shared the 2 cores; passive waiting removes that cliff. Read by the
# OpenMP runtime when torch loads, so it must be set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lightning_fisher.atomic_io import write_text_atomic  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SPLIT_SEED = 0  # the train/validation split; never a run seed
TIE_TOLERANCE = 1e-4  # validation losses closer than this count as a tie
EVA_RHO = 2.0  # PEFT's default: a module may get up to 2x the base rank


# ============================================================================ protocol


@dataclass(frozen=True)
class TaskSpec:
    """Everything that fixes one task's runs (what enters the protocol fingerprint, plus grids).

    Args:
        name: ``reviews`` or ``digits``.
        rank: base (flat) LoRA rank.
        rank_min: smallest rank of a Fisher-allocated module.
        rank_max: largest rank of a Fisher-allocated module.
        epochs: fine-tuning epochs of every arm.
        batch_size: batch size of fine-tuning and of the Fisher analysis.
        analysis_max_batches: upper bound on analysis batches.
        lrs: adapter learning rates swept for every arm.
        seeds: run seeds (head init, data order, dropout, analysis order, timesteps/noise).
        focuses: timestep focuses of the Fisher arms (``("",)``: the task has none).
        head_lr: head learning rate (reviews only; the same for every arm).
        staged: ``False``: every arm gets the full LR x seed grid. ``True``: arms that are not
            ``main`` sweep the LRs on the first seed only, then run the other seeds at the LR
            that seed chose on validation (5 runs instead of 9 for 3 LRs x 3 seeds).
        default_arms: the arms run when none are named (``None``: all); ``--full`` runs all.
        limit_train_batches: fit batches per epoch (``None``: all; the smoke mode limits it).
        limit_eval_batches: validation/test batches (``None``: all).
    """

    name: str
    rank: int
    rank_min: int
    rank_max: int
    epochs: int
    batch_size: int
    analysis_max_batches: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    focuses: tuple[str, ...] = ("",)
    head_lr: Optional[float] = None
    staged: bool = False
    default_arms: Optional[tuple[str, ...]] = None
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None

    def protocol(self) -> dict[str, Any]:
        """The settings a single run's result depends on (not the grids of LRs, seeds, arms)."""
        keys = ("name", "rank", "rank_min", "rank_max", "epochs", "batch_size", "analysis_max_batches", "head_lr",
                "limit_train_batches", "limit_eval_batches")
        return {**{k: getattr(self, k) for k in keys}, "split_seed": SPLIT_SEED}


# The default is the largest protocol that runs in about 90 minutes on 2 quiet CPU cores: a
# MiniLM LoRA step (batch 16 x 128) took 1.6-1.8 s there, so a 3-epoch run ~175 s, and the
# full grid (7 arms x 3 LRs x 3 seeds on reviews) would take about 3.5 hours. So on reviews
# only flat LoRA and the equal-budget Fisher map get the full grid; EVA is staged; the other
# Fisher variants run on digits (where a run takes seconds) and on reviews with --full or --arms.
# LR grids: flat LoRA's validation loss still fell from 1e-3 to 3e-3 on reviews (seed 0) and to
# 1e-2 on digits (3 seeds), the top of the first grids tried, so both grids reach one step higher;
# on digits (cheap) EVA then chose the lowest LR, so that grid also reaches one step lower.
REVIEWS = TaskSpec(
    name="reviews", rank=8, rank_min=2, rank_max=32, epochs=3, batch_size=16, analysis_max_batches=40,
    lrs=(1e-3, 3e-3, 1e-2), seeds=(0, 1, 2), head_lr=3e-3,
    staged=True, default_arms=("head_only", "flat", "fisher_budget", "eva"),
)
DIGITS = TaskSpec(
    name="digits", rank=4, rank_min=1, rank_max=16, epochs=10, batch_size=64, analysis_max_batches=40,
    lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2), seeds=(0, 1, 2), focuses=("balanced", "texture", "structure"), staged=True,
)


@dataclass(frozen=True)
class Arm:
    """One way of placing adapters.

    Args:
        name: key in the results file.
        label: row label in the tables.
        kind: ``head_only`` (no adapters, frozen encoder), ``flat``, ``eva`` or ``fisher``.
        rank_mode: Fisher allocation rule, ``budget`` or ``median``.
        rank_fraction: base rank of this arm as a fraction of the task's base rank.
        rank_min: overrides the task's ``rank_min`` (e.g. 1 for the 25 % budget).
        rslora: rsLoRA scaling (alpha / sqrt(r)) instead of alpha/r constant.
        main: a main arm: always the full LR x seed grid. The others get it too with
            ``--full``; by default a task may stage them (see ``TaskSpec.staged``).
    """

    name: str
    label: str
    kind: str
    rank_mode: str = "budget"
    rank_fraction: float = 1.0
    rank_min: Optional[int] = None
    rslora: bool = False
    main: bool = False

    def base_rank(self, task: TaskSpec) -> int:
        return max(1, round(task.rank * self.rank_fraction))

    def min_rank(self, task: TaskSpec) -> int:
        return self.rank_min if self.rank_min is not None else min(task.rank_min, self.base_rank(task))


ARMS = (
    Arm("flat", "flat LoRA", "flat", main=True),
    Arm("fisher_budget", "Fisher, budget (= flat params)", "fisher", main=True),
    Arm("eva", "PEFT EVA (= flat total rank)", "eva"),
    Arm("fisher_median", "Fisher, median mode (no budget)", "fisher", rank_mode="median"),
    Arm("fisher_budget_50", "Fisher, budget 50 %", "fisher", rank_fraction=0.5),
    Arm("fisher_budget_25", "Fisher, budget 25 %", "fisher", rank_fraction=0.25, rank_min=1),
    Arm("fisher_budget_rslora", "Fisher, budget, rsLoRA", "fisher", rslora=True),
)
HEAD_ONLY = Arm("head_only", "head only (frozen encoder)", "head_only", main=True)


# ============================================================================ results file


def run_key(record: dict[str, Any]) -> tuple:
    """Identity of a run: (task, arm, lr, seed, focus)."""
    return (record["task"], record["arm"], float(record["lr"]), int(record["seed"]), record.get("focus") or "")


class ResultStore:
    """The JSON results file: runs and baselines, rewritten atomically after every addition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"runs": [], "baselines": {}, "protocols": {}, "invocations": []}
        if path.is_file():
            self.data.update(json.loads(path.read_text(encoding="utf-8")))
        self._keys = {run_key(r) for r in self.data["runs"]}

    def check_protocol(self, task: TaskSpec) -> None:
        """Refuse to mix runs made under different settings in one file."""
        stored = self.data["protocols"].get(task.name)
        current = task.protocol()
        if stored is not None and stored != current:
            raise SystemExit(
                f"{self.path}: its {task.name} runs were made with {stored}, this invocation uses {current}. "
                "Move the file away (or pass --results OTHER.json) to start afresh."
            )
        self.data["protocols"][task.name] = current

    def has(self, key: tuple) -> bool:
        return key in self._keys

    def add_run(self, record: dict[str, Any]) -> None:
        self.data["runs"].append(record)
        self._keys.add(run_key(record))
        self.save()

    def set_baseline(self, task: str, name: str, value: Any) -> None:
        self.data["baselines"].setdefault(task, {})[name] = value
        self.save()

    def baseline(self, task: str, name: str) -> Any:
        return self.data["baselines"].get(task, {}).get(name)

    def runs(self, task: str) -> list[dict[str, Any]]:
        return [r for r in self.data["runs"] if r["task"] == task]

    def save(self) -> None:
        write_atomically(self.path, json.dumps(self.data, indent=1, allow_nan=False) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """Never a half-written results file (see :func:`lightning_fisher.atomic_io.write_text_atomic`)."""
    write_text_atomic(path, text, make_parents=True)


def finite_or_none(value: Any) -> Optional[float]:
    """JSON has no NaN: a diverged run's metric is stored as ``null``."""
    value = float(value)
    return value if math.isfinite(value) else None


# ============================================================================ data


def link_subset(files: Iterable[Path], folder: Path) -> Path:
    """Fill ``folder`` with hard links (copies where linking fails) to ``files``; idempotent."""
    files = list(files)
    manifest = folder / "subset.json"
    wanted = sorted(str(f.resolve()) for f in files)
    if manifest.is_file() and json.loads(manifest.read_text())["files"] == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    for source in files:
        target = folder / source.name
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    write_atomically(manifest, json.dumps({"files": wanted}, indent=1))
    return folder


def split_folder(source: Path, train: Path, val: Path, val_count: int) -> tuple[Path, Path]:
    """Split a sample folder into fixed train / validation folders (permutation seeded by ``SPLIT_SEED``).

    Not ``TensorDirectoryDataModule(val_fraction=...)``: its one ``seed`` draws both the split
    and the training order, so the validation set would change with the run seed.
    """
    from lightning_fisher.tensor_folder import list_sample_files

    files = list_sample_files(source)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    val_files = [files[i] for i in sorted(order[:val_count])]
    train_files = [files[i] for i in sorted(order[val_count:])]
    return link_subset(train_files, train), link_subset(val_files, val)


def folder_labels(folder: Path) -> list[int]:
    from lightning_fisher.tensor_folder import TensorFolderDataset

    dataset = TensorFolderDataset(folder)
    return [int(dataset[i]["label"]) for i in range(len(dataset))]


def prepare_reviews(workdir: Path) -> dict[str, Path]:
    """Tokenized folders: 480 train / 120 validation (from the 600 train reviews) and the 379 test reviews."""
    from lightning_fisher.examples.drug_reviews import write_condition_dataset

    full = write_condition_dataset(workdir / "train600", split="train", max_length=128)
    test = write_condition_dataset(workdir / "test", split="test", max_length=128)
    train, val = split_folder(full, workdir / "train480", workdir / "val120", val_count=120)
    return {"train": train, "val": val, "test": test}


def prepare_digits(workdir: Path) -> dict[str, Path]:
    """Digits 5-9 folders (train split 80/20 into train / validation, test) and the 0-4 checkpoint."""
    from lightning_fisher.examples.digits_flow import prepare_digits_example
    from lightning_fisher.tensor_folder import list_sample_files

    full, test, checkpoint = prepare_digits_example(workdir)
    count = max(1, math.floor(0.2 * len(list_sample_files(full)) + 0.5))
    train, val = split_folder(full, workdir / "train_fit", workdir / "val", val_count=count)
    return {"train": train, "val": val, "test": test, "checkpoint": checkpoint}


# ============================================================================ models and trainers


def quiet_lightning() -> None:
    """Keep the log readable: no progress bars, no per-fit banners, no advice that does not apply."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fisher"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (r".*does not have many workers.*", r".*smaller than the logging interval.*",
                    r".*The number of training batches.*", r".*were not found in the eva state_dict.*",
                    r".*fisher map concentrates adapter capacity.*"):
        warnings.filterwarnings("ignore", message=message)


def trainer(task: TaskSpec, *, fit: bool, callbacks: Optional[list] = None):
    """A CPU trainer; fit trainers skip validation (it runs once, after training, on the final weights)."""
    import lightning.pytorch as pl

    limits = dict(limit_val_batches=0) if fit else dict(
        limit_val_batches=task.limit_eval_batches, limit_test_batches=task.limit_eval_batches)
    return pl.Trainer(
        max_epochs=task.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_train_batches=task.limit_train_batches, callbacks=callbacks or [], **limits,
    )


def build_model(task: TaskSpec, lr: float, seed: int, folders: dict[str, Path]):
    """The task's LightningModule, seeded so the same seed gives the same head / weights in every arm."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    if task.name == "reviews":
        from lightning_fisher.examples.text_classifier import MiniLMClassifier

        return MiniLMClassifier(num_classes=9, learning_rate=lr, head_learning_rate=task.head_lr)
    from lightning_fisher.examples.digits_flow import DigitsFlowMatching

    return DigitsFlowMatching(checkpoint_dir=str(folders["checkpoint"]), learning_rate=lr)


class Preloaded(torch.utils.data.Dataset):
    """A sample folder held in memory: what the datamodule's loaders need (``files``, items) without disk reads."""

    def __init__(self, dataset) -> None:
        self.files = dataset.files
        self.samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


def datamodule(task: TaskSpec, folders: dict[str, Path], seed: int, *, with_eval: bool = True):
    """The library's datamodule over the fixed folders, with the samples read once.

    Reading every ``.pt`` file again each epoch cost about half of a digits run (574 files,
    1.2 s per epoch); the folders are small, so they are kept in memory. Order, batching and
    seeding are the datamodule's own (``seed`` orders the training samples).
    """
    from lightning_fisher.training.datamodule import TensorDirectoryDataModule

    class InMemory(TensorDirectoryDataModule):
        def setup(self, stage: Optional[str] = None) -> None:
            super().setup(stage)
            for attribute in ("train_dataset", "val_dataset", "test_dataset"):
                dataset = getattr(self, attribute)
                if dataset is not None and not isinstance(dataset, Preloaded):
                    setattr(self, attribute, Preloaded(dataset))

    evaluation = dict(val_dir=folders["val"], test_dir=folders["test"]) if with_eval else {}
    return InMemory(folders["train"], batch_size=task.batch_size, seed=seed, **evaluation)


def adapter_root(task: TaskSpec) -> Optional[str]:
    return "encoder" if task.name == "reviews" else None


def lora_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name and p.requires_grad)


def adapter_rank_summary(model: torch.nn.Module) -> dict[str, Any]:
    from lightning_fisher.peft_factory import adapter_ranks

    ranks = sorted(adapter_ranks(model).values())
    if not ranks:
        return {"modules": 0}
    return {"modules": len(ranks), "min": ranks[0], "median": statistics.median(ranks), "max": ranks[-1]}


@contextlib.contextmanager
def task_threads(task: TaskSpec):
    """The flow model is tiny: one intra-op thread (more only add synchronisation)."""
    if task.name == "digits":
        from lightning_fisher.examples.digits_flow import single_threaded

        with single_threaded():
            yield
    else:
        yield


# ============================================================================ Fisher maps


def base_fisher_map(task: TaskSpec, seed: int, focus: str, folders: dict[str, Path], workdir: Path):
    """The seed's Fisher analysis on the training folder only (cached as a map file in ``workdir``)."""
    from lightning_fisher.fisher_map import FisherMap
    from lightning_fisher.training.analyze import analyze

    tag = f"{task.name}_b{task.analysis_max_batches}_seed{seed}" + (f"_{focus}" if focus else "")
    if task.limit_train_batches is not None:
        tag += f"_limit{task.limit_train_batches}"
    path = workdir / "maps" / f"{tag}.json"
    if path.is_file():
        return FisherMap.load(path)
    model = build_model(task, 1e-3, seed, folders)
    max_batches = task.analysis_max_batches if task.limit_train_batches is None else min(
        task.analysis_max_batches, task.limit_train_batches)
    options = dict(timestep_focus=focus) if focus else {}
    return analyze(
        model,
        datamodule(task, folders, seed, with_eval=False),
        output=path,
        exclude=["head"] if task.name == "reviews" else [],
        rank=task.rank, rank_min=task.rank_min, rank_max=task.rank_max, rank_mode="budget",
        max_batches=max_batches, min_batches=min(5, max_batches), seed=seed,
        trainer_kwargs=dict(accelerator="cpu", devices=1, enable_progress_bar=False),
        **options,
    )


def arm_fisher_map(arm: Arm, task: TaskSpec, base, model: torch.nn.Module):
    """Re-allocate the seed's scores with the arm's rank rule (no second analysis)."""
    from lightning_fisher.fisher_map import FisherMap

    rank = arm.base_rank(task)
    return FisherMap.from_scores(
        base.scores, model, rank=rank, rank_min=arm.min_rank(task), rank_max=task.rank_max, mode=arm.rank_mode,
        lora_alpha=2.0 * rank, score_stderr=base.score_stderrs, analysis=base.analysis, dataset=base.dataset,
    )


# ============================================================================ adapters per arm


def attach_adapters(arm: Arm, task: TaskSpec, model, seed: int, focus: str, folders, workdir) -> tuple[list, dict]:
    """Prepare ``model`` for the arm: callbacks for the fit trainer, and facts to record."""
    from lightning_fisher.training.adaptive_lora import AdaptiveLoRA

    rank = arm.base_rank(task)
    common = dict(adapter_root=adapter_root(task), lr_warning_threshold=1.0, verbose=False)
    if arm.kind == "head_only":
        for parameter in model.encoder.parameters():
            parameter.requires_grad_(False)
        return [], {}
    if arm.kind == "flat":
        return [AdaptiveLoRA(ignore_fisher_map=True, lora_kwargs={"r": rank, "lora_alpha": 2.0 * rank}, **common)], {}
    if arm.kind == "eva":
        started = time.perf_counter()
        eva_initialise(task, model, rank, folders, seed, workdir)
        from lightning_fisher.peft_factory import adapter_ranks

        total_rank = sum(adapter_ranks(model.encoder if task.name == "reviews" else model).values())
        return [], {"eva_seconds": round(time.perf_counter() - started, 2), "eva_total_rank": total_rank}
    base = base_fisher_map(task, seed, focus, folders, workdir)
    fisher_map = arm_fisher_map(arm, task, base, model)
    lora_kwargs = {"use_rslora": True, "lora_alpha": 2.0 * math.sqrt(rank)} if arm.rslora else {}
    facts = {
        "map_lora_parameters": fisher_map.budget.lora_parameters,
        "map_flat_parameters": fisher_map.budget.flat_lora_parameters,
        "analysis_batches": base.analysis.batches,
        "analysis_stop": base.analysis.stop_reason,
        "analysis_seconds": base.analysis.seconds,
        "excluded": len(fisher_map.excluded),
    }
    return [AdaptiveLoRA(fisher_map=fisher_map, lora_kwargs=lora_kwargs, **common)], facts


def eva_initialise(task: TaskSpec, model, rank: int, folders: dict[str, Path], seed: int, workdir: Path) -> None:
    """Inject LoRA with PEFT's EVA initialisation (rank redistribution, rho=2) into the task's adapter root.

    The same candidates as the other arms (every Linear under the root), r = base rank,
    alpha = 2r; EVA rescales alpha with each new rank (``adjust_scaling_factors``), so alpha/r
    stays constant as in the other arms. EVA's SVD runs forward passes over the training folder
    only (order seeded by the run seed); its result does not depend on the learning rate, so it
    is computed once per seed and cached in ``workdir``.
    """
    import peft
    from lightning_fisher.candidates import select_candidates
    from lightning_fisher.patterns import exact_target_regex

    root = model.encoder if task.name == "reviews" else model
    candidates = select_candidates(root)
    config = peft.LoraConfig(
        r=rank, lora_alpha=2.0 * rank, target_modules=exact_target_regex(candidates),
        rank_pattern=eva_rank_caps(root, candidates, rank, EVA_RHO),
        init_lora_weights="eva", eva_config=peft.EvaConfig(rho=EVA_RHO, use_label_mask=False),
    )
    wrapped = peft.get_peft_model(root, config)  # injects in place into ``root``
    suffix = f"_limit{task.limit_train_batches}" if task.limit_train_batches is not None else ""
    cache = workdir / "eva" / f"{task.name}_r{rank}_seed{seed}{suffix}.pt"
    if cache.is_file():
        state = torch.load(cache, weights_only=True)
    else:
        loader = datamodule(task, folders, seed).train_dataloader()
        if task.name == "reviews":
            options = dict(forward_fn=_eva_forward_text)
        else:
            options = dict(forward_fn=_eva_forward_flow, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
        state = peft.get_eva_state_dict(wrapped, loader, show_progress_bar=False, **options)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, cache)
    peft.initialize_lora_eva_weights(wrapped, eva_state_dict=dict(state), show_progress_bar=False)
    for name, parameter in root.named_parameters():  # PEFT trains only adapters; keep it that way
        parameter.requires_grad_("lora_" in name)


def eva_rank_caps(root: torch.nn.Module, candidates: Iterable[str], rank: int, rho: float) -> dict[str, int]:
    """Ranks below ``rank`` for modules whose input is too narrow for EVA.

    EVA computes ``round(r * rho)`` principal components of each module's input, which PEFT's
    incremental PCA refuses when that exceeds the input width (the flow model's ``patch_embed``
    reads 4 pixels: r=4, rho=2 asks for 8). Such modules get ``r = floor(width / rho)``, which
    lowers EVA's total rank budget slightly below flat's; the run records the budget it had.
    """
    import re

    caps = {}
    for name in candidates:
        width = root.get_submodule(name).in_features
        if round(rank * rho) > width:
            # Not lightning_fisher's "^name" key: EVA matches keys against names under the
            # PeftModel ("base_model.model.<name>"), where an anchored key never matches.
            caps[re.escape(name)] = max(1, math.floor(width / rho))
    return caps


def _eva_forward_text(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _eva_forward_flow(model, batch):
    """EVA sees the layer inputs of training: noisy images at timesteps drawn like training's."""
    x0 = batch["x"]
    t = torch.rand(x0.shape[0])
    noise = torch.randn_like(x0)
    x_t = (1.0 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    return model(x_t, t)


# ============================================================================ one run


def run_one(arm: Arm, task: TaskSpec, lr: float, seed: int, focus: str, folders, workdir) -> dict[str, Any]:
    """Fit one arm at one learning rate and seed; validate and test the final weights."""
    import lightning.pytorch as pl

    started = time.perf_counter()
    with task_threads(task):
        model = build_model(task, lr, seed, folders)
        callbacks, facts = attach_adapters(arm, task, model, seed, focus, folders, workdir)
        data = datamodule(task, folders, seed)
        # Re-seed: an analysis or EVA computed here (not read from the cache) has drawn from the
        # global generator, and training's dropout / timesteps / noise must not depend on that.
        pl.seed_everything(seed, verbose=False)
        fit_started = time.perf_counter()
        trainer(task, fit=True, callbacks=callbacks).fit(model, datamodule=data)
        fit_seconds = time.perf_counter() - fit_started
        evaluation = trainer(task, fit=False)
        val = evaluation.validate(model, datamodule=data, verbose=False)[0]
        test = evaluation.test(model, datamodule=data, verbose=False)[0]
    record = {
        "task": task.name, "arm": arm.name, "lr": lr, "seed": seed, "focus": focus,
        "lora_parameters": lora_parameter_count(model),
        "ranks": adapter_rank_summary(model.encoder if task.name == "reviews" else model),
        "val_loss": finite_or_none(val["val_loss"]), "test_loss": finite_or_none(test["test_loss"]),
        "fit_seconds": round(fit_seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        **facts,
    }
    if "val_acc" in val:
        record.update(val_acc=finite_or_none(val["val_acc"]), test_acc=finite_or_none(test["test_acc"]))
    return record


# ============================================================================ baselines


def reviews_baselines(store: ResultStore, task: TaskSpec, folders: dict[str, Path], workdir: Path) -> None:
    """Majority-class rate and a linear probe on frozen mean-pooled MiniLM features (C chosen on validation)."""
    if store.baseline(task.name, "majority") is None:
        store.set_baseline(task.name, "majority", {
            split: majority(folder_labels(folders[split])) for split in ("train", "val", "test")})
    if store.baseline(task.name, "linear_probe") is None:
        started = time.perf_counter()
        probe = linear_probe(folders, workdir)
        probe["seconds"] = round(time.perf_counter() - started, 1)
        store.set_baseline(task.name, "linear_probe", probe)


def majority(labels: list[int]) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels)


@torch.no_grad()
def frozen_features(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled last hidden states of the pretrained MiniLM (eval mode), exactly as the classifier pools."""
    from lightning_fisher.examples.text_classifier import MiniLMClassifier
    from lightning_fisher.tensor_folder import TensorFolderDataset

    model = MiniLMClassifier(num_classes=9).eval()
    dataset = TensorFolderDataset(folder)
    features, labels = [], []
    for start in range(0, len(dataset), 32):
        batch = [dataset[i] for i in range(start, min(start + 32, len(dataset)))]
        ids = torch.stack([b["input_ids"] for b in batch])
        mask = torch.stack([b["attention_mask"] for b in batch])
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        features.append((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))
        labels.extend(int(b["label"]) for b in batch)
    return torch.cat(features), torch.tensor(labels)


def linear_probe(folders: dict[str, Path], workdir: Path) -> dict[str, Any]:
    """Logistic regression on standardised frozen features; C chosen by validation log loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cache = workdir / "probe_features.pt"
    if cache.is_file():
        features = torch.load(cache, weights_only=True)
    else:
        features = {split: frozen_features(folders[split]) for split in ("train", "val", "test")}
        torch.save(features, cache)
    (xtr, ytr), (xva, yva), (xte, yte) = ((features[s][0].numpy(), features[s][1].numpy()) for s in ("train", "val", "test"))
    classes = list(range(9))
    best = None
    for c in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(xtr, ytr)
        val_loss = log_loss(yva, probe.predict_proba(xva), labels=classes)
        val_acc = float((probe.predict(xva) == yva).mean())
        if best is None or val_loss < best["val_loss"] - TIE_TOLERANCE:
            best = {"C": c, "val_loss": val_loss, "val_acc": val_acc, "probe": probe}
    probe = best.pop("probe")
    best.update(test_loss=log_loss(yte, probe.predict_proba(xte), labels=classes),
                test_acc=float((probe.predict(xte) == yte).mean()))
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in best.items()}


def digits_baselines(store: ResultStore, task: TaskSpec, folders: dict[str, Path]) -> None:
    """The pretrained (0-4) model's held-out denoising loss on digits 5-9, before any adaptation."""
    if store.baseline(task.name, "pretrained") is not None:
        return
    with task_threads(task):
        model = build_model(task, 1e-3, 0, folders)
        data = datamodule(task, folders, 0)
        evaluation = trainer(task, fit=False)
        val = evaluation.validate(model, datamodule=data, verbose=False)[0]["val_loss"]
        test = evaluation.test(model, datamodule=data, verbose=False)[0]["test_loss"]
    store.set_baseline(task.name, "pretrained", {"val_loss": round(float(val), 4), "test_loss": round(float(test), 4)})


# ============================================================================ the grid


Plan = list[tuple[Arm, float, int, str]]


def grid(task: TaskSpec, arm: Arm, lrs: Iterable[float], seeds: Iterable[int], focuses: Iterable[str]) -> Plan:
    return [(arm, lr, seed, focus) for seed in seeds for lr in lrs for focus in focuses]


def arm_focuses(task: TaskSpec, arm: Arm) -> tuple[str, ...]:
    return task.focuses if arm.kind == "fisher" else ("",)


def full_plan(task: TaskSpec, arms: tuple[Arm, ...]) -> Plan:
    """Every arm on the full LR x seed grid (``head_only`` at the head LR); seeds outermost."""
    plan = []
    for seed in task.seeds:
        for arm in arms:
            lrs = (task.head_lr,) if arm.kind == "head_only" else task.lrs
            plan += grid(task, arm, lrs, (seed,), arm_focuses(task, arm))
    return plan


def staged_plan(task: TaskSpec, arms: tuple[Arm, ...], store: "ResultStore") -> tuple[Plan, Plan]:
    """Staged runs of the non-main arms: (LR sweep on the first seed, other seeds at the chosen LR).

    The second part is only known once the sweep is complete (for an arm and focus whose sweep
    is not stored yet it is empty; run the plan again after the sweep).
    """
    sweep, rest = [], []
    first, others = task.seeds[:1], task.seeds[1:]
    for arm in arms:
        if arm.main:
            continue
        for focus in arm_focuses(task, arm):
            sweep += grid(task, arm, task.lrs, first, (focus,))
            lr = sweep_choice(task, store, arm, focus)
            if lr is not None:
                rest += grid(task, arm, (lr,), others, (focus,))
    return sweep, rest


def sweep_choice(task: TaskSpec, store: "ResultStore", arm: Arm, focus: str) -> Optional[float]:
    """The LR the first seed chose on validation, once that seed has a run at every LR."""
    seed = task.seeds[0]
    runs = {float(r["lr"]): [r] for r in store.runs(task.name)
            if r["arm"] == arm.name and (r.get("focus") or "") == focus and r["seed"] == seed and float(r["lr"]) in task.lrs}
    if len(runs) < len(task.lrs):
        return None
    return choose_lr(runs)[0]


def run_plan(store: ResultStore, task: TaskSpec, plan: Plan, folders: dict[str, Path], workdir: Path, phase: str) -> None:
    """Run every planned run not yet in the store, saving each as it finishes."""
    todo = [p for p in plan if not store.has((task.name, p[0].name, float(p[1]), p[2], p[3]))]
    print(f"[{task.name} {phase}] {len(plan) - len(todo)} of {len(plan)} runs already done; {len(todo)} to go",
          flush=True)
    for index, (arm, lr, seed, focus) in enumerate(todo, 1):
        record = run_one(arm, task, lr, seed, focus, folders, workdir / task.name)
        store.add_run(record)
        metric = f", test acc {record['test_acc']:.4f}" if record.get("test_acc") is not None else ""
        print(f"[{task.name} {phase} {index}/{len(todo)}] {arm.name}{'/' + focus if focus else ''} lr={lr:g} "
              f"seed={seed}: {record['lora_parameters']:,} params, val loss {record['val_loss']:.4f}, "
              f"test loss {record['test_loss']:.4f}{metric} ({record['seconds']:.0f} s)", flush=True)


def run_task(store: ResultStore, task: TaskSpec, arms: tuple[Arm, ...], workdir: Path) -> None:
    """Prepare data and baselines, then the main arms' grid, then the other arms (full or staged)."""
    store.check_protocol(task)
    folders = prepare_reviews(workdir / "reviews") if task.name == "reviews" else prepare_digits(workdir / "digits")
    if task.name == "reviews":
        reviews_baselines(store, task, folders, workdir / "reviews")
    else:
        digits_baselines(store, task, folders)
    if not task.staged:
        run_plan(store, task, full_plan(task, arms), folders, workdir, "all arms")
        return
    run_plan(store, task, full_plan(task, tuple(a for a in arms if a.main)), folders, workdir, "main arms")
    sweep, _ = staged_plan(task, arms, store)
    run_plan(store, task, sweep, folders, workdir, "LR sweep, first seed")
    _, rest = staged_plan(task, arms, store)
    run_plan(store, task, rest, folders, workdir, "other seeds at the chosen LR")


# ============================================================================ selection and report


def arm_rows(task: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arm, focus): the LR chosen on validation, and test statistics there."""
    groups: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for r in runs:
        groups.setdefault((r["arm"], r.get("focus") or ""), {}).setdefault(float(r["lr"]), []).append(r)
    rows = []
    for (arm, focus), by_lr in groups.items():
        chosen_lr, chosen = choose_lr(by_lr)
        rows.append({"arm": arm, "focus": focus, "lr": chosen_lr, "runs": chosen, "lrs": sorted(by_lr), "by_lr": by_lr,
                     "seeds": sorted(r["seed"] for r in chosen),
                     "val_by_lr": {lr: mean([r["val_loss"] for r in rs]) for lr, rs in sorted(by_lr.items())}})
    order = {a.name: i for i, a in enumerate((HEAD_ONLY,) + ARMS)}
    return sorted(rows, key=lambda row: (order.get(row["arm"], 99), row["focus"]))


def choose_lr(by_lr: dict[float, list[dict]]) -> tuple[float, list[dict]]:
    """Lowest mean validation loss (a diverged run counts as infinite); ties -> higher accuracy.

    Means are taken over the seeds every LR has (all seeds on a full grid, the first seed when
    the arm was staged), so no LR is favoured by having been run on easier seeds. Returns the
    LR and all of its runs.
    """
    common = set.intersection(*({r["seed"] for r in runs} for runs in by_lr.values()))

    def score(runs: list[dict]) -> tuple[float, float]:
        runs = [r for r in runs if r["seed"] in common]
        loss = mean([r["val_loss"] if r["val_loss"] is not None else math.inf for r in runs])
        acc = mean([r.get("val_acc") or 0.0 for r in runs])
        return loss, acc

    best_lr = None
    for lr, runs in sorted(by_lr.items()):
        if best_lr is None:
            best_lr = lr
            continue
        (loss, acc), (best_loss, best_acc) = score(runs), score(by_lr[best_lr])
        if loss < best_loss - TIE_TOLERANCE or (abs(loss - best_loss) <= TIE_TOLERANCE and acc > best_acc):
            best_lr = lr
    return best_lr, sorted(by_lr[best_lr], key=lambda r: r["seed"])


def mean(values: list[Optional[float]]) -> float:
    values = [math.inf if v is None else v for v in values]
    return sum(values) / len(values) if values else math.nan


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def stats(runs: list[dict], key: str) -> dict[str, float]:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": mean(values), "std": spread(values), "min": min(values), "max": max(values), "n": len(values)}


def verdict(row: dict, reference: dict, key: str, higher_is_better: bool) -> str:
    """Plain words: the difference of means against the larger seed spread of the two arms."""
    a, b = stats(row["runs"], key), stats(reference["runs"], key)
    difference = a["mean"] - b["mean"]
    noise = max(a["std"], b["std"])
    paired = paired_differences(row["runs"], reference["runs"], key)
    paired_text = (f"; per seed {', '.join(f'{d:+.3f}' for d in paired)}" if paired else "")
    if not math.isfinite(difference):
        return "not comparable (a diverged run)"
    if min(a["n"], b["n"]) < 2:
        return f"{difference:+.4f} {key.replace('_', ' ')}{paired_text} -> undetermined (one seed: no spread to judge by)"
    if abs(difference) <= noise:
        word = "parity"
    else:
        better = (difference > 0) == higher_is_better
        word = "better" if better else "worse"
    within = "within" if abs(difference) <= noise else "outside"
    return f"{difference:+.4f} {key.replace('_', ' ')}, {within} the seed spread {noise:.4f}{paired_text} -> {word}"


def paired_differences(runs: list[dict], reference: list[dict], key: str) -> list[float]:
    """Arm minus reference, seed by seed (same seed = same head init and data order)."""
    ref = {r["seed"]: r[key] for r in reference if r.get(key) is not None}
    return [r[key] - ref[r["seed"]] for r in runs if r.get(key) is not None and r["seed"] in ref]


def format_stat(s: dict[str, float]) -> str:
    if s["n"] == 0:
        return "diverged"
    return f"{s['mean']:.4f} ± {s['std']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"


def task_table(task: str, runs: list[dict], flat_params: Optional[int]) -> tuple[list[str], list[dict]]:
    """Markdown lines of one task's table, and the rows behind it."""
    rows = arm_rows(task, runs)
    accuracy = task == "reviews"
    header = ["arm", "focus", "LoRA params", "x flat", "ranks min/med/max", "chosen LR (of)", "seeds",
              "test acc" if accuracy else None, "test loss", "val loss", "val acc" if accuracy else None]
    header = [h for h in header if h]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    labels = {a.name: a.label for a in (HEAD_ONLY,) + ARMS}
    for row in rows:
        params = sorted({r["lora_parameters"] for r in row["runs"]})
        param_text = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}-{params[-1]:,}"
        ratio = (f"{mean(params) / flat_params:.2f}" if flat_params else "-") if params != [0] else "0"
        ranks = row["runs"][0].get("ranks", {})
        rank_text = f"{ranks['min']}/{ranks['median']:g}/{ranks['max']}" if ranks.get("modules") else "-"
        cells = [labels.get(row["arm"], row["arm"]), row["focus"] or "-", param_text, ratio, rank_text,
                 lr_text(row), str(len(row["seeds"]))]
        if accuracy:
            cells.append(format_stat(stats(row["runs"], "test_acc")))
        cells.append(format_stat(stats(row["runs"], "test_loss")))
        cells.append(f"{stats(row['runs'], 'val_loss')['mean']:.4f}")
        if accuracy:
            cells.append(f"{stats(row['runs'], 'val_acc')['mean']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines, rows


def lr_text(row: dict) -> str:
    """The chosen LR and the grid it was chosen from (or where a fixed LR came from)."""
    if row["arm"] == "head_only":
        return f"{row['lr']:g} (head LR)"
    seeds = {lr: len(runs) for lr, runs in row["by_lr"].items()}
    staged = len(set(seeds.values())) > 1
    grid_text = ", ".join(f"{lr:g}" for lr in row["lrs"])
    return f"{row['lr']:g} (of {grid_text}{'; chosen on the first seed' if staged else ''})"


def task_verdicts(task: str, rows: list[dict], baselines: dict) -> list[str]:
    """Each arm against flat LoRA (same focus-less flat for every focus), and flat against the baselines.

    Reviews are judged on test accuracy and on test loss (both are reported; they need not
    agree), digits on held-out loss.
    """
    metrics = [("test_acc", True), ("test_loss", False)] if task == "reviews" else [("test_loss", False)]
    flat = next((row for row in rows if row["arm"] == "flat"), None)
    if flat is None:
        return ["- no flat LoRA runs yet"]
    lines = []
    if task == "reviews":
        probe = baselines.get("linear_probe") or {}
        majority_test = (baselines.get("majority") or {}).get("test")
        if probe.get("test_acc") is not None and majority_test is not None:
            acc = stats(flat["runs"], "test_acc")
            clear = acc["mean"] - acc["std"] > max(probe["test_acc"], majority_test)
            lines.append(f"- flat LoRA test accuracy {acc['mean']:.4f} ± {acc['std']:.4f} vs majority {majority_test:.4f} "
                         f"and linear probe {probe['test_acc']:.4f}: "
                         + ("clearly above both (mean minus one seed std)" if clear else
                            "above the majority rate, but NOT clearly above the probe (mean minus one seed std)"))
        if probe.get("test_loss") is not None:
            loss = stats(flat["runs"], "test_loss")
            lines.append(f"- flat LoRA test loss {loss['mean']:.4f} ± {loss['std']:.4f} vs linear probe "
                         f"{probe['test_loss']:.4f}: {'lower' if loss['mean'] < probe['test_loss'] else 'HIGHER'}")
    else:
        pretrained = (baselines.get("pretrained") or {}).get("test_loss")
        if pretrained is not None:
            flat_value = stats(flat["runs"], "test_loss")["mean"]
            lines.append(f"- flat LoRA test loss {flat_value:.4f} vs pretrained (unadapted) {pretrained:.4f}: "
                         f"adaptation {'improves' if flat_value < pretrained else 'does NOT improve'} it by "
                         f"{pretrained - flat_value:+.4f}")
    labels = {a.name: a.label for a in (HEAD_ONLY,) + ARMS}
    for row in rows:
        if row["arm"] == "flat":
            continue
        focus = f" [{row['focus']}]" if row["focus"] else ""
        judged = "; ".join(verdict(row, flat, key, higher) for key, higher in metrics)
        lines.append(f"- {labels.get(row['arm'], row['arm'])}{focus} vs flat: {judged}")
    eva = next((row for row in rows if row["arm"] == "eva"), None)
    for row in rows:
        if eva is not None and row["arm"] == "fisher_budget":
            focus = f" [{row['focus']}]" if row["focus"] else ""
            judged = "; ".join(verdict(row, eva, key, higher) for key, higher in metrics)
            lines.append(f"- {labels['fisher_budget']}{focus} vs {labels['eva']}: {judged}")
    return lines


def write_report(store: ResultStore, path: Path, command: str, wall_seconds: Optional[float]) -> str:
    """Write the Markdown report next to the JSON and return it."""
    out = ["# Quality benchmark: Fisher-allocated LoRA ranks vs flat LoRA and EVA", ""]
    out.append("Generated by `benchmarks/quality.py` from "
               f"`{store.path.relative_to(RESULTS_DIR.parent.parent) if store.path.is_relative_to(RESULTS_DIR.parent.parent) else store.path}`.")
    out.append("")
    out.append(f"- command: `{command}`")
    earlier = list(dict.fromkeys(i["command"] for i in store.data["invocations"]))
    if len(earlier) > 1 or (earlier and earlier[0] != command):
        out.append("- the stored runs come from: " + "; ".join(f"`{c}`" for c in earlier))
    out.append(f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} intra-op threads for MiniLM, 1 for the flow model; "
               f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
               f"{platform.python_implementation()} {platform.python_version()}")
    compute = sum(r["seconds"] for r in store.data["runs"])
    out.append(f"- compute time of the stored runs: {compute / 60:.1f} min over {len(store.data['runs'])} runs"
               + (f"; this invocation's wall time: {wall_seconds / 60:.1f} min" if wall_seconds is not None else ""))
    out.append("- selection: adapter LR per arm by mean validation loss over seeds; test metrics at that LR, "
               "mean ± sample std [min, max] over seeds")
    for task in ("reviews", "digits"):
        runs = store.runs(task)
        if not runs:
            continue
        protocol = store.data["protocols"].get(task, {})
        baselines = store.data["baselines"].get(task, {})
        flat_runs = [r for r in runs if r["arm"] == "flat"]
        flat_params = flat_runs[0]["lora_parameters"] if flat_runs else None
        table, rows = task_table(task, runs, flat_params)
        out += ["", f"## {task}", "", f"protocol: `{json.dumps(protocol)}`", ""]
        out += baseline_lines(task, baselines) + [""] + table + ["", "Verdicts (test metric at each arm's chosen LR):", ""]
        out += task_verdicts(task, rows, baselines)
        out += ["", "Notes:", ""] + task_notes(runs, rows)
        out += ["", "Mean validation loss by LR (n = seeds):", ""]
        out += [f"- {row['arm']}{'/' + row['focus'] if row['focus'] else ''}: "
                + ", ".join(f"{lr:g}: {v:.4f} (n={len(row['by_lr'][lr])})" for lr, v in row["val_by_lr"].items())
                for row in rows]
    text = "\n".join(out) + "\n"
    write_atomically(path, text)
    return text


def task_notes(runs: list[dict], rows: list[dict]) -> list[str]:
    """Facts behind the table: analysis and EVA costs, and focuses whose allocations coincide."""
    lines = []
    analyses = {(r["seed"], r.get("focus") or ""): r for r in runs if r.get("analysis_batches") is not None}
    if analyses:
        batches = sorted({r["analysis_batches"] for r in analyses.values()})
        stops = sorted({r["analysis_stop"] for r in analyses.values()})
        seconds = [r["analysis_seconds"] for r in analyses.values() if r.get("analysis_seconds") is not None]
        lines.append(f"- Fisher analyses: {len(analyses)} (one per seed{' and focus' if any(f for _, f in analyses) else ''}), "
                     f"{'/'.join(map(str, batches))} batches, stopped by {', '.join(stops)}"
                     + (f", {min(seconds):.1f}-{max(seconds):.1f} s each" if seconds else ""))
    eva = [r for r in runs if r.get("eva_total_rank") is not None]
    flat = next((r for r in runs if r["arm"] == "flat" and r["ranks"].get("modules")), None)
    if eva:
        flat_total = f" vs flat {flat['ranks']['modules'] * flat['ranks']['max']}" if flat else ""
        lines.append(f"- EVA total rank {'/'.join(str(t) for t in sorted({r['eva_total_rank'] for r in eva}))}"
                     f"{flat_total}; SVD + init {min(r['eva_seconds'] for r in eva):.0f}-"
                     f"{max(r['eva_seconds'] for r in eva):.0f} s per run (the SVD is cached per seed)")
    for row in rows:
        if row["arm"] != "head_only" and len(row["lrs"]) > 1 and row["lr"] in (row["lrs"][0], row["lrs"][-1]):
            lines.append(f"- {row['arm']}{'/' + row['focus'] if row['focus'] else ''}: the chosen LR {row['lr']:g} "
                         "is at the edge of the grid; its best LR may lie outside it")
    lines += same_allocation_notes(runs)
    return lines or ["- none"]


def same_allocation_notes(runs: list[dict]) -> list[str]:
    """Focuses of one Fisher arm whose every run matches another focus's exactly (same ranks, same numbers)."""
    lines = []
    by_arm: dict[str, dict[str, dict[tuple, float]]] = {}
    for r in runs:
        if r.get("focus"):
            by_arm.setdefault(r["arm"], {}).setdefault(r["focus"], {})[(float(r["lr"]), r["seed"])] = r["test_loss"]
    for arm, focuses in by_arm.items():
        names = sorted(focuses)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = set(focuses[a]) & set(focuses[b])
                if common and all(focuses[a][k] == focuses[b][k] for k in common):
                    lines.append(f"- {arm}: focus {a} and {b} gave identical results in all {len(common)} common runs "
                                 "(their maps allocate the same ranks)")
    return lines


def baseline_lines(task: str, baselines: dict) -> list[str]:
    lines = ["Baselines:", ""]
    if task == "reviews":
        m = baselines.get("majority") or {}
        if m:
            lines.append(f"- majority class: test {m['test']:.4f}, validation {m['val']:.4f}")
        p = baselines.get("linear_probe") or {}
        if p:
            lines.append(f"- linear probe on frozen mean-pooled features (C={p['C']} chosen on validation): "
                         f"test acc {p['test_acc']:.4f}, test loss {p['test_loss']:.4f}, val acc {p['val_acc']:.4f}")
    else:
        p = baselines.get("pretrained") or {}
        if p:
            lines.append(f"- pretrained on digits 0-4, not adapted: test loss {p['test_loss']:.4f}, "
                         f"validation loss {p['val_loss']:.4f}")
    return lines


# ============================================================================ command line


def quick_variant(task: TaskSpec) -> TaskSpec:
    """Smoke mode: one seed, one LR, a handful of batches; every code path, no meaningful numbers."""
    return replace(task, seeds=(0,), lrs=(task.lrs[1],), epochs=1, limit_train_batches=3, limit_eval_batches=2,
                   analysis_max_batches=3, focuses=task.focuses[:1], staged=True, default_arms=None)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("reviews", "digits", "all"), default="all")
    parser.add_argument("--seeds", help="comma-separated run seeds (default 0,1,2)")
    parser.add_argument("--lrs", help="comma-separated adapter learning rates (default per task)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default per task)")
    parser.add_argument("--head-lr", type=float,
                        help="learning rate of the reviews classification head (default 3e-3); part of the "
                             "protocol, so give a separate --results file")
    parser.add_argument("--arms", help=f"comma-separated arms (default all: {', '.join(a.name for a in ARMS)}, head_only)")
    parser.add_argument("--full", action="store_true",
                        help="every arm, each on the full LR x seed grid (default: the reduced protocol, "
                             "see REVIEWS / DIGITS)")
    parser.add_argument("--quick", action="store_true", help="smoke test (separate quality_quick.* files)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the JSON")
    parser.add_argument("--results", type=Path, help="results JSON (default benchmarks/results/quality.json)")
    parser.add_argument("--workdir", type=Path, help="data, maps and feature cache (default ~/.cache/lightning_fisher/quality)")
    return parser.parse_args(argv)


def selected_tasks(args: argparse.Namespace) -> list[TaskSpec]:
    # digits first: minutes for the whole task, so an interrupted run still has one complete table
    tasks = [t for t in (DIGITS, REVIEWS) if args.task in ("all", t.name)]
    if args.quick:
        tasks = [quick_variant(t) for t in tasks]
    if args.seeds:
        tasks = [replace(t, seeds=tuple(int(s) for s in args.seeds.split(","))) for t in tasks]
    if args.full:
        tasks = [replace(t, staged=False, default_arms=None) for t in tasks]
    if args.epochs:
        tasks = [replace(t, epochs=args.epochs) for t in tasks]
    if args.head_lr:
        tasks = [replace(t, head_lr=args.head_lr) if t.head_lr is not None else t for t in tasks]
    if args.lrs:
        tasks = [replace(t, lrs=tuple(float(s) for s in args.lrs.split(","))) for t in tasks]
    return tasks


def selected_arms(args: argparse.Namespace, task: TaskSpec) -> tuple[Arm, ...]:
    every = ((HEAD_ONLY,) if task.name == "reviews" else ()) + ARMS
    if not args.arms:
        return every if task.default_arms is None else tuple(a for a in every if a.name in task.default_arms)
    wanted = args.arms.split(",")
    unknown = set(wanted) - {a.name for a in every}
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {sorted(unknown)} for {task.name}")
    return tuple(a for a in every if a.name in wanted)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    name = "quality_quick" if args.quick else "quality"
    results = args.results or RESULTS_DIR / f"{name}.json"
    report = results.with_suffix(".md")
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    store = ResultStore(results)
    if args.report_only and store.data["invocations"]:
        command = store.data["invocations"][-1]["command"] + "  (report rewritten with --report-only)"
    if not args.report_only:
        from lightning_fisher.examples.drug_reviews import default_cache_dir

        quiet_lightning()
        workdir = args.workdir or default_cache_dir() / "quality"
        store.data["invocations"].append({"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()})
        store.save()
        for task in selected_tasks(args):
            run_task(store, task, selected_arms(args, task), workdir)
    text = write_report(store, report, command, None if args.report_only else time.perf_counter() - started)
    print("\n" + text)


if __name__ == "__main__":
    main()
