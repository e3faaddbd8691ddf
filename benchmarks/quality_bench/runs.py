"""One run: build the task's model, attach the arm's adapters (flat, Fisher map, EVA), fit, validate, test.

Besides the final validation and test, every run records its validation loss after the first
epoch and, on digits, its loss on the pretraining half (``quality_bench/measures.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from lightning_fisher.data.atomic_io import atomic_writer

from quality_bench.data import datamodule
from quality_bench.measures import FirstEpochValidation, pretraining_half_loss
from quality_bench.protocol import EVA_RHO, Arm, TaskSpec
from quality_bench.store import finite_or_none


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


def adapter_root(task: TaskSpec) -> Optional[str]:
    return "encoder" if task.name == "reviews" else None


def lora_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name and p.requires_grad)


def adapter_rank_summary(model: torch.nn.Module) -> dict[str, Any]:
    from lightning_fisher.peft_factory import adapter_ranks

    return rank_summary(adapter_ranks(model).values())


def rank_summary(values: Iterable[int]) -> dict[str, Any]:
    """``{"modules", "min", "median", "max"}`` of some ranks (``{"modules": 0}`` for none)."""
    ranks = sorted(values)
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




def map_path(task: TaskSpec, seed: int, focus: str, workdir: Path, criterion: str = "trace") -> Path:
    """Where :func:`base_fisher_map` caches a seed's map (a map placed there is used as it is)."""
    tag = f"{task.name}_b{task.analysis_max_batches}_seed{seed}" + (f"_{focus}" if focus else "")
    if criterion != "trace":
        tag += f"_{criterion}"
    if task.limit_train_batches is not None:
        tag += f"_limit{task.limit_train_batches}"
    return workdir / "maps" / f"{tag}.json"


def base_fisher_map(
    task: TaskSpec, seed: int, focus: str, folders: dict[str, Path], workdir: Path, criterion: str = "trace"
):
    """The seed's Fisher analysis on the training folder only (cached as a map file in ``workdir``).

    The ``spectrum`` criterion's analysis also records each module's mean-gradient spectrum (the
    same samples, so the same scores); it is cached under its own name.
    """
    from lightning_fisher import AllocationSettings
    from lightning_fisher.fisher_map.map import FisherMap
    from lightning_fisher.fisher_map.records import STOPPING_METHODS
    from lightning_fisher.training.analyze import analyze

    path = map_path(task, seed, focus, workdir, criterion)
    if path.is_file():
        cached = FisherMap.load(path)
        stability = cached.analysis.stability if cached.analysis else None
        if stability is not None and stability.method == STOPPING_METHODS[criterion]:
            return cached  # else made by an older stopping rule: analyse again (the file is replaced)
    model = build_model(task, 1e-3, seed, folders)
    max_batches = task.analysis_max_batches if task.limit_train_batches is None else min(
        task.analysis_max_batches, task.limit_train_batches)
    options = dict(timestep_focus=focus) if focus else {}
    return analyze(
        model,
        datamodule(task, folders, seed, with_eval=False),
        output=path,
        exclude=["head"] if task.name == "reviews" else [],
        allocation=AllocationSettings(rank=task.rank, rank_min=task.rank_min, rank_max=task.rank_max, mode="budget",
                                      criterion=criterion),
        max_batches=max_batches, min_batches=min(5, max_batches), seed=seed,
        trainer_kwargs=dict(accelerator="cpu", devices=1, enable_progress_bar=False),
        **options,
    )


