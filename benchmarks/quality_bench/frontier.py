"""The frontier (issue 19): test metric against LoRA parameters per family, and each map against flat LoRA of its size.

Families: flat LoRA, and the Fisher map in budget mode with the ``trace`` and with the
``spectrum`` criterion, each at several fractions of flat LoRA's base rank
(``Arm.rank_fraction``: 25 / 50 / 100 / 200 %). A map's *twin* is the flat arm at the same
fraction: the same rank budget, so the same number of LoRA parameters up to the allocation's
rounding (a budget map never spends more). Each map is judged against its twin, not against
flat LoRA at the base rank, at the LR each chose on validation (``selection.judge``) and at
equal LR (``measures_report.equal_lr_comparison``): the report's own rules, so a verdict here
means what it means in the rest of the report.

Everything is drawn from the stored runs, so ``--report-only`` redraws it; a point planned but
not yet run is named as such in the table and under the figure, never drawn or guessed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from lightning_fisher.data.atomic_io import write_bytes_atomic

from quality_bench.measures_report import equal_lr_comparison
from quality_bench.protocol import ARMS, DIGITS, REVIEWS, Arm, TaskSpec
from quality_bench.selection import judge, mean, spread, stats, task_metrics

FAMILIES = {"flat": "flat LoRA", "trace": "Fisher map, trace", "spectrum": "Fisher map, spectrum"}
METRIC_NAMES = {"test_acc": "test accuracy", "test_loss": "test loss"}
NOT_MEASURED = "not yet measured"


def family(arm: Arm) -> Optional[str]:
    """The frontier family of ``arm`` (``flat``, ``trace``, ``spectrum``), or ``None`` for arms off the frontier.

    Off the frontier: EVA, the head-only fit, the median-mode map (its parameters float) and
    rsLoRA scaling (a variant of the trace map at one budget).
    """
    if arm.rslora:
        return None
    if arm.kind == "flat":
        return "flat"
    if arm.kind == "fisher" and arm.rank_mode == "budget":
        return arm.criterion
    return None


def family_arms(name: str) -> list[Arm]:
    """The arms of one family, smallest budget first."""
    return sorted((a for a in ARMS if family(a) == name), key=lambda a: a.rank_fraction)


def twin(arm: Arm) -> Optional[Arm]:
    """The flat arm at ``arm``'s budget fraction (``None`` if the protocol has none)."""
    return next((a for a in family_arms("flat") if a.rank_fraction == arm.rank_fraction), None)


def fraction_text(arm: Arm) -> str:
    return f"{arm.rank_fraction * 100:g} %"


def task_spec(task: str) -> TaskSpec:
    return {t.name: t for t in (DIGITS, REVIEWS)}[task]


def line_focus(task: str) -> str:
    """The timestep focus a map family's line runs through (the other foci are drawn as points)."""
    return task_spec(task).focuses[0]


def params_text(row: dict) -> str:
    params = sorted({r["lora_parameters"] for r in row["runs"]})
    return f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}-{params[-1]:,}"


def value_text(row: dict, key: str) -> str:
    s = stats(row["runs"], key)
    return "diverged" if s["n"] == 0 else f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})"


def chosen_lr_text(judged: dict) -> str:
    if judged["word"] in ("not comparable", "undetermined"):
        return f"{judged['difference']:+.4f}: {judged['word']}"
    return f"{judged['difference']:+.4f} (spread {judged['noise']:.4f}): **{judged['word']}**"


def equal_lr_text(row: dict, reference: dict, key: str, higher_is_better: bool) -> str:
    """Better / worse / parity in every LR column where both have several seeds; the one-seed columns counted."""
    compared = equal_lr_comparison(row, reference, lambda r: r.get(key), sorted(row["by_lr"]))
    better_word = "more" if higher_is_better else "less"
    parts = [f"{c['lr']:g}: {c['difference']:+.4f} (spread {c['noise']:.4f}) "
             + ("parity" if c["word"] == "parity" else "better" if c["word"] == better_word else "worse")
             for c in compared if c["word"] is not None]
    single = len([c for c in compared if c["word"] is None])
    if single:
        parts.append(f"{single} LR{'s' if single > 1 else ''} with one seed (not judged)")
    return "; ".join(parts) or "no common LR"


def frontier_pairs(task: str, rows: list[dict]) -> list[dict]:
    """Every planned map (and measured focus) with its twin: ``arm``, ``twin``, ``focus``, ``row``, ``twin_row``.

    ``row`` / ``twin_row`` is ``None`` where that arm has no stored runs yet.
    """
    by_key = {(row["arm"], row["focus"]): row for row in rows}
    pairs = []
    for name in ("trace", "spectrum"):
        for arm in family_arms(name):
            partner = twin(arm)
            twin_row = by_key.get((partner.name, "")) if partner else None
            focuses = sorted(focus for (arm_name, focus) in by_key if arm_name == arm.name) or [None]
            for focus in focuses:
                pairs.append({"arm": arm, "twin": partner, "focus": focus, "twin_row": twin_row,
                              "row": by_key.get((arm.name, focus)) if focus is not None else None})
    return pairs


