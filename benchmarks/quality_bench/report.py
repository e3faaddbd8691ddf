"""The Markdown report: each arm at the LR it chose on validation (``selection.py``), verdicts against flat LoRA and EVA,
and the sections on first-epoch loss and forgetting (``measures_report.py``)."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from lightning_fisher.data.atomic_io import write_text_atomic
from lightning_fisher.fisher_map.records import STOPPING_METHODS

from quality_bench.frontier import frontier_section
from quality_bench.measures_report import first_epoch_section, forgetting_figure, forgetting_section, remeasured_lines
from quality_bench.protocol import ARMS, HEAD_ONLY, RESULTS_DIR
from quality_bench.selection import arm_rows, judge, mean, stats, task_metrics
from quality_bench.store import ResultStore


def verdict(row: dict, reference: dict, key: str, higher_is_better: bool) -> str:
    """Plain words: the difference of means against the larger seed spread of the two arms (``selection.judge``)."""
    judged = judge(row["runs"], reference["runs"], key, higher_is_better)
    difference, noise, word = judged["difference"], judged["noise"], judged["word"]
    paired_text = (f"; per seed {', '.join(f'{d:+.3f}' for d in judged['paired'])}" if judged["paired"] else "")
    if word == "not comparable":
        return "not comparable (a diverged run)"
    if word == "undetermined":
        return f"{difference:+.4f} {key.replace('_', ' ')}{paired_text} -> undetermined (one seed: no spread to judge by)"
    within = "within" if abs(difference) <= noise else "outside"
    return f"{difference:+.4f} {key.replace('_', ' ')}, {within} the seed spread {noise:.4f}{paired_text} -> {word}"


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

    Judged on the task's test metrics (``selection.task_metrics``).
    """
    metrics = task_metrics(task)
    flat = next((row for row in rows if row["arm"] == "flat"), None)
    if flat is None:
        return ["- no flat LoRA runs yet"]
    lines = []
    if task == "reviews":
        lines += precondition_lines(flat["runs"], baselines)
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


def clearly_above(runs: list[dict], value: float) -> bool:
    """Mean test accuracy minus one seed std above ``value``: the precondition's sense of "clearly"."""
    acc = stats(runs, "test_acc")
    return acc["mean"] - acc["std"] > value


def lower_word(runs: list[dict], value: float) -> str:
    return "lower" if stats(runs, "test_loss")["mean"] < value else "HIGHER"


def precondition_lines(flat: list[dict], baselines: dict) -> list[str]:
    """Does flat LoRA clearly beat the majority rate and the linear probe (on equal data, and on the brief's)?"""
    lines = []
    probe = baselines.get("linear_probe") or {}
    majority_test = (baselines.get("majority") or {}).get("test")
    acc, loss = stats(flat, "test_acc"), stats(flat, "test_loss")
    if probe and majority_test is not None:
        lines.append(f"- flat LoRA test accuracy {acc['mean']:.4f} ± {acc['std']:.4f} vs majority {majority_test:.4f} "
                     f"and the linear probe on the same 480 reviews {probe['test_acc']:.4f}: "
                     + ("clearly above both (mean minus one seed std)"
                        if clearly_above(flat, max(probe["test_acc"], majority_test))
                        else "above the majority rate, but NOT clearly above the probe (mean minus one seed std)"))
        lines.append(f"- flat LoRA test loss {loss['mean']:.4f} ± {loss['std']:.4f} vs linear probe "
                     f"{probe['test_loss']:.4f}: {lower_word(flat, probe['test_loss'])}")
    probe_600 = baselines.get("linear_probe_train_val") or {}
    if not probe_600:
        return lines
    lines.append(f"- flat LoRA (trained on the 480-review split) vs the probe fitted on all "
                 f"{probe_600['train_samples']} training reviews ({probe_600['test_acc']:.4f}; "
                 "not an equal-data comparison): "
                 + ("clearly above" if clearly_above(flat, probe_600["test_acc"]) else "NOT clearly above")
                 + f" in accuracy; test loss {lower_word(flat, probe_600['test_loss'])} "
                 f"than its {probe_600['test_loss']:.4f}")
    refit = baselines.get("flat_refit_train_val") or {}
    if refit.get("runs"):
        runs = refit["runs"]
        acc, loss = stats(runs, "test_acc"), stats(runs, "test_loss")
        lines.append(f"- flat LoRA refitted on all {refit['train_samples']} training reviews at its chosen LR "
                     f"{refit['lr']:g} ({acc['n']} seeds): test accuracy {acc['mean']:.4f} ± {acc['std']:.4f}, "
                     f"loss {loss['mean']:.4f} ± {loss['std']:.4f}, vs the probe fitted on the same reviews "
                     f"{probe_600['test_acc']:.4f} / {probe_600['test_loss']:.4f}: "
                     + ("clearly above" if clearly_above(runs, probe_600["test_acc"]) else "NOT clearly above")
                     + f" in accuracy (mean minus one seed std), loss {lower_word(runs, probe_600['test_loss'])}")
    return lines


