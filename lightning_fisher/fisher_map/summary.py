"""A fisher map in words: every summary of a map that the library prints comes from here.

One set of phrases, laid out for four places:

* :func:`summary_line`: one line (``FisherMap.summary()``, the demo, the notebook), which
  also says when the analysis did not converge or skipped non-finite samples;
* :func:`stop_line`: why the analysis ended (the analysis' closing line);
* :func:`header_fields`: labelled fields, the header of ``lightning-fisher show``;
* :func:`plot_title`: the two-line title of the heatmap;
* :func:`fit_summary`: what :class:`~lightning_fisher.AdaptiveLoRA` logs at fit start, about
  the adapters it actually injected (their ranks and parameters are read from the model, so
  they are passed in; the map's own are the default everywhere else);
* :func:`replaced_map_note`: what ``analyze`` says when a new map replaces an older one.

Parameters are compared with flat LoRA at the map's base rank on every candidate
(``budget.flat_lora_parameters``); the ratio reads ``n/a`` when that is 0. Rank spreads are
``low-high`` with the median. This module imports no third-party package (the map type only
for type checking), so the map, the report and the training callback can all use it.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from lightning_fisher.wording import plural

if TYPE_CHECKING:  # the records only (a FisherMap is one): the map module imports this one
    from lightning_fisher.fisher_map.records import MapContent, TimestepFocusRecord
    from lightning_fisher.peft_factory import MapApplication

__all__ = [
    "at_full_size", "fit_summary", "header_fields", "plot_title", "rank_changes", "replaced_map_note", "stop_line", "summary_line",
    "times_flat",
]

# Changed modules listed by name before the rest are only counted.
_MAX_CHANGES = 6


def times_flat(parameters: int, flat_parameters: int) -> str:
    """``parameters`` as a multiple of flat LoRA's, e.g. ``"0.98x"``; ``"n/a"`` when flat has none."""
    return "n/a" if flat_parameters <= 0 else f"{parameters / flat_parameters:.2f}x"


def _spread(ranks: Iterable[int]) -> Optional[tuple[str, str]]:
    """``("low-high", "median")`` of some ranks, ``None`` for none."""
    values = sorted(ranks)
    if not values:
        return None
    return f"{values[0]}-{values[-1]}", f"{statistics.median(values):g}"


def _bounds(bounds: Optional[Sequence[float]]) -> str:
    return "-" if bounds is None else f"{bounds[0]:g}-{bounds[1]:g}"


def _ranks(fisher_map: MapContent) -> dict[str, int]:
    # as records.ranks_of, which this stdlib-only module does not import
    return {m.name: m.rank for m in fisher_map.modules if m.rank is not None}


def _adapted(fisher_map: MapContent, noun: str) -> str:
    return f"{len(_ranks(fisher_map))}/{len(fisher_map.modules)} {noun}"


def summary_line(fisher_map: MapContent) -> str:
    """One line: adapted modules, rank range and median, LoRA parameters versus flat LoRA.

    ``35/36 modules adapted, ranks 2-24 (median 7), 331,776 LoRA parameters = 1.00x flat rank 8 (331,776)``

    Args:
        fisher_map: the map to summarise.
    """
    budget = fisher_map.budget
    spread = _spread(_ranks(fisher_map).values())
    ranks = f", ranks {spread[0]} (median {spread[1]})" if spread else ""
    line = (
        f"{_adapted(fisher_map, 'modules adapted')}{ranks}, {budget.lora_parameters:,} LoRA parameters = "
        f"{times_flat(budget.lora_parameters, budget.flat_lora_parameters)} flat rank {budget.rank} "
        f"({budget.flat_lora_parameters:,})"
    )
    full = at_full_size(fisher_map)
    if full:
        shown = ", ".join(f"{name} {rank}" for name, rank in list(full.items())[:3]) + (", ..." if len(full) > 3 else "")
        line += f"; {plural(len(full), 'module')} at full size, rank min(d_in, d_out) ({shown})"
    analysis = fisher_map.analysis
    if analysis is not None and not analysis.converged:
        line += f"; NOT converged ({analysis.stop_reason.replace('_', ' ')} after {plural(analysis.batches, 'batch')})"
    if analysis is not None and analysis.skipped_samples:
        line += f"; {analysis.skipped_samples:,} non-finite samples skipped"
    return line


def at_full_size(fisher_map: MapContent) -> dict[str, int]:
    """``{module: rank}`` of the adapted modules whose rank is their size, ``min(d_in, d_out)``,
    below ``rank_max``: the allocation stopped there because a larger adapter would not fit."""
    rank_max = fisher_map.budget.rank_max
    return {m.name: m.rank for m in fisher_map.modules
            if m.rank is not None and m.rank_limit < rank_max and m.rank == m.rank_limit}


