"""Selection: each arm's adapter LR chosen on validation (the library's rule), the statistics over seeds, and the
judgement of one arm against another by the seed spread."""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from lightning_fisher.compare.results import choose_learning_rate

from quality_bench.protocol import ARMS, HEAD_ONLY, TIE_TOLERANCE


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
    """The LR chosen on validation, and all of its runs (sorted by seed).

    The rule is the library's (:func:`lightning_fisher.compare.results.choose_learning_rate`,
    also behind ``lightning-fisher compare --lrs``): lowest mean validation loss over the seeds
    every LR has (all seeds on a full grid, the first seed when the arm was staged), a diverged
    run counting as infinite; ties within ``TIE_TOLERANCE`` go to the higher validation accuracy.
    """
    lr = choose_learning_rate(
        {lr: {r["seed"]: r["val_loss"] for r in runs} for lr, runs in by_lr.items()},
        tie_scores={lr: {r["seed"]: r.get("val_acc") for r in runs} for lr, runs in by_lr.items()},
        tolerance=TIE_TOLERANCE,
    )
    return lr, sorted(by_lr[lr], key=lambda r: r["seed"])


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


def task_metrics(task: str) -> list[tuple[str, bool]]:
    """The test metrics a task is judged on, each with whether higher is better.

    Reviews are judged on test accuracy and on test loss (both are reported; they need not
    agree), digits on held-out loss.
    """
    return [("test_acc", True), ("test_loss", False)] if task == "reviews" else [("test_loss", False)]


def judge(runs: list[dict], reference: list[dict], key: str, higher_is_better: bool) -> dict[str, Any]:
    """One arm's runs against a reference's: the difference of means against the larger seed spread of the two.

    Returns ``difference`` (arm minus reference), ``noise`` (the larger sample std), ``paired``
    (the differences seed by seed) and ``word``: ``better`` / ``worse`` when the difference
    exceeds the noise, ``parity`` when it does not, ``undetermined`` when either arm has a
    single seed, ``not comparable`` when a run diverged.
    """
    a, b = stats(runs, key), stats(reference, key)
    difference = a["mean"] - b["mean"]
    noise = max(a["std"], b["std"])
    if not math.isfinite(difference):
        word = "not comparable"
    elif min(a["n"], b["n"]) < 2:
        word = "undetermined"
    elif abs(difference) <= noise:
        word = "parity"
    else:
        word = "better" if (difference > 0) == higher_is_better else "worse"
    return {"difference": difference, "noise": noise, "paired": paired_differences(runs, reference, key), "word": word}


def paired_differences(runs: list[dict], reference: list[dict], key: str) -> list[float]:
    """Arm minus reference, seed by seed (same seed = same head init and data order)."""
    ref = {r["seed"]: r[key] for r in reference if r.get(key) is not None}
    return [r[key] - ref[r["seed"]] for r in runs if r.get(key) is not None and r["seed"] in ref]