def arm_fisher_map(arm: Arm, task: TaskSpec, base, model: torch.nn.Module):
    """Re-allocate that seed's scores with the arm's rank rule and criterion (no second analysis)."""
    from lightning_fisher.fisher_map.map import FisherMap

    rank = arm.base_rank(task)
    allocation = replace(base.allocation, rank=rank, rank_min=arm.min_rank(task), rank_max=task.rank_max,
                         mode=arm.rank_mode, **arm.criterion_setting())
    if arm.criterion != "trace":  # needs the spectra the base map recorded
        return base.reallocate(allocation, lora_alpha=2.0 * rank)
    return FisherMap.from_scores(
        base.scores, model, allocation=allocation,
        lora_alpha=2.0 * rank, score_stderr=base.score_stderrs, analysis=base.analysis, dataset=base.dataset,
    )




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
    base = base_fisher_map(task, seed, focus, folders, workdir, criterion=arm.criterion)
    fisher_map = arm_fisher_map(arm, task, base, model)
    lora_kwargs = {"use_rslora": True, "lora_alpha": 2.0 * math.sqrt(rank)} if arm.rslora else {}
    facts = {
        **allocation_facts(fisher_map),
        "map_flat_parameters": fisher_map.budget.flat_lora_parameters,
        "analysis_batches": base.analysis.batches,
        "analysis_stop": base.analysis.stop_reason,
        "analysis_stop_method": base.analysis.stability.method if base.analysis.stability else None,
        "analysis_seconds": base.analysis.seconds,
        "excluded": len(fisher_map.excluded),
    }
    return [AdaptiveLoRA(fisher_map=fisher_map, lora_kwargs=lora_kwargs, **common)], facts


def allocation_facts(fisher_map) -> dict[str, Any]:
    """What a Fisher run records of its map besides the adapters' rank summary: every rank, the LoRA parameters."""
    return {"map_ranks": dict(fisher_map.ranks), "map_lora_parameters": fisher_map.budget.lora_parameters}


def current_allocation(arm: Arm, task: TaskSpec, seed: int, focus: str, folders, workdir: Path) -> dict[str, Any]:
    """What a run of the Fisher arm would record of its map with this version's allocator (the cached analysis).

    The adapters' rank summary (``ranks``) is the map's: the run injects exactly the map's ranks.
    """
    base = base_fisher_map(task, seed, focus, folders, workdir, criterion=arm.criterion)
    fisher_map = arm_fisher_map(arm, task, base, build_model(task, 1e-3, seed, folders))
    return {**allocation_facts(fisher_map), "ranks": rank_summary(fisher_map.ranks.values())}


def eva_initialise(task: TaskSpec, model, rank: int, folders: dict[str, Path], seed: int, workdir: Path) -> None:
    """Inject LoRA with PEFT's EVA initialisation (rank redistribution, rho=2) into the task's adapter root.

    The same candidates as the other arms (every Linear under the root), r = base rank,
    alpha = 2r; EVA rescales alpha with each new rank (``adjust_scaling_factors``), so alpha/r
    stays constant as in the other arms. EVA's SVD runs forward passes over the training folder
    only (order seeded by the run seed); its result does not depend on the learning rate, so it
    is computed once per seed and cached in ``workdir``.
    """
    import peft
    from lightning_fisher.analysis.candidates import select_candidates
    from lightning_fisher.fisher_map.patterns import exact_target_regex

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
        with atomic_writer(cache, make_parents=True) as handle:  # never a truncated cache to load next time
            torch.save(state, handle)
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
        first_epoch = FirstEpochValidation(task)
        fit_started = time.perf_counter()
        trainer(task, fit=True, callbacks=callbacks + [first_epoch]).fit(model, datamodule=data)
        fit_seconds = time.perf_counter() - fit_started
        evaluation = trainer(task, fit=False)
        val = evaluation.validate(model, datamodule=data, verbose=False)[0]
        test = evaluation.test(model, datamodule=data, verbose=False)[0]
        if task.name == "digits":
            facts["pretrain_test_loss"] = finite_or_none(pretraining_half_loss(task, model))
    record = {
        "task": task.name, "arm": arm.name, "lr": lr, "seed": seed, "focus": focus,
        "lora_parameters": lora_parameter_count(model),
        "ranks": adapter_rank_summary(model.encoder if task.name == "reviews" else model),
        "val_loss": finite_or_none(val["val_loss"]), "test_loss": finite_or_none(test["test_loss"]),
        "first_epoch_val_loss": None if first_epoch.val_loss is None else finite_or_none(first_epoch.val_loss),
        "fit_seconds": round(fit_seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        **facts,
    }
    if "val_acc" in val:
        record.update(val_acc=finite_or_none(val["val_acc"]), test_acc=finite_or_none(test["test_acc"]))
    return record
