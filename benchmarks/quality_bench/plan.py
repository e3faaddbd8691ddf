"""Which runs to make: the full grid for main arms, a staged LR sweep for the others; run what is missing."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Optional

from quality_bench.baselines import digits_baselines, reviews_baselines
from quality_bench.data import prepare_digits, prepare_reviews
from quality_bench.measures import MEASURES
from quality_bench.protocol import Arm, TaskSpec
from quality_bench.refit import refit_flat
from quality_bench.selection import choose_lr
from quality_bench.runs import current_allocation, run_one
from quality_bench.store import ResultStore
from lightning_fisher.fisher_map.records import STOPPING_METHODS

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
            lrs = (task.head_lr,) if arm.kind == "head_only" else task.lrs_for(arm.name)
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
            sweep += grid(task, arm, task.lrs_for(arm.name), first, (focus,))
            lr = sweep_choice(task, store, arm, focus)
            if lr is not None:
                rest += grid(task, arm, (lr,), others, (focus,))
    return sweep, rest


def sweep_choice(task: TaskSpec, store: "ResultStore", arm: Arm, focus: str) -> Optional[float]:
    """The LR the first seed chose on validation, once that seed has a run at every LR."""
    seed, lrs = task.seeds[0], task.lrs_for(arm.name)
    runs = {float(r["lr"]): [r] for r in store.runs(task.name)
            if r["arm"] == arm.name and (r.get("focus") or "") == focus and r["seed"] == seed and float(r["lr"]) in lrs}
    if len(runs) < len(lrs):
        return None
    return choose_lr(runs)[0]


def run_plan(store: ResultStore, task: TaskSpec, plan: Plan, folders: dict[str, Path], workdir: Path, phase: str,
             remeasure: bool = False) -> None:
    """Run every planned run not yet in the store, saving each as it finishes.

    With ``remeasure``, stored runs made before this version's measurements (``MEASURES``), and
    Fisher runs whose map this version would make otherwise (its analysis stopped by another
    rule than this version's for the criterion, or the allocator now gives other ranks, e.g.
    since ranks are capped at a module's size), run again and replace the stored ones (same
    protocol and seed; the old numbers are kept).
    """
    @functools.lru_cache(maxsize=None)
    def allocation(arm: Arm, seed: int, focus: str) -> dict:
        return current_allocation(arm, task, seed, focus, folders, workdir / task.name)

    def missing(arm: Arm, key: tuple) -> bool:
        if not store.has(key):
            return True
        if not remeasure:
            return False
        if store.lacks(key, MEASURES[task.name]):
            return True
        return arm.kind == "fisher" and (
            store.stopped_by_another_rule(key, STOPPING_METHODS[arm.criterion])
            or store.allocated_otherwise(key, allocation(arm, key[3], key[4]))
        )

    todo = [p for p in plan if missing(p[0], (task.name, p[0].name, float(p[1]), p[2], p[3]))]
    print(f"[{task.name} {phase}] {len(plan) - len(todo)} of {len(plan)} runs already done; {len(todo)} to go",
          flush=True)
    for index, (arm, lr, seed, focus) in enumerate(todo, 1):
        record = run_one(arm, task, lr, seed, focus, folders, workdir / task.name)
        store.add_run(record)
        metric = f", test acc {record['test_acc']:.4f}" if record.get("test_acc") is not None else ""
        if record.get("first_epoch_val_loss") is not None:
            metric += f", epoch-1 val loss {record['first_epoch_val_loss']:.4f}"
        if record.get("pretrain_test_loss") is not None:
            metric += f", loss on 0-4 {record['pretrain_test_loss']:.4f}"
        print(f"[{task.name} {phase} {index}/{len(todo)}] {arm.name}{'/' + focus if focus else ''} lr={lr:g} "
              f"seed={seed}: {record['lora_parameters']:,} params, val loss {record['val_loss']:.4f}, "
              f"test loss {record['test_loss']:.4f}{metric} ({record['seconds']:.0f} s)", flush=True)


def run_task(store: ResultStore, task: TaskSpec, arms: tuple[Arm, ...], workdir: Path, remeasure: bool = False) -> None:
    """Prepare data and baselines, run the main arms' grid and the other arms (full or staged), then the refit.

    ``remeasure``: see :func:`run_plan` (the refit is not re-measured: it has no validation).
    """
    store.check_protocol(task)
    folders = prepare_reviews(workdir / "reviews") if task.name == "reviews" else prepare_digits(workdir / "digits")
    if task.name == "reviews":
        reviews_baselines(store, task, folders, workdir / "reviews")
    else:
        digits_baselines(store, task, folders)
    if not task.staged:
        run_plan(store, task, full_plan(task, arms), folders, workdir, "all arms", remeasure)
    else:
        run_plan(store, task, full_plan(task, tuple(a for a in arms if a.main)), folders, workdir, "main arms", remeasure)
        sweep, _ = staged_plan(task, arms, store)
        run_plan(store, task, sweep, folders, workdir, "LR sweep, first seed", remeasure)
        _, rest = staged_plan(task, arms, store)
        run_plan(store, task, rest, folders, workdir, "other seeds at the chosen LR", remeasure)
    if task.name == "reviews" and any(arm.name == "flat" for arm in arms):
        refit_flat(store, task, folders, workdir)