def stop_line(fisher_map: MapContent) -> str:
    """Why the analysis ended, in one sentence, and what to do when it did not converge.

    ``analysis converged after 7 batches (112 samples): split-half Spearman 0.95, at least 0.9
    for 5 batches`` or ``analysis did NOT converge: data exhausted after 3 batches (48
    samples), split-half Spearman 0.62 (needs 0.9 for 5 batches); ...``.

    Args:
        fisher_map: a map with an analysis record.
    """
    analysis = fisher_map.analysis
    if analysis is None:
        return "no analysis record: the map was built from given scores"
    seen = f"{plural(analysis.batches, 'batch')} ({plural(analysis.samples, 'sample')})"
    skipped = f"; {analysis.skipped_samples:,} non-finite samples skipped" if analysis.skipped_samples else ""
    rule = analysis.stability
    last = "n/a" if rule is None or rule.last_correlation is None else f"{rule.last_correlation:.3f}"
    correlation_of = _correlation_of(rule.method) if rule is not None else None
    if correlation_of is not None:
        last = f"{last} (of {correlation_of})"
    if analysis.converged:
        needs = "" if rule is None else f", at least {rule.threshold:g} for {plural(rule.patience, 'batch')}"
        return f"analysis converged after {seen}: split-half Spearman {last}{needs}{skipped}"
    why = {"data_exhausted": "the data ran out", "max_batches": "max_batches was reached",
           "interrupted": "the run was interrupted"}.get(analysis.stop_reason, analysis.stop_reason)
    needs = "" if rule is None else f" (needs {rule.threshold:g} for {plural(rule.patience, 'batch')})"
    return (
        f"analysis did NOT converge: {why} after {seen}, split-half Spearman {last}{needs}{skipped}. "
        "The module ranking may not be reproducible: analyse more samples (more data, max_epochs > 1 for "
        "random losses, a higher max_batches) or accept it knowingly"
    )


def _correlation_of(method: str) -> Optional[str]:
    """What a stopping method's correlation compares, when it is not the module scores (the plain case)."""
    from lightning_fisher.allocation.criteria import criterion_for_stopping_method

    try:
        criterion = criterion_for_stopping_method(method)
    except KeyError:  # a map from a criterion this process has not registered
        return None
    return None if criterion.correlation_of == "module scores" else criterion.correlation_of


def header_fields(fisher_map: MapContent) -> list[tuple[str, str]]:
    """``(label, text)`` pairs describing how a map was made and what it allocates.

    Labels, in order (those in brackets only when the map records it): ``[map]`` (its file),
    ``model``, ``created``, ``[dataset]``, ``[analysis]``, ``[stopped]``, ``[focus]``, ``[run]``
    (the last four from the analysis record), ``budget``, ``LoRA`` (parameters versus flat
    LoRA), ``alpha``, ``adapted``.

    Args:
        fisher_map: the map to describe.
    """
    fields: list[tuple[str, str]] = []
    if fisher_map.path is not None:
        fields.append(("map", _shown_path(fisher_map.path)))
    model = fisher_map.model
    fields.append(("model", f"{model.class_name}, {model.num_parameters:,} parameters ({model.fingerprint[:19]}…)"))
    version = fisher_map.versions.get("lightning_fisher")
    fields.append(("created", fisher_map.created + (f" by lightning_fisher {version}" if version else "")))
    if fisher_map.dataset is not None:
        fields.append(("dataset", f"{_shown_path(fisher_map.dataset.path)} ({fisher_map.dataset.num_files:,} sample files)"))
    analysis = fisher_map.analysis
    if analysis is not None:
        processes = f", {analysis.world_size} processes" if analysis.world_size > 1 else ""
        fields.append(
            (
                "analysis",
                f"{analysis.score}, {plural(analysis.samples, 'sample')} in {plural(analysis.batches, 'batch')} "
                f"({analysis.skipped_samples:,} skipped){processes}, loss reduction {analysis.loss_reduction}",
            )
        )
        stop = analysis.stop_reason
        if analysis.stop_reason != "converged":
            stop += f", converged: {'yes' if analysis.converged else 'no'}"
        stability = analysis.stability
        if stability is not None:
            last = "n/a" if stability.last_correlation is None else f"{stability.last_correlation:.3f}"
            stop += f" ({stability.method} {last}, threshold {stability.threshold:g}, patience {stability.patience})"
        fields.append(("stopped", stop))
        fields.append(("focus", _focus_field(analysis.timestep_focus)))
        run = f"seed {analysis.seed}" if analysis.seed is not None else "no seed"
        if analysis.seconds is not None:
            run += f", {analysis.seconds:.1f} s"
        fields.append(("run", run))
    budget = fisher_map.budget
    fields.append(
        (
            "budget",
            f"rank {budget.rank} (min {budget.rank_min}, max {budget.rank_max}, mode {budget.mode}), "
            f"criterion {budget.criterion}{_criterion_settings(budget)}",
        )
    )
    fields.append(
        (
            "LoRA",
            f"{budget.lora_parameters:,} parameters = "
            f"{times_flat(budget.lora_parameters, budget.flat_lora_parameters)} flat LoRA at rank {budget.rank} "
            f"({budget.flat_lora_parameters:,})",
        )
    )
    alpha = fisher_map.alpha
    policy = "rsLoRA" if alpha.use_rslora else "alpha/rank constant"
    fields.append(("alpha", f"{alpha.lora_alpha:g} at rank {budget.rank}, {policy}"))
    adapted = _adapted(fisher_map, "candidate modules")
    spread = _spread(_ranks(fisher_map).values())
    if spread:
        adapted += f", ranks {spread[0]}, median {spread[1]}"
    fields.append(("adapted", adapted))
    return fields