def frontier_table(task: str, rows: list[dict]) -> list[str]:
    """Markdown: each map against its flat twin, at the chosen LR and at equal LR, per test metric; and a tally."""
    metrics = task_metrics(task)
    several = len(metrics) > 1
    header = ["map", "budget", "focus", "LoRA params (map / twin)", "chosen LR (map / twin)"]
    header += (["metric"] if several else []) + ["map", "flat twin", "at the chosen LRs", "at equal LR"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tally: dict[str, dict[str, int]] = {key: {} for key, _ in metrics}
    for pair in frontier_pairs(task, rows):
        arm, partner, row, twin_row = pair["arm"], pair["twin"], pair["row"], pair["twin_row"]
        twin_missing = (f"{NOT_MEASURED} ({partner.label}, rank {partner.base_rank(task_spec(task))})" if partner
                        else "no flat arm at this budget in the protocol")
        start = [FAMILIES[family(arm)], fraction_text(arm), pair["focus"] or "-",
                 f"{params_text(row) if row else '-'} / {params_text(twin_row) if twin_row else '-'}",
                 " / ".join(f"{r['lr']:g}" if r else "-" for r in (row, twin_row))]
        if row is None:  # one line for every metric
            cells = start + (["-"] if several else []) + [NOT_MEASURED, "measured" if twin_row else twin_missing, "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for key, higher in metrics:
            cells = start + ([METRIC_NAMES[key]] if several else []) + [value_text(row, key)]
            if twin_row is None:
                cells += [twin_missing, "-", "-"]
            else:
                judged = judge(row["runs"], twin_row["runs"], key, higher)
                tally[key][judged["word"]] = tally[key].get(judged["word"], 0) + 1
                cells += [value_text(twin_row, key), chosen_lr_text(judged), equal_lr_text(row, twin_row, key, higher)]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key, _ in metrics:
        counts = tally[key]
        if counts:
            lines.append(f"- {METRIC_NAMES[key]}, at the chosen LRs: "
                         + ", ".join(f"{word} {counts[word]}" for word in ("better", "parity", "worse", "undetermined",
                                                                            "not comparable") if counts.get(word))
                         + f" of {sum(counts.values())} measured map / twin pairs")
    return lines


def frontier_point(row: dict, key: str) -> Optional[tuple[float, float, float]]:
    """(mean LoRA parameters, mean, sample std of ``key``) over the runs at the row's chosen LR."""
    values = [r[key] for r in row["runs"] if r.get(key) is not None]
    if not values:
        return None
    return mean([r["lora_parameters"] for r in row["runs"]]), mean(values), spread(values)


def unmeasured(rows: list[dict]) -> list[str]:
    """Frontier arms with no stored runs (in family order)."""
    present = {row["arm"] for row in rows}
    return [f"{FAMILIES[name]} {fraction_text(arm)}" for name in FAMILIES for arm in family_arms(name)
            if arm.name not in present]


#: Points of one budget sit within 3 % of each other in parameters; each family is drawn shifted
#: by this factor along the (log) x axis so their error bars do not hide each other (a map's
#: further foci by its square, cube, ...).
DODGE = {"flat": 1.0, "trace": 0.97, "spectrum": 1.03}


def frontier_figure(task: str, rows: list[dict], baselines: dict, path: Path) -> Optional[Path]:
    """Test metric against LoRA parameters (log x), one line per family; written atomically as PNG.

    Each point is an arm at the LR it chose on validation: mean ± sample std over its seeds
    there, at its mean LoRA parameters (each family shifted by a few per cent along x, see
    ``DODGE``). A map family's line runs through the task's first timestep focus (digits:
    ``balanced``); its other foci are hollow points of the same colour. EVA is a point. The
    zero-parameter baseline (reviews: head-only fit; digits: the pretrained model before
    adaptation) has no place on a log axis: a horizontal line when it lies near the points,
    else its value in the panel's title. Arms not yet measured are named under the axes.
    Returns ``None`` (and writes nothing) when no frontier arm has runs.
    """
    metrics = task_metrics(task)
    focus = line_focus(task)
    members = {name: [(arm, row) for arm in family_arms(name) for row in rows if row["arm"] == arm.name]
               for name in FAMILIES}
    if not any(members.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes_list = plt.subplots(1, len(metrics), figsize=(7.5 * len(metrics), 5.5), squeeze=False)
    colours = {"flat": "black", "trace": "tab:blue", "spectrum": "tab:orange"}
    other_foci = sorted({row["focus"] for family_rows in members.values() for _, row in family_rows} - {"", focus})
    markers = dict(zip(other_foci, "^vD<>"))
    for axes, (key, higher) in zip(axes_list[0], metrics):
        for name, family_rows in members.items():
            line = [(arm, frontier_point(row, key)) for arm, row in family_rows if row["focus"] in ("", focus)]
            line = [(arm, p) for arm, p in line if p is not None]
            if line:
                xs, ys, es = zip(*(p for _, p in line))
                axes.errorbar([x * DODGE[name] for x in xs], ys, yerr=es, color=colours[name], marker="o",
                              markersize=5, capsize=3, linewidth=1.3,
                              label=FAMILIES[name] + (f" ({focus} focus)" if name != "flat" and focus else ""))
                if name == "flat":
                    for arm, (x, y, _) in line:
                        axes.annotate(f"rank {arm.base_rank(task_spec(task))}", (x, y), textcoords="offset points",
                                      xytext=(6, -12), fontsize=7)
            for arm, row in family_rows:
                point = frontier_point(row, key) if row["focus"] in markers else None
                if point is None:
                    continue
                shift = DODGE[name] ** (2 + other_foci.index(row["focus"]))
                axes.errorbar([point[0] * shift], [point[1]], yerr=[point[2]], color=colours[name],
                              marker=markers[row["focus"]], markerfacecolor="none", markersize=6, capsize=2,
                              linewidth=0.8, alpha=0.8)
        eva = next((row for row in rows if row["arm"] == "eva"), None)
        point = frontier_point(eva, key) if eva else None
        if point:
            axes.errorbar([point[0]], [point[1]], yerr=[point[2]], color="tab:green", marker="*", markersize=11,
                          capsize=3, linestyle="none", label="PEFT EVA")
        zero = zero_parameter_baseline(task, rows, baselines, key)
        if zero is not None:
            low, high = axes.get_ylim()
            if low - 0.5 * (high - low) <= zero[1] <= high + 0.5 * (high - low):
                axes.axhline(zero[1], color="grey", linestyle=":", linewidth=1, label=zero[0])
            else:
                where = "above" if zero[1] > high else "below"
                axes.set_title(f"{zero[0]}: {zero[1]:.4f}, {where} this axis", fontsize=8, color="dimgrey")
        axes.set_xscale("log")
        axes.set_xlabel("trainable LoRA parameters (log scale; families shifted a few % apart)")
        axes.set_ylabel(f"{METRIC_NAMES[key]} ({'higher' if higher else 'lower'} is better)")
        axes.grid(True, which="both", linewidth=0.3, alpha=0.5)
    for other, marker in markers.items():  # legend entries for the hollow foci
        axes_list[0][0].plot([], [], color="grey", marker=marker, markerfacecolor="none", linestyle="none",
                             label=f"map, {other} focus")
    axes_list[0][0].legend(fontsize=8, loc="best")
    missing = unmeasured(rows)
    figure.suptitle(f"{task}: test metric against LoRA parameters, each arm at the LR it chose on validation\n"
                    "(mean ± sample std over seeds)", fontsize=10)
    if missing:
        figure.text(0.01, 0.01, f"{NOT_MEASURED}: " + ", ".join(missing), fontsize=8, color="firebrick")
    figure.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue(), make_parents=True)
    return path


def zero_parameter_baseline(task: str, rows: list[dict], baselines: dict, key: str) -> Optional[tuple[str, float]]:
    """(label, value) of the task's baseline without LoRA parameters, for ``key``, if stored."""
    head = next((row for row in rows if row["arm"] == "head_only"), None)
    if head is not None:
        value = stats(head["runs"], key)["mean"]
        return ("head only (frozen encoder, 0 LoRA params)", value) if value == value else None
    pretrained = (baselines.get("pretrained") or {}).get(key)
    return ("pretrained, not adapted (0 LoRA params)", pretrained) if pretrained is not None else None


def frontier_section(task: str, rows: list[dict], baselines: dict, figure_path: Path) -> list[str]:
    """The report's frontier section for one task: figure link, how to read it, the twin table."""
    figure = frontier_figure(task, rows, baselines, figure_path)
    focus = line_focus(task)
    lines = [f"Each map against flat LoRA with the same rank budget (its twin: flat LoRA at the same fraction of the "
             f"base rank, so the same LoRA parameters up to the allocation's rounding), at the LR each chose on "
             f"validation and in every LR column where both have several seeds (the staged map arms have several "
             f"seeds only at their chosen LR). Verdicts by the larger seed spread of the two, as above.", ""]
    if figure:
        lines += [f"![{task}: test metric against LoRA parameters per family]({figure.name})", ""]
        if focus:
            lines += [f"Figure: each map family's line runs through the {focus} focus; the other foci are hollow "
                      "points of the same colour.", ""]
    lines += frontier_table(task, rows)
    missing = unmeasured(rows)
    if missing:
        lines += [f"- {NOT_MEASURED} on {task}: " + ", ".join(missing)]
    return lines
