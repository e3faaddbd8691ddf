"""Samples per criterion: when each criterion's split-half rule stops, and how much maps from disjoint halves differ.

Issue 19, item 4. The spectrum criterion's stopping rule ran for 15-25 batches on reviews where
the trace rule stopped after 5. For both criteria (``trace``, ``spectrum``) and both quality
benchmark tasks (digits flow matching, focus ``balanced``; MiniLM + drug reviews), with the
quality benchmark's protocol (``quality_bench``: its folders, its analysis, its allocation, its
fits) and analysis seed 0:

1. **Stop**: the analysis of the training folder with the default rule (split-half correlation
   >= 0.9 for 5 batches, at least 5 batches, at most 40): batches, samples, why it stopped, the
   split-half curve, and where rules with a lower patience or threshold would have stopped on the
   same curve (replayed through the package's own ``StabilityTracker``).
2. **Halves**: the training folder split by file parity into two disjoint halves, a map from each
   (same rule), and how the two maps agree at the protocol's budget (base rank, budget mode) and
   at 50 %: Spearman of the ranks over all candidate modules (0 for a module left out), modules
   with equal rank, summed absolute rank difference (L1), LoRA parameters. Also each half against
   the full-data map, and the spectrum map stopped earlier (where the lower-patience / -threshold
   rules or the trace rule stopped) against the default one.
3. **Frontier points** (digits only; review fits take minutes each here): each map fitted with the
   quality protocol (``quality_bench.runs.run_one``) at the LR the quality benchmark chose for that
   arm on validation (``benchmarks/results/quality.json``, ``selection.arm_rows``), seeds 0, 1, 2.
   One map per data set, the same map under every fit seed (the quality benchmark analyses once per
   seed instead), so the seed spread is the fit's alone. Test loss mean +- sample std, and each
   pair judged by ``selection.judge`` (difference against the larger seed spread).

Run:  python benchmarks/samples_per_criterion.py [--workdir DIR] [--tasks digits reviews] [--no-50]
Results: benchmarks/results/samples_per_criterion.json and .md (rewritten after every stage;
finished stages are read back, so an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_bench.protocol import ARMS, DIGITS, RESULTS_DIR, REVIEWS, TaskSpec  # noqa: E402

CRITERIA = ("trace", "spectrum")
FOCUS = {"digits": "balanced", "reviews": ""}
SEED = 0  # the analysis seed of every map
FIT_SEEDS = (0, 1, 2)
ARM = {a.name: a for a in ARMS}
#: (criterion, budget) -> the quality benchmark's arm: its rank rule and the LR it chose
ARM_FOR = {("trace", 1.0): "fisher_budget", ("spectrum", 1.0): "fisher_spectrum",
           ("trace", 0.5): "fisher_budget_50", ("spectrum", 0.5): "fisher_spectrum_50"}
#: Rules replayed on the default rule's curve: (patience, threshold, min_batches).
REPLAYED_RULES = tuple((p, t, m) for m in (5, 1) for t in (0.9, 0.85, 0.8) for p in (5, 3, 2, 1))
#: The lower rules whose spectrum maps are made and compared (min_batches as the protocol's).
EARLY_RULES = ((3, 0.9), (2, 0.9), (1, 0.9), (5, 0.8), (2, 0.8))


# ------------------------------------------------------------------ pure functions
def parity_halves(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Two disjoint halves of ``files``: even positions and odd positions (order kept)."""
    files = list(files)
    return files[0::2], files[1::2]


def replay_stop(history: Iterable[Optional[float]], patience: int, threshold: float, min_batches: int) -> Optional[int]:
    """The batch at which a rule would have stopped on a recorded split-half curve (``None``: not on this curve).

    The package's own tracker decides (``StabilityTracker``), without a batch limit.
    """
    from lightning_fisher.analysis.stability import StabilityRule, StabilityTracker

    tracker = StabilityTracker(StabilityRule(patience=patience, threshold=threshold, min_batches=min_batches,
                                             max_batches=None))
    for correlation in history:
        if tracker.update(correlation) is not None:
            return tracker.batches
    return None


