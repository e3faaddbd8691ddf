"""Flat LoRA refitted on all 600 training reviews, to compare with the probe fitted on the same 600.

The arms train on 480 reviews and hold 120 out to choose their learning rate, so the fair
probe for them is the one fitted on those 480. The brief's probe figure (0.739) was fitted on
all 600; this check refits flat LoRA on the same 600 at the LR it chose on validation (same
seeds, steps per epoch grow with the data) so that figure meets an equal-data comparison too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quality_bench.protocol import ARMS, TaskSpec
from quality_bench.selection import choose_lr
from quality_bench.runs import run_one
from quality_bench.store import ResultStore

BASELINE = "flat_refit_train_val"
FLAT = next(arm for arm in ARMS if arm.name == "flat")


def refit_flat(store: ResultStore, task: TaskSpec, folders: dict[str, Path], workdir: Path) -> None:
    """Refit flat LoRA on train + validation at its chosen LR for every seed (once flat's grid is complete)."""
    by_lr: dict[float, list[dict[str, Any]]] = {}
    for run in store.runs(task.name):
        if run["arm"] == FLAT.name:
            by_lr.setdefault(float(run["lr"]), []).append(run)
    complete = set(by_lr) >= set(task.lrs_for(FLAT.name)) and all(
        {r["seed"] for r in runs} >= set(task.seeds) for runs in by_lr.values())
    if not complete:
        print(f"[{task.name} refit] flat LoRA's LR grid is not complete yet; no refit", flush=True)
        return
    lr = choose_lr(by_lr)[0]
    stored = store.baseline(task.name, BASELINE)
    if stored is not None and stored["lr"] != lr:
        print(f"[{task.name} refit] flat LoRA now chooses lr={lr:g}, not {stored['lr']:g}: the stored refit "
              "runs are replaced as the new ones finish", flush=True)
    if stored is None or stored["lr"] != lr:
        stored = {"lr": lr, "train_samples": None, "runs": []}
    done = {r["seed"] for r in stored["runs"]}
    todo = [seed for seed in task.seeds if seed not in done]
    print(f"[{task.name} refit] flat LoRA on train + validation at lr={lr:g}: {len(todo)} of {len(task.seeds)} "
          "seeds to go", flush=True)
    every = {**folders, "train": folders["train_and_val"]}
    for seed in todo:
        record = run_one(FLAT, task, lr, seed, "", every, workdir / task.name)
        # validation reviews are training reviews here: their metrics mean nothing
        record = {k: v for k, v in record.items() if not k.startswith("val_")}
        stored = {**stored, "train_samples": folder_size(folders["train_and_val"]), "runs": stored["runs"] + [record]}
        store.set_baseline(task.name, BASELINE, stored)
        print(f"[{task.name} refit] seed={seed}: test loss {record['test_loss']:.4f}, test acc {record['test_acc']:.4f} "
              f"({record['seconds']:.0f} s)", flush=True)


def folder_size(folder: Path) -> int:
    from lightning_fisher.data.tensor_folder import list_sample_files

    return len(list_sample_files(folder))
