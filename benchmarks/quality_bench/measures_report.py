"""The report's sections on the measures of ``measures.py``: first-epoch validation loss, forgetting, and its figure.

A lower learning rate forgets less by itself, so forgetting is compared at every learning rate
(each arm against flat LoRA at the same one) as well as at each arm's chosen learning rate.
Runs stored before a measure existed are counted as "not measured", never filled in.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Optional

from lightning_fisher.data.atomic_io import write_bytes_atomic
from lightning_fisher.fisher_map.records import STOPPING_METHODS

from quality_bench.measures import PRETRAINED_LOW_HALF, forgetting
from quality_bench.protocol import ARMS, HEAD_ONLY
from quality_bench.selection import mean, spread

LABELS = {a.name: a.label for a in (HEAD_ONLY,) + ARMS}
BASE_BUDGET = {a.name for a in ARMS if a.rank_fraction == 1.0}  # the arms with flat LoRA's parameters
NOT_MEASURED = "not measured"
Value = Callable[[dict[str, Any]], Optional[float]]


def row_name(row: dict) -> str:
    return LABELS.get(row["arm"], row["arm"]) + (f" [{row['focus']}]" if row["focus"] else "")


def measured(runs: list[dict], value: Value) -> list[float]:
    return [v for v in (value(r) for r in runs) if v is not None]


def cell(runs: list[dict], value: Value, signed: bool = False) -> str:
    """``mean ± std (n=k)`` over the runs that have the measure; says which were not measured."""
    values = measured(runs, value)
    if not values:
        return NOT_MEASURED if runs else "-"
    mean = sum(values) / len(values)
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    text += f" ± {spread(values):.4f}" if len(values) > 1 else ""
    missing = len(runs) - len(values)
    return text + f" (n={len(values)}" + (f"; {missing} {NOT_MEASURED})" if missing else ")")


def lr_columns(rows: list[dict]) -> list[float]:
    return sorted({lr for row in rows if row["arm"] != "head_only" for lr in row["by_lr"]})


def first_epoch_section(rows: list[dict]) -> list[str]:
    """Validation loss after the first epoch, per arm: at the chosen LR beside the final one, and at every LR."""
    value = lambda r: r.get("first_epoch_val_loss")  # noqa: E731
    if not any(measured(runs, value) for row in rows for runs in row["by_lr"].values()):
        return [f"Validation loss after the first epoch: {NOT_MEASURED} in the stored runs (made before the measure "
                "existed; `--remeasure` adds it)."]
    lrs = lr_columns(rows)
    header = ["arm", "chosen LR", "after epoch 1", "final val loss"] + [f"epoch 1 at LR {lr:g}" for lr in lrs]
    lines = ["Validation loss after the first epoch (how fast an arm adapts; mean ± sample std over seeds):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row_name(row), f"{row['lr']:g}", cell(row["runs"], value), cell(row["runs"], lambda r: r.get("val_loss"))]
        cells += [cell(row["by_lr"].get(lr, []), value) for lr in lrs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Loss after epoch 1 against flat LoRA at equal LR (mean of the arm minus mean of flat over the seeds "
              "measured at that LR; less means it adapted faster, less or more only when the difference exceeds the "
              "larger sample std of the two, else parity):", ""]
    lines += equal_lr_lines(rows, value, lrs, verb="loss after epoch 1")
    return lines


def forgetting_section(rows: list[dict], baselines: dict, figure: Optional[str]) -> list[str]:
    """Forgetting on digits 0-4 per arm at the chosen LR and at every LR, and each arm against flat at equal LR."""
    reference = (baselines.get(PRETRAINED_LOW_HALF) or {}).get("test_loss")
    value = lambda r: forgetting(r, reference)  # noqa: E731
    if reference is None or not any(measured(runs, value) for row in rows for runs in row["by_lr"].values()):
        return [f"Forgetting (loss on the pretraining half, digits 0-4): {NOT_MEASURED} in the stored runs (made "
                "before the measure existed; `--remeasure` adds it)."]
    lrs = lr_columns(rows)
    header = ["arm", "chosen LR", "test loss 5-9", "forgetting at chosen LR"] + [f"forgetting at LR {lr:g}" for lr in lrs]
    lines = [f"Forgetting: held-out loss on digits 0-4 (the pretraining half) after adaptation minus the pretrained "
             f"model's {reference:.4f}, same fixed timesteps and noise as the adaptation loss; mean ± sample std over "
             "seeds. A lower LR forgets less by itself, so compare arms in the same LR column.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row_name(row), f"{row['lr']:g}", cell(row["runs"], lambda r: r.get("test_loss")),
                 cell(row["runs"], value, signed=True)]
        cells += [cell(row["by_lr"].get(lr, []), value, signed=True) for lr in lrs]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Forgetting against flat LoRA at equal LR (mean of the arm minus mean of flat over the seeds measured "
              "at that LR; less or more only when the difference exceeds the larger sample std of the two, else "
              "parity):", ""]
    lines += equal_lr_lines(rows, value, lrs)
    if figure:
        lines += ["", f"![adaptation loss against forgetting per arm across LRs]({figure})"]
    return lines


def equal_lr_comparison(row: dict, reference: dict, value: Value, lrs: list[float]) -> list[dict[str, Any]]:
    """``row`` against ``reference`` in every LR column both have a measured run in.

    One entry per such LR: ``lr``, ``difference`` (mean of the row minus mean of the reference
    over the seeds measured there), and, where both have several seeds, ``noise`` (the larger
    sample std) and ``word``: ``less`` / ``more`` when the difference exceeds the noise, else
    ``parity``; with one seed on either side ``noise`` and ``word`` are ``None``.
    """
    compared = []
    for lr in lrs:
        mine, theirs = measured(row["by_lr"].get(lr, []), value), measured(reference["by_lr"].get(lr, []), value)
        if not mine or not theirs:
            continue
        entry = {"lr": lr, "difference": sum(mine) / len(mine) - sum(theirs) / len(theirs), "noise": None, "word": None}
        if min(len(mine), len(theirs)) >= 2:
            entry["noise"] = max(spread(mine), spread(theirs))
            entry["word"] = "parity" if abs(entry["difference"]) <= entry["noise"] else (
                "less" if entry["difference"] < 0 else "more")
        compared.append(entry)
    return compared


def equal_lr_lines(rows: list[dict], value: Value, lrs: list[float], *, verb: str = "forgets") -> list[str]:
    """Each arm against flat LoRA in every LR column both have: less, more or parity (within the spread)."""
    flat = next((row for row in rows if row["arm"] == "flat"), None)
    if flat is None:
        return ["- no flat LoRA runs"]
    lines = []
    for row in rows:
        if row is flat or row["arm"] == "head_only":  # no adapter, so no adapter LR to compare at
            continue
        compared = equal_lr_comparison(row, flat, value, lrs)
        if not compared:
            continue
        counts = {word: sum(c["word"] == word for c in compared) for word in ("less", "more", "parity")}
        parts = [f"{c['lr']:g}: {c['difference']:+.4f} (one seed)" if c["word"] is None else
                 f"{c['lr']:g}: {c['difference']:+.4f} ({c['word']}, spread {c['noise']:.4f})" for c in compared]
        judged = sum(counts.values())
        summary = (f"{verb} less at {counts['less']}, more at {counts['more']}, parity at {counts['parity']} of "
                   f"{judged} LRs with several seeds" if judged else "one seed per LR: no spread to judge by")
        lines.append(f"- {row_name(row)}: {summary}; " + ", ".join(parts))
    return lines or ["- no other arm measured"]


def forgetting_figure(rows: list[dict], baselines: dict, path: Path) -> Optional[Path]:
    """Adaptation loss (x) against forgetting (y) per arm across LRs; written atomically as PNG.

    One line per arm (and focus) through its LRs in order, each point the mean over the seeds
    measured at that LR with sample-std error bars on both axes; a ring marks the LR the arm
    chose on validation. Only arms at flat LoRA's base budget measured on at least two LRs with
    several seeds each (the full-grid arms) are drawn; the staged arms and the flat arms at other
    budgets (whose diverging high-LR runs would dwarf the rest) are in the tables. Returns
    ``None`` (and writes nothing) when no run has the measure.
    """
    reference = (baselines.get(PRETRAINED_LOW_HALF) or {}).get("test_loss")
    value = lambda r: forgetting(r, reference)  # noqa: E731
    series = []
    for row in rows:
        if row["arm"] not in BASE_BUDGET:
            continue
        points = []
        for lr in sorted(row["by_lr"]):
            runs = [r for r in row["by_lr"][lr] if value(r) is not None and r.get("test_loss") is not None]
            if len(runs) >= 2:  # a point needs a spread; staged arms have one seed off their chosen LR
                xs, ys = [r["test_loss"] for r in runs], [value(r) for r in runs]
                points.append((lr, mean(xs), spread(xs), mean(ys), spread(ys)))
        if len(points) >= 2:  # a curve across LRs: the arms on the full LR x seed grid
            series.append((row, points))
    if reference is None or not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 6.5))
    markers = "osD^v<>PXh*"
    for index, (row, points) in enumerate(series):
        lrs, xs, xerr, ys, yerr = zip(*points)
        line = axes.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker=markers[index % len(markers)], markersize=5,
                             capsize=2, linewidth=1, label=row_name(row))
        color = line[0].get_color()
        if row["lr"] in lrs:
            chosen = lrs.index(row["lr"])
            axes.plot(xs[chosen], ys[chosen], marker="o", markersize=13, markerfacecolor="none", color=color)
        if row["arm"] == "flat":
            for lr, x, y in zip(lrs, xs, ys):
                axes.annotate(f"lr {lr:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.set_xlabel("test loss on digits 5-9 after adaptation (lower: better adapted)")
    axes.set_ylabel(f"forgetting: loss on digits 0-4 minus the pretrained model's {reference:.4f}")
    axes.set_title("digits: adaptation against forgetting across learning rates\n(arms with flat LoRA's parameters on "
                   "the full LR x seed grid; mean ± sample std over seeds;\nring: the LR the arm chose on validation)",
                   fontsize=10)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue(), make_parents=True)
    return path


def remeasured_lines(runs: list[dict]) -> list[str]:
    """Did the runs re-measured with ``--remeasure`` reproduce the stored ones they replaced?

    Runs replaced because their map's analysis now stops by another rule, or because the
    allocator now gives their map other ranks, are counted apart: their map changed, so they are
    not expected to reproduce the old numbers.
    """
    again = [r for r in runs if r.get("previous")]
    if not again:
        return []
    new_rule = [r for r in again if _previous_stop_method(r) != r.get("analysis_stop_method")]
    new_ranks = [r for r in again if r not in new_rule and any(
        r["previous"].get(key, r.get(key)) != r.get(key) for key in ("ranks", "lora_parameters", "map_lora_parameters"))]
    same_rule = [r for r in again if r not in new_rule and r not in new_ranks]
    lines = []
    if same_rule:
        keys = ("val_loss", "test_loss", "val_acc", "test_acc", "lora_parameters")
        differences = [abs(r[k] - r["previous"][k]) for r in same_rule for k in keys
                       if r.get(k) is not None and r["previous"].get(k) is not None]
        same = sum(all(r.get(k) == r["previous"].get(k) for k in keys if k in r["previous"]) for r in same_rule)
        lines.append(f"- {len(same_rule)} runs re-measured (`--remeasure`, to add the measures below): {same} "
                     f"reproduced the replaced run's stored numbers exactly; largest difference "
                     f"{max(differences, default=0.0):.2e}")
    if new_rule:
        methods = sorted({r["analysis_stop_method"] for r in new_rule})
        lines.append(f"- {len(new_rule)} Fisher runs re-run (`--remeasure`) because their map's analysis now stops "
                     f"by another rule ({'; '.join(methods)}); the replaced runs' numbers are kept in the JSON "
                     "under `previous`")
    if new_ranks:
        lines.append(f"- {len(new_ranks)} Fisher runs re-run (`--remeasure`) because this version allocates their map "
                     "other ranks (no rank above a module's size since Dec 2026); the replaced runs' numbers are kept "
                     "in the JSON under `previous`")
    return lines


def _previous_stop_method(run: dict) -> Optional[str]:
    # A Fisher run recorded before the method was used the trace ranking's rule, the only one there was.
    default = STOPPING_METHODS["trace"] if "analysis_stop_method" in run else None
    return run["previous"].get("analysis_stop_method", default)