def samples_at(batches: Optional[int], batch_size: int, total: int) -> Optional[int]:
    """Samples seen after ``batches`` batches of one pass over ``total`` samples (the last batch may be short)."""
    return None if batches is None else min(batches * batch_size, total)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman's correlation with tied ranks averaged; ``None`` when either side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else cov / math.sqrt(va * vb)


def rank_agreement(a: dict[str, int], b: dict[str, int], modules: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """How two rank allocations agree over ``modules`` (default: every module either names; absent = rank 0).

    Returns ``spearman`` (of the ranks), ``equal`` (modules with the same rank), ``l1`` (summed
    absolute rank difference), ``modules``.
    """
    names = sorted(set(a) | set(b) if modules is None else set(modules))
    x = [a.get(n, 0) for n in names]
    y = [b.get(n, 0) for n in names]
    return {"spearman": spearman(x, y), "equal": sum(p == q for p, q in zip(x, y)),
            "l1": sum(abs(p - q) for p, q in zip(x, y)), "modules": len(names)}


# ------------------------------------------------------------------ the measurements
def prepare(task: TaskSpec, workdir: Path) -> dict[str, Path]:
    from quality_bench.data import prepare_digits, prepare_reviews

    return prepare_digits(workdir / "digits") if task.name == "digits" else prepare_reviews(workdir / "reviews")


def half_folders(folders: dict[str, Path], workdir: Path) -> dict[str, dict[str, Path]]:
    """The training folder's two parity halves as linked folders, each with the task's other folders."""
    from lightning_fisher.data.tensor_folder import list_sample_files
    from quality_bench.data import link_subset

    even, odd = parity_halves(list_sample_files(folders["train"]))
    return {name: {**folders, "train": link_subset(files, workdir / "halves" / name)}
            for name, files in (("even", even), ("odd", odd))}


def analysis_facts(fisher_map, task: TaskSpec, total: int) -> dict[str, Any]:
    analysis = fisher_map.analysis
    history = list(analysis.stability.history)
    replays = [{"patience": p, "threshold": t, "min_batches": m, "batches": replay_stop(history, p, t, m),
                "samples": samples_at(replay_stop(history, p, t, m), task.batch_size, total)}
               for p, t, m in REPLAYED_RULES]
    return {"batches": analysis.batches, "samples": analysis.samples, "stop_reason": analysis.stop_reason,
            "method": analysis.stability.method, "history": history, "seconds": analysis.seconds,
            "data_samples": total, "replayed_rules": replays}


def allocations(fisher_map, task: TaskSpec, criterion: str, folders: dict[str, Path], model) -> dict[str, Any]:
    """The map re-allocated by the quality arms of ``criterion`` (100 %, 50 %): ranks and LoRA parameters."""
    from quality_bench.runs import arm_fisher_map

    out = {}
    for (crit, budget), arm_name in ARM_FOR.items():
        if crit == criterion:
            arm_map = arm_fisher_map(ARM[arm_name], task, fisher_map, model)
            out[str(budget)] = {"ranks": dict(arm_map.ranks), "lora_parameters": arm_map.budget.lora_parameters}
    return out


def analyse_task(task: TaskSpec, workdir: Path) -> dict[str, Any]:
    """Stage 1 and 2 for one task: full-data and half-data maps of both criteria, the early spectrum maps."""
    from lightning_fisher.data.tensor_folder import list_sample_files
    from quality_bench.runs import base_fisher_map, build_model, map_path, task_threads

    folders = prepare(task, workdir)
    halves = half_folders(folders, workdir / task.name)
    focus = FOCUS[task.name]
    total = len(list_sample_files(folders["train"]))
    maps: dict[str, Any] = {}
    with task_threads(task):
        model = build_model(task, 1e-3, SEED, folders)
        candidates = None
        for criterion in CRITERIA:
            sources = {"full": folders, **halves}
            for data_name, data_folders in sources.items():
                n = total if data_name == "full" else len(list_sample_files(data_folders["train"]))
                started = time.perf_counter()
                fisher_map = base_fisher_map(task, SEED, focus, data_folders, workdir / task.name / data_name,
                                             criterion=criterion)
                key = f"{criterion}/{data_name}"
                path = map_path(task, SEED, focus, workdir / task.name / data_name, criterion)
                maps[key] = {"criterion": criterion, "data": data_name, "path": str(path),
                             **analysis_facts(fisher_map, task, n),
                             "allocations": allocations(fisher_map, task, criterion, folders, model),
                             "wall_seconds": round(time.perf_counter() - started, 1)}
                candidates = candidates or sorted(fisher_map.scores)
                print(f"[{task.name}] {key}: {fisher_map.analysis.batches} batches, {fisher_map.analysis.samples} "
                      f"samples, {fisher_map.analysis.stop_reason}", flush=True)
        # The spectrum map where a lower rule (or the trace rule) would have stopped: the same analysis
        # (same seed, same order) cut at that batch.
        default_stop = maps["spectrum/full"]["batches"]
        early = {replay_stop(maps["spectrum/full"]["history"], p, t, 5) for p, t in EARLY_RULES}
        early.add(maps["trace/full"]["batches"])
        for batches in sorted(b for b in early if b is not None and b < default_stop):
            cut = replace(task, analysis_max_batches=batches)
            fisher_map = base_fisher_map(cut, SEED, focus, folders, workdir / task.name / "full", criterion="spectrum")
            key = f"spectrum/full@{batches}"
            path = map_path(cut, SEED, focus, workdir / task.name / "full", "spectrum")
            maps[key] = {"criterion": "spectrum", "data": "full", "cut_at": batches, "path": str(path),
                         "batches": fisher_map.analysis.batches, "samples": fisher_map.analysis.samples,
                         "history": list(fisher_map.analysis.stability.history),
                         "history_is_prefix": list(fisher_map.analysis.stability.history)
                         == maps["spectrum/full"]["history"][:batches],
                         "allocations": allocations(fisher_map, task, "spectrum", folders, model)}
            print(f"[{task.name}] {key}: {fisher_map.analysis.samples} samples", flush=True)
    return {"modules": candidates, "maps": maps, "agreement": agreements(maps, candidates)}


def agreements(maps: dict[str, Any], modules: list[str]) -> list[dict[str, Any]]:
    pairs = []
    for criterion in CRITERIA:
        pairs += [(f"{criterion}/even", f"{criterion}/odd"), (f"{criterion}/full", f"{criterion}/even"),
                  (f"{criterion}/full", f"{criterion}/odd")]
    pairs += [("spectrum/full", key) for key in maps if "@" in key]
    pairs.append(("trace/full", "spectrum/full"))
    rows = []
    for a, b in pairs:
        for budget in ("1.0", "0.5"):
            x, y = maps[a]["allocations"].get(budget), maps[b]["allocations"].get(budget)
            if x is None or y is None:
                continue
            rows.append({"a": a, "b": b, "budget": float(budget), **rank_agreement(x["ranks"], y["ranks"], modules),
                         "lora_parameters": [x["lora_parameters"], y["lora_parameters"]]})
    return rows


def pin(source: Path, task: TaskSpec, criterion: str, workdir: Path) -> Path:
    """Place one map where ``run_one`` looks for each fit seed's map, so every seed fits the same map."""
    from quality_bench.runs import map_path

    for seed in FIT_SEEDS:
        target = map_path(task, seed, FOCUS[task.name], workdir, criterion)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return workdir


def chosen_lrs(quality_json: Path, task: str) -> dict[str, float]:
    """The LR the quality benchmark chose on validation for each (arm, focus) of ``task`` (``selection.arm_rows``)."""
    from quality_bench.selection import arm_rows

    runs = [r for r in json.loads(quality_json.read_text())["runs"] if r["task"] == task]
    return {f"{row['arm']}/{row['focus']}": row["lr"] for row in arm_rows(task, runs)}


def fit_digits(results: dict[str, Any], workdir: Path, budgets: tuple[float, ...], save) -> None:
    """Stage 3: every digits map fitted at its arm's chosen LR, seeds 0-2 (finished fits are kept)."""
    from quality_bench.runs import quiet_lightning, run_one

    task, focus = DIGITS, FOCUS["digits"]
    folders = prepare(task, workdir)
    lrs = chosen_lrs(Path(results["quality_json"]), "digits")
    fits = results.setdefault("fits", [])
    done = {(f["map"], f["arm"], f["seed"]) for f in fits}
    quiet_lightning()
    for budget in budgets:
        for key, facts in results["tasks"]["digits"]["maps"].items():
            arm = ARM[ARM_FOR[(facts["criterion"], budget)]]
            lr = lrs[f"{arm.name}/{focus}"]
            pinned = pin(Path(facts["path"]), task, facts["criterion"], workdir / "digits" / "fits" / key.replace("/", "_"))
            for seed in FIT_SEEDS:
                if (key, arm.name, seed) in done:
                    continue
                record = run_one(arm, task, lr, seed, focus, folders, pinned)
                fits.append({"map": key, **record})
                print(f"[digits fit] {key} {arm.name} lr={lr:g} seed={seed}: {record['lora_parameters']:,} params, "
                      f"test loss {record['test_loss']:.4f} ({record['seconds']:.0f} s)", flush=True)
                save()
    results["frontier"] = frontier(results)
    save()


def frontier(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (arm, map): test loss over seeds; pairs judged by the larger seed spread (``selection.judge``)."""
    from quality_bench.selection import judge, stats

    groups: dict[tuple[str, str], list[dict]] = {}
    for f in results.get("fits", []):
        groups.setdefault((f["arm"], f["map"]), []).append(f)
    rows = []
    for (arm, key), runs in sorted(groups.items()):
        crit = key.split("/")[0]
        row = {"arm": arm, "map": key, "lr": runs[0]["lr"], "lora_parameters": runs[0]["lora_parameters"],
               "test_loss": stats(runs, "test_loss"), "seeds": sorted(r["seed"] for r in runs), "versus": {}}
        # the full-data map is the reference; the odd half also meets the even half
        for other in (f"{crit}/full", f"{crit}/even") if key == f"{crit}/odd" else (f"{crit}/full",):
            if other != key and (arm, other) in groups:
                row["versus"][other] = judge(runs, groups[(arm, other)], "test_loss", higher_is_better=False)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ the report
def fmt(value: Optional[float], digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Samples per criterion (issue 19, item 4)", "",
             f"`python benchmarks/samples_per_criterion.py` — {results.get('status', 'partial')}, "
             f"last written {results.get('written', '?')}. Analysis seed {SEED}; digits focus `balanced`.", ""]
    for name, task in results.get("tasks", {}).items():
        maps = task["maps"]
        lines += [f"## {name}: when the default rule stopped", "",
                  "| map | batches | samples (of data) | stop | split-half curve |", "|---|---|---|---|---|"]
        for key, m in maps.items():
            if "@" in key:
                continue
            curve = " ".join(fmt(c, 2) for c in m["history"])
            lines.append(f"| {key} | {m['batches']} | {m['samples']} ({m['data_samples']}) | {m['stop_reason']} | {curve} |")
        columns = sorted({(r["min_batches"], r["threshold"]) for r in maps["trace/full"]["replayed_rules"]},
                         key=lambda c: (-c[0], -c[1]))
        lines += ["", "Where other rules would have stopped on the full-data curve, batches (samples); '—': not "
                  "within the curve (the default rule stopped first, or the data ran out):", "",
                  "| criterion | patience | " + " | ".join(f"threshold {t}, min {m}" for m, t in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for criterion in CRITERIA:
            replays = {(r["min_batches"], r["threshold"], r["patience"]): r
                       for r in maps[f"{criterion}/full"]["replayed_rules"]}
            for patience in sorted({k[2] for k in replays}, reverse=True):
                cells = [replays[(m, t, patience)] for m, t in columns]
                lines.append(f"| {criterion} | {patience} | " + " | ".join(
                    "—" if c["batches"] is None else f"{c['batches']} ({c['samples']})" for c in cells) + " |")
        lines += ["", f"## {name}: map-to-map agreement", "",
                  "| maps | budget | Spearman of ranks | equal ranks | L1 rank difference | LoRA parameters |",
                  "|---|---|---|---|---|---|"]
        for a in task["agreement"]:
            lines.append(f"| {a['a']} vs {a['b']} | {a['budget']:.0%} | {fmt(a['spearman'])} | "
                         f"{a['equal']}/{a['modules']} | {a['l1']} | {a['lora_parameters'][0]:,} / {a['lora_parameters'][1]:,} |")
        lines.append("")
    if results.get("frontier"):
        lines += ["## digits: frontier points (one map per row, fitted with seeds 0-2)", "",
                  "| arm | map | LR | LoRA parameters | test loss (mean ± std, n) | vs | difference | larger seed std | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in results["frontier"]:
            t = row["test_loss"]
            versus = row["versus"] or {"": None}
            for other, j in versus.items():
                tail = ("| — | | | |" if j is None else
                        f"| {other} | {j['difference']:+.4f} | {j['noise']:.4f} | {j['word']} |")
                lines.append(f"| {row['arm']} | {row['map']} | {row['lr']:g} | {row['lora_parameters']:,} | "
                             f"{t['mean']:.4f} ± {t['std']:.4f} ({t['n']}) {tail}")
        lines.append("")
    if results.get("notes"):
        lines += ["## Notes", "", *results["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    from lightning_fisher.data.atomic_io import write_text_atomic
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "lightning_fisher" / "samples")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "samples_per_criterion.json")
    parser.add_argument("--quality-json", type=Path, default=RESULTS_DIR / "quality.json")
    parser.add_argument("--tasks", nargs="+", default=["digits", "reviews"], choices=["digits", "reviews"])
    parser.add_argument("--no-50", action="store_true", help="fit the digits maps at the base budget only")
    parser.add_argument("--no-fits", action="store_true", help="analyses and agreement only")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json, run nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)

    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if args.report_only:
        if results.get("fits"):
            results["frontier"] = frontier(results)
        write_text_atomic(args.json.with_suffix(".md"), markdown(results) + "\n", make_parents=True)
        return
    if results.get("workdir") != str(args.workdir):  # its maps are elsewhere: start afresh
        results = {"workdir": str(args.workdir)}
    results.update(quality_json=str(args.quality_json), status="partial")
    results.setdefault("tasks", {})

    def save() -> None:
        results["written"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n", make_parents=True)
        write_text_atomic(args.json.with_suffix(".md"), markdown(results) + "\n", make_parents=True)

    from quality_bench.runs import quiet_lightning

    quiet_lightning()
    for name in args.tasks:
        if name not in results["tasks"]:
            results["tasks"][name] = analyse_task(DIGITS if name == "digits" else REVIEWS, args.workdir)
            save()
    if "digits" in args.tasks and not args.no_fits:
        fit_digits(results, args.workdir, (1.0,) if args.no_50 else (1.0, 0.5), save)
    results["status"] = "complete" + ("" if len(args.tasks) == 2 and not args.no_fits and not args.no_50 else
                                      f" for {' '.join(args.tasks)}" + (", no fits" if args.no_fits else "")
                                      + (", fits at 100 % only" if args.no_50 and not args.no_fits else ""))
    save()
    print(f"results: {args.json} and {args.json.with_suffix('.md')}")


if __name__ == "__main__":
    main()