def figure_path(report: Path, name: str) -> Path:
    """``<name>.png`` beside the default report, ``<stem>_<name>.png`` beside any other."""
    return report.with_name(f"{name}.png" if report.stem == "quality" else f"{report.stem}_{name}.png")


def write_report(store: ResultStore, path: Path, command: str, wall_seconds: Optional[float]) -> str:
    """Write the Markdown report next to the JSON (and, with measured digits runs, the forgetting figure); return it."""
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
        out += ["", "### Frontier: each map against flat LoRA at the same parameter count", ""]
        out += frontier_section(task, rows, baselines, figure_path(path, f"frontier_{task}"))
        out += ["", "Notes:", ""] + task_notes(runs, rows) + remeasured_lines(runs)
        out += ["", "Mean validation loss by LR (n = seeds):", ""]
        out += [f"- {row['arm']}{'/' + row['focus'] if row['focus'] else ''}: "
                + ", ".join(f"{lr:g}: {v:.4f} (n={len(row['by_lr'][lr])})" for lr, v in row["val_by_lr"].items())
                for row in rows]
        out += ["", "### How fast: validation loss after the first epoch", ""] + first_epoch_section(rows)
        if task == "digits":
            figure = forgetting_figure(rows, baselines, figure_path(path, "forgetting_digits"))
            out += ["", "### Forgetting of the pretraining half", ""]
            out += forgetting_section(rows, baselines, figure.name if figure else None)
    text = "\n".join(out) + "\n"
    write_text_atomic(path, text, make_parents=True)
    return text


def task_notes(runs: list[dict], rows: list[dict]) -> list[str]:
    """Facts behind the table: analysis and EVA costs, and focuses whose allocations coincide."""
    lines = []
    criterion = {a.name: a.criterion for a in ARMS}
    for name in ("trace", "spectrum"):
        # one analysis per seed and focus and criterion; every arm of that criterion re-allocates it
        # runs recorded before the method was used the trace ranking's rule, the only one there was
        analyses = {(r["seed"], r.get("focus") or "", r.get("analysis_stop_method") or STOPPING_METHODS["trace"]): r
                    for r in runs
                    if r.get("analysis_batches") is not None and criterion.get(r["arm"]) == name}
        if not analyses:
            continue
        batches = sorted({r["analysis_batches"] for r in analyses.values()})
        stops = sorted({r["analysis_stop"] for r in analyses.values()})
        seconds = [r["analysis_seconds"] for r in analyses.values() if r.get("analysis_seconds") is not None]
        lines.append(f"- Fisher analyses, {name} criterion: {len(analyses)} (one per seed"
                     f"{' and focus' if any(key[1] for key in analyses) else ''}"
                     f"{', and stopping rule' if len({key[2] for key in analyses}) > 1 else ''}), "
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
            lines.append(f"- linear probe on frozen mean-pooled features of the 480 training reviews (C={p['C']} chosen "
                         "on validation): "
                         f"test acc {p['test_acc']:.4f}, test loss {p['test_loss']:.4f}, val acc {p['val_acc']:.4f}")
        p = baselines.get("linear_probe_train_val") or {}
        if p:
            lines.append(f"- the same probe (C={p['C']}) fitted on all {p['train_samples']} training reviews "
                         f"(train + validation; the arms train on 480): test acc {p['test_acc']:.4f}, "
                         f"test loss {p['test_loss']:.4f}")
    else:
        p = baselines.get("pretrained") or {}
        if p:
            lines.append(f"- pretrained on digits 0-4, not adapted: test loss {p['test_loss']:.4f}, "
                         f"validation loss {p['val_loss']:.4f}")
    return lines