def _criterion_settings(budget) -> str:
    from lightning_fisher.allocation.criteria import criterion_named

    try:
        described = criterion_named(budget.criterion).describe_settings(budget)
    except KeyError:
        return ""
    return f": {described}" if described else ""


def _shown_path(path: Union[str, "os.PathLike[str]"]) -> str:
    """A path under the current folder relative to it (a report pasted elsewhere names no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _focus_field(focus: TimestepFocusRecord) -> str:
    text = focus.focus.describe()
    text += ", applied" if focus.applied else ", not applied"
    if focus.observed_range is not None:
        text += f", drew t in {_bounds(focus.observed_range)}"
    return text


def plot_title(fisher_map: MapContent) -> str:
    """Two lines: the model, then the analysis (focus, samples, stop) and the allocation.

    Args:
        fisher_map: the map drawn.
    """
    first = f"{fisher_map.model.class_name}: Fisher score and LoRA rank per module"
    analysis = fisher_map.analysis
    if analysis is None:
        second = "no analysis record"
    else:
        second = f"focus {analysis.timestep_focus.focus.describe()}"
        second += f", {plural(analysis.samples, 'sample')}, {plural(analysis.batches, 'batch')}, {analysis.stop_reason}"
    budget = fisher_map.budget
    ratio = times_flat(budget.lora_parameters, budget.flat_lora_parameters)
    second += f"; {_adapted(fisher_map, 'adapted')}, {ratio} flat rank {budget.rank} parameters"
    return first + "\n" + second


def fit_summary(
    fisher_map: Optional[MapContent],
    application: Optional[MapApplication],
    *,
    ranks: Mapping[str, int],
    trainable_parameters: int,
    adapter_root: Optional[str] = None,
    adapter_label: str = "LoRA",
    map_ignored: bool = False,
    flat: Optional[tuple[int, int]] = None,
) -> str:
    """What a fit injected: the map it followed (or flat ranks) and the adapters in the model.

    Without a map, one line: ``Flat LoRA: 36 modules at rank 8, 331,776 trainable adapter
    parameters``. With one, a ``Fisher map detected: PATH`` line and indented lines for the
    adapted and excluded modules, the rank spread against the map's budget, the trainable
    parameters against flat LoRA, the analysis, and what applying the map left out or replaced.

    Args:
        fisher_map: the map applied, or ``None`` for flat adapters.
        application: how the map was applied (``peft_factory.plan_from_fisher_map``); needed
            with a map.
        ranks: ``{module name: rank}`` of the adapters injected in the model.
        trainable_parameters: their trainable parameters.
        adapter_root: the submodule the adapters were injected into, named when the map has
            modules outside it.
        adapter_label: the adapter type in words (``LoRA``, ``LoHa``, ``LoKr``), for flat adapters.
        map_ignored: a map was found but not applied (``ignore_fisher_map=True``).
        flat: ``(candidates, parameters)`` of flat LoRA at the map's base rank on the model
            being trained (``peft_factory.flat_lora_on``); default the map's own count, made on
            the analysed model, which differs when the map is applied to another model
            (``strict=False``) or only under ``adapter_root``.
    """
    values = sorted(ranks.values())
    if fisher_map is None:
        return (
            f"Flat {adapter_label}: {len(ranks)} modules at rank {values[0] if values else '-'}, "
            f"{trainable_parameters:,} trainable adapter parameters"
            + (" (fisher map ignored: ignore_fisher_map=True)" if map_ignored else "")
        )
    if application is None:
        raise ValueError("fit_summary: a map needs the MapApplication it was applied with")
    budget = fisher_map.budget
    excluded = application.excluded
    candidates = len(application.ranks) + len(excluded)
    listed = ", ".join(excluded[:4]) + (", ..." if len(excluded) > 4 else "")
    spread = _spread(values) or ("-", "-")
    flat_count, flat_parameters = flat if flat is not None else (len(fisher_map.modules), budget.flat_lora_parameters)
    if flat_count == len(fisher_map.modules):
        flat_on = f"all {flat_count} candidates"
    elif adapter_root:
        flat_on = f"the {flat_count} candidates under adapter_root {adapter_root!r}"
    else:
        flat_on = f"{flat_count} of the map's {len(fisher_map.modules)} candidates"
    lines = [
        f"Fisher map detected: {fisher_map.path or '(in memory)'}",
        f"  modules adapted: {len(ranks)} / {candidates} candidates"
        + (f" ({len(excluded)} excluded: {listed})" if excluded else ""),
        f"  ranks: {spread[0]}, median {spread[1]} "
        f"(map: rank {budget.rank}, min {budget.rank_min}, max {budget.rank_max}, mode {budget.mode})",
        f"  trainable adapter parameters: {trainable_parameters:,} = "
        f"{times_flat(trainable_parameters, flat_parameters)} flat rank {budget.rank} on {flat_on} "
        f"({flat_parameters:,})",
    ]
    analysis = fisher_map.analysis
    if analysis is not None:
        lines.append(
            f"  analysis: {plural(analysis.samples, 'sample')} in {plural(analysis.batches, 'batch')}, {analysis.stop_reason}; "
            f"timestep focus {analysis.timestep_focus.focus.describe()}"
        )
    if application.outside_root:
        lines.append(f"  outside adapter_root {adapter_root!r}, not adapted: {', '.join(application.outside_root)}")
    if application.overridden:
        lines.append(
            "  settings replaced by the map: " + ", ".join(f"{k}={v!r}" for k, v in application.overridden.items())
        )
    return "\n".join(lines)


def _rank_text(fisher_map: MapContent, name: str, names: set[str]) -> str:
    if name not in names:
        return "absent"
    rank = _ranks(fisher_map).get(name)
    return "excluded" if rank is None else str(rank)


def rank_changes(old: MapContent, new: MapContent) -> list[str]:
    """``"name OLD->NEW"`` for every module whose rank differs between two maps, in ``new``'s order.

    A rank reads ``excluded`` for a candidate without adapter and ``absent`` for a module that
    is not a candidate of that map.

    Args:
        old: the earlier map.
        new: the later one.
    """
    old_names = {m.name for m in old.modules}
    new_names = [m.name for m in new.modules]
    names = new_names + [m.name for m in old.modules if m.name not in set(new_names)]
    changes = []
    for name in names:
        before = _rank_text(old, name, old_names)
        after = _rank_text(new, name, set(new_names))
        if before != after:
            changes.append(f"{name} {before}->{after}")
    return changes


def replaced_map_note(old: Optional[MapContent], new: MapContent, backup: str, problem: str = "") -> str:
    """One line when ``new`` replaced an earlier map, which was kept as ``backup``.

    ``fisher map replaced: the previous one (created 2026-01-01T10:00:00Z) is kept as
    data/fisher_map.json.bak; ranks changed in 2 of 36 modules: a 4->6, b excluded->2``, with
    ``; criterion trace -> spectrum`` after the backup when the criterion changed.

    Args:
        old: the earlier map, or ``None`` when the file was not a readable map.
        new: the map written now.
        backup: where the earlier file was kept.
        problem: why the earlier file could not be read (with ``old=None``).
    """
    if old is None:
        return f"fisher map replaced: the previous file is kept as {backup} (not a readable fisher map: {problem})"
    head = f"fisher map replaced: the previous one (created {old.created}) is kept as {backup}"
    if old.budget.criterion != new.budget.criterion:
        head += f"; criterion {old.budget.criterion} -> {new.budget.criterion}"
    changes = rank_changes(old, new)
    total = len({m.name for m in old.modules} | {m.name for m in new.modules})
    if not changes:
        return f"{head}; ranks unchanged in all {total} modules"
    listed = ", ".join(changes[:_MAX_CHANGES])
    more = f", ... ({len(changes) - _MAX_CHANGES} more)" if len(changes) > _MAX_CHANGES else ""
    return f"{head}; ranks changed in {len(changes)} of {total} modules: {listed}{more}"
