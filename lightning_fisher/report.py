"""Reading a fisher map: a plain-text report and a heatmap (``lightning-fisher show``).

:func:`format_map_table` renders a :class:`~lightning_fisher.FisherMap` as text: how the map
was made, the rank budget, one row per candidate module grouped by block, and a block x kind
matrix of ranks. :func:`plot_map` draws the same block x kind grid as a PNG heatmap of scores
and ranks. Both read the grid from :func:`map_matrix`.

**Blocks and kinds.** Module names of stacked models repeat one pattern per layer
(``encoder.layer.3.attention.self.query``). :func:`split_module_name` cuts a name after its
last purely numeric dotted component that is not the leaf: the part up to there is the
*block* (``encoder.layer.3``), the rest the *kind* (``attention.self.query``). A name whose
only numeric component is its leaf (``net.0`` in an ``nn.Sequential``) or that has none
(``pooler.dense``) splits into parent path and leaf; a top-level name has block ``"(top)"``.
When some candidates have numbered blocks, the grid holds exactly those and lists the others
(``pooler.dense``, a classifier head) beside it; when none do, the grid is a single row with
one column per module.

This module imports nothing from Lightning; matplotlib is imported only inside
:func:`plot_map`, so text reports work without it.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from lightning_fisher.fisher_map import FisherMap, ModuleRecord

__all__ = ["PLOT_INSTALL_HINT", "TOP_BLOCK", "format_map_table", "map_matrix", "plot_map", "split_module_name"]

#: Block of a top-level module name (one without a dot).
TOP_BLOCK = "(top)"
#: Row label of the grid of a map whose names have no numbered blocks.
ALL_MODULES_BLOCK = "(all modules)"
PLOT_INSTALL_HINT = "plotting needs matplotlib: pip install 'lightning-fisher[plot]'"

_NUMBER = re.compile(r"[0-9]+")
_LABEL_WIDTH = 10  # header field names ("analysis", "LoRA", ...)
_MATRIX_LABEL_MAX = 10  # matrix column labels longer than this are abbreviated
_MISSING = ""  # a grid cell with no module
_EXCLUDED_CELL = "-"


# ---------------------------------------------------------------------------------- names
def split_module_name(name: str) -> tuple[str, str]:
    """Split a module name into ``(block, kind)``.

    The block ends at the last purely numeric dotted component that is not the leaf; the kind
    is the rest. Names without such a component split into parent path and leaf, with block
    :data:`TOP_BLOCK` for a top-level name.

    >>> split_module_name("encoder.layer.3.attention.self.query")
    ('encoder.layer.3', 'attention.self.query')
    >>> split_module_name("model.layers.10.mlp.down_proj")
    ('model.layers.10', 'mlp.down_proj')
    >>> split_module_name("pooler.dense"), split_module_name("head"), split_module_name("net.0")
    (('pooler', 'dense'), ('(top)', 'head'), ('net', '0'))

    Args:
        name: full module name, as in ``model.named_modules()``.
    """
    parts = name.split(".")
    # a numeric leaf names a layer of a Sequential, not a block of kinds: "net.0" is kind "0" of "net"
    numbered = [index for index, part in enumerate(parts[:-1]) if _NUMBER.fullmatch(part)]
    if numbered:
        cut = numbered[-1] + 1
        return ".".join(parts[:cut]), ".".join(parts[cut:])
    if len(parts) == 1:
        return TOP_BLOCK, name
    return ".".join(parts[:-1]), parts[-1]


def _natural_key(text: str) -> tuple:
    # re.split with a group alternates text and digit runs, so equal positions compare equal types
    return tuple(int(chunk) if index % 2 else chunk for index, chunk in enumerate(re.split(r"([0-9]+)", text)))


def _has_numbered_block(name: str) -> bool:
    block, _ = split_module_name(name)
    return bool(_NUMBER.fullmatch(block.rsplit(".", 1)[-1]))


# ---------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class _Grid:
    blocks: list[str]
    kinds: list[str]
    cells: dict[tuple[int, int], ModuleRecord]
    outside: list[ModuleRecord]  # candidates not placed in the grid, in map order


def _grid(fisher_map: FisherMap) -> _Grid:
    numbered = [m for m in fisher_map.modules if _has_numbered_block(m.name)]
    if numbered:
        placed = {m.name: split_module_name(m.name) for m in numbered}
        outside = [m for m in fisher_map.modules if m.name not in placed]
        inside = numbered
    else:
        placed = {m.name: (ALL_MODULES_BLOCK, m.name) for m in fisher_map.modules}
        outside = []
        inside = list(fisher_map.modules)
    blocks = sorted({block for block, _ in placed.values()}, key=_natural_key)
    kinds = list(dict.fromkeys(kind for _, kind in placed.values()))  # first appearance: model order
    row = {block: index for index, block in enumerate(blocks)}
    column = {kind: index for index, kind in enumerate(kinds)}
    cells = {(row[placed[m.name][0]], column[placed[m.name][1]]): m for m in inside}
    return _Grid(blocks, kinds, cells, outside)


def map_matrix(
    fisher_map: FisherMap, field: Literal["score", "rank"] = "score"
) -> tuple[list[str], list[str], list[list[Optional[float]]]]:
    """The block x kind grid of a map: what the summary matrix and the heatmap show.

    Rows are blocks in natural order (``layer.2`` before ``layer.10``), columns kinds in the
    order they first appear in the map. Candidates without a numbered block are left out of
    the grid when others have one (see the module docstring).

    Args:
        fisher_map: the map to lay out.
        field: ``"score"`` (the Fisher score) or ``"rank"`` (the LoRA rank).

    Returns:
        ``(blocks, kinds, values)`` with ``values[i][j]`` the field of module
        ``blocks[i] + "." + kinds[j]``, or ``None`` where there is no such candidate or it is
        excluded.

    Raises:
        ValueError: ``field`` is not ``"score"`` or ``"rank"``.
    """
    if field not in ("score", "rank"):
        raise ValueError(f"field: expected 'score' or 'rank', got {field!r}")
    grid = _grid(fisher_map)
    values: list[list[Optional[float]]] = [[None] * len(grid.kinds) for _ in grid.blocks]
    for (i, j), module in grid.cells.items():
        if not module.excluded:
            values[i][j] = module.rank if field == "rank" else module.score
    return grid.blocks, grid.kinds, values


def _column_labels(kinds: Sequence[str], *, abbreviate: bool) -> list[str]:
    """Shortest dotted suffix of each kind that no other kind ends with; optionally abbreviated.

    Abbreviation keeps the leaf and shortens the components before it to their first letter
    (``attention.output.dense`` -> ``a.o.dense``) when a label is long, unless that collides.
    """
    labels = []
    for kind in kinds:
        parts = kind.split(".")
        for count in range(1, len(parts) + 1):
            label = ".".join(parts[-count:])
            if not any(other != kind and (other == label or other.endswith("." + label)) for other in kinds):
                break
        labels.append(label)
    if not abbreviate:
        return labels
    short = [_abbreviate(label) if len(label) > _MATRIX_LABEL_MAX else label for label in labels]
    return [s if short.count(s) == 1 else label for s, label in zip(short, labels)]


def _abbreviate(label: str) -> str:
    *path, leaf = label.split(".")
    return ".".join([part[:1] for part in path] + [leaf])


# ---------------------------------------------------------------------------------- text
def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(size) for size in shape)


def _score_cell(module: ModuleRecord) -> str:
    stderr = "n/a" if module.score_stderr is None else f"{module.score_stderr:.1e}"
    return f"{module.score:.2e} ± {stderr}"


def _relative(score: float, reference: Optional[float]) -> str:
    if not reference:
        return "n/a"
    ratio = score / reference
    # two decimals hide how far below the exclusion threshold a tiny score is
    return f"x{ratio:.2f}" if ratio >= 0.01 or ratio == 0 else f"x{ratio:.1e}"


def _range(bounds: Optional[Sequence[float]]) -> str:
    return "-" if bounds is None else f"{bounds[0]:g}-{bounds[1]:g}"


def _clip(text: str, width: Optional[int]) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…"


def _shorten_name(name: str, width: int) -> str:
    """Fit a module name into ``width``: abbreviate words from the left, keep numbers and the leaf.

    ``encoder.layer.4.attention.self.value`` -> ``e.l.4.a.self.value``: the layer number and
    the leaf, which tell modules apart, survive longest.
    """
    parts = name.split(".")
    for index in range(len(parts) - 1):
        if len(".".join(parts)) <= width:
            break
        if not _NUMBER.fullmatch(parts[index]):
            parts[index] = parts[index][:1]
    short = ".".join(parts)
    if len(short) <= width:
        return short
    keep = width - 1
    return short[: keep - keep // 2] + "…" + short[len(short) - keep // 2 :]


def _wrap(line: str, width: Optional[int], indent: int) -> list[str]:
    if width is None or len(line) <= width:
        return [line]
    return textwrap.wrap(line, width, subsequent_indent=" " * indent, break_long_words=True, break_on_hyphens=False)


def _header_lines(fisher_map: FisherMap) -> list[str]:
    fields: list[tuple[str, str]] = []
    if fisher_map.path is not None:
        fields.append(("map", str(fisher_map.path)))
    model = fisher_map.model
    fields.append(("model", f"{model.class_name}, {model.num_parameters:,} parameters ({model.fingerprint[:19]}…)"))
    version = fisher_map.versions.get("lightning_fisher")
    fields.append(("created", fisher_map.created + (f" by lightning_fisher {version}" if version else "")))
    if fisher_map.dataset is not None:
        fields.append(("dataset", f"{fisher_map.dataset.path} ({fisher_map.dataset.num_files:,} sample files)"))
    analysis = fisher_map.analysis
    if analysis is not None:
        processes = f", {analysis.world_size} processes" if analysis.world_size > 1 else ""
        fields.append(
            (
                "analysis",
                f"{analysis.score}, {analysis.samples:,} samples in {analysis.batches:,} batches "
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
        focus = analysis.timestep_focus
        focus_text = focus.name
        if focus.range is not None:
            focus_text += f", t in {_range(focus.range)}"
        focus_text += ", applied" if focus.applied else ", not applied"
        if focus.observed_range is not None:
            focus_text += f", drew t in {_range(focus.observed_range)}"
        fields.append(("focus", focus_text))
        run = f"seed {analysis.seed}" if analysis.seed is not None else "no seed"
        if analysis.seconds is not None:
            run += f", {analysis.seconds:.1f} s"
        fields.append(("run", run))
    budget = fisher_map.budget
    fields.append(
        (
            "budget",
            f"rank {budget.rank} (min {budget.rank_min}, max {budget.rank_max}, mode {budget.mode}, "
            f"score power {budget.score_power:g}, exclude below {budget.exclude_threshold:g}x median)",
        )
    )
    flat = budget.flat_lora_parameters
    ratio = "n/a" if flat <= 0 else f"{budget.lora_parameters / flat:.2f}x"
    fields.append(
        (
            "LoRA",
            f"{budget.lora_parameters:,} parameters = {ratio} flat LoRA at rank {budget.rank} "
            f"({budget.flat_lora_parameters:,})",
        )
    )
    alpha = fisher_map.alpha
    policy = "rsLoRA" if alpha.use_rslora else "alpha/rank constant"
    fields.append(("alpha", f"{alpha.lora_alpha:g} at rank {budget.rank}, {policy}"))
    ranks = sorted(fisher_map.ranks.values())
    adapted = f"{len(ranks)}/{len(fisher_map.modules)} candidate modules"
    if ranks:
        adapted += f", ranks {ranks[0]}-{ranks[-1]}, median {_median(ranks):g}"
    fields.append(("adapted", adapted))
    return [f"{label:<{_LABEL_WIDTH}}{value}" for label, value in fields]


def _table_lines(
    fisher_map: FisherMap, sort: str, top: Optional[int], width: Optional[int]
) -> list[str]:
    modules = list(fisher_map.modules)
    reference = _median([m.score for m in modules if m.score > 0])
    grouped = sort == "name"
    if grouped:
        order = {m.name: index for index, m in enumerate(modules)}
        modules.sort(key=lambda m: (_natural_key(split_module_name(m.name)[0]), order[m.name]))
    elif sort == "score":
        modules.sort(key=lambda m: (-m.score, _natural_key(m.name)))
    else:
        modules.sort(key=lambda m: (-(m.rank if m.rank is not None else -1), -m.score, _natural_key(m.name)))
    shown = modules if top is None else modules[:top]

    indent = "  " if grouped else ""
    headers = ["module", "type", "shape", "score ± stderr", "x median", "rank", "alpha"]
    right = [False, False, True, False, True, True, True]
    rows = []
    for m in shown:
        rows.append(
            [
                split_module_name(m.name)[1] if grouped else m.name,
                m.type,
                _shape(m.shape),
                _score_cell(m),
                _relative(m.score, reference),
                "excluded" if m.excluded else str(m.rank),
                "-" if m.alpha is None else f"{m.alpha:g}",
            ]
        )
    widths = [max([len(headers[c])] + [len(r[c]) for r in rows]) for c in range(len(headers))]
    if width is not None:
        rest = sum(widths[1:]) + 2 * (len(headers) - 1) + len(indent)
        widths[0] = max(8, min(widths[0], width - rest))
        for r in rows:
            r[0] = _shorten_name(r[0], widths[0])

    def line(cells: Sequence[str], prefix: str = indent) -> str:
        padded = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(cells, widths, right)]
        return (prefix + "  ".join(padded)).rstrip()

    title = f"modules ({len(shown)} of {len(modules)}" + (f", by {sort}" if not grouped else "") + ")"
    lines = [title, line(headers)]
    block = None
    for m, cells in zip(shown, rows):
        if grouped and split_module_name(m.name)[0] != block:
            block = split_module_name(m.name)[0]
            lines.append(block)
        lines.append(line(cells))
    return lines


def _matrix_lines(fisher_map: FisherMap, width: Optional[int]) -> list[str]:
    grid = _grid(fisher_map)
    if len(grid.blocks) < 2:
        return []  # no block structure: the table already is the whole picture
    blocks, kinds, ranks = map_matrix(fisher_map, "rank")
    labels = _column_labels(kinds, abbreviate=True)
    cells = [
        [
            _MISSING if (i, j) not in grid.cells else _EXCLUDED_CELL if ranks[i][j] is None else str(ranks[i][j])
            for j in range(len(kinds))
        ]
        for i in range(len(blocks))
    ]
    row_width = max(len(block) for block in blocks)
    column_widths = [max([len(labels[j])] + [len(row[j]) for row in cells]) for j in range(len(kinds))]
    # wrap columns into chunks that fit the width, each with the block labels repeated
    chunks: list[list[int]] = [[]]
    used = row_width
    for j, w in enumerate(column_widths):
        if chunks[-1] and width is not None and used + 2 + w > width:
            chunks.append([])
            used = row_width
        chunks[-1].append(j)
        used += 2 + w
    lines = ["ranks by block (- excluded, blank: no such module)"]
    for chunk in chunks:
        lines.append(" " * row_width + "".join("  " + labels[j].rjust(column_widths[j]) for j in chunk))
        for block, row in zip(blocks, cells):
            values = "".join("  " + row[j].rjust(column_widths[j]) for j in chunk)
            lines.append((block.ljust(row_width) + values).rstrip())
    legend = [f"{label} = {kind}" for label, kind in zip(labels, kinds) if not kind.endswith(label)]
    if legend:
        lines.extend(_wrap("columns: " + ", ".join(legend), width, indent=2))
    if grid.outside:
        listed = ", ".join(f"{m.name} {'excluded' if m.excluded else m.rank}" for m in grid.outside)
        lines.extend(_wrap("not in the grid: " + listed, width, indent=2))
    return lines


def format_map_table(
    fisher_map: FisherMap,
    *,
    sort: Literal["name", "score", "rank"] = "name",
    top: Optional[int] = None,
    width: Optional[int] = None,
) -> str:
    """A plain-text report of a fisher map, for a terminal or a log.

    Three parts: a header (the map file, model, dataset, how the analysis ran, the rank budget
    and LoRA parameters against flat LoRA, adapted modules); a table with one row per
    candidate module (kind, type, weight shape, score with its standard error, score relative
    to the median positive score, which the exclusion threshold refers to, rank or
    ``excluded``, alpha); and, when the names have blocks (layers), a block x kind matrix of
    ranks, ``-`` marking excluded modules.

    Args:
        fisher_map: the map to describe.
        sort: ``"name"`` groups the rows by block, blocks in natural order (``layer.2`` before
            ``layer.10``), modules in map order within a block; ``"score"`` and ``"rank"`` list
            full module names ungrouped, highest first (excluded modules last by rank).
        top: keep only the first ``top`` rows of the table, after sorting.
        width: target line width (e.g. the terminal's). Long module names in the table are
            abbreviated (``e.l.4.a.self.value``), header lines wrap, the matrix wraps its
            columns, and what still does not fit is cut. ``None`` leaves lines as long as they
            need to be.

    Returns:
        The report, lines joined with ``"\\n"``, without a trailing newline.

    Raises:
        ValueError: ``sort``, ``top`` or ``width`` is invalid (the message names it).
    """
    if sort not in ("name", "score", "rank"):
        raise ValueError(f"sort: expected 'name', 'score' or 'rank', got {sort!r}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top: expected a positive number of rows or None, got {top!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 20):
        raise ValueError(f"width: expected a line width of at least 20 characters or None, got {width!r}")
    header = [wrapped for line in _header_lines(fisher_map) for wrapped in _wrap(line, width, _LABEL_WIDTH)]
    sections = [header, _table_lines(fisher_map, sort, top, width), _matrix_lines(fisher_map, width)]
    # table and matrix lines fit by construction unless the width is very small: cut those
    return "\n\n".join("\n".join(_clip(line, width) for line in section) for section in sections if section)


# ---------------------------------------------------------------------------------- plot
def _title(fisher_map: FisherMap) -> str:
    first = f"{fisher_map.model.class_name}: Fisher score and LoRA rank per module"
    analysis = fisher_map.analysis
    if analysis is None:
        second = "no analysis record"
    else:
        focus = analysis.timestep_focus
        second = f"focus {focus.name}" + (f" (t in {_range(focus.range)})" if focus.range is not None else "")
        second += f", {analysis.samples:,} samples, {analysis.batches:,} batches, {analysis.stop_reason}"
    ranks = fisher_map.ranks
    budget = fisher_map.budget
    ratio = budget.lora_parameters / max(1, budget.flat_lora_parameters)
    second += f"; {len(ranks)}/{len(fisher_map.modules)} adapted, {ratio:.2f}x flat rank {budget.rank} parameters"
    return first + "\n" + second


def _auto_figsize(grid: _Grid, labels: Sequence[str]) -> tuple[float, float]:
    rows, columns = len(grid.blocks), len(grid.kinds)
    row_label = 0.075 * max(len(block) for block in grid.blocks)
    column_label = 0.06 * max(len(label) for label in labels)
    panel = max(2.5, 0.45 * columns)
    return (
        min(40.0, round(row_label + 2 * panel + 2.5, 1)),
        min(40.0, round(max(2.0, 0.3 * rows) + column_label + 1.6, 1)),
    )


def plot_map(
    fisher_map: FisherMap,
    path: Union[str, os.PathLike],
    *,
    dpi: int = 120,
    figsize: Optional[tuple[float, float]] = None,
) -> Path:
    """Write a PNG heatmap of a map: log10(score) on the left, LoRA rank on the right.

    Rows are blocks in natural order, columns kinds (see :func:`map_matrix`); a map without
    numbered blocks is one row. Excluded modules are grey and hatched in both panels and
    marked ``x`` in the rank panel; cells with no module are blank. The rank colour scale
    spans ``[rank_min, rank_max]`` of the map's budget. Modules outside the grid are listed
    under it. The figure is drawn on matplotlib's Agg canvas without touching pyplot, so it
    never opens a window nor changes the backend of the calling program.

    Args:
        fisher_map: the map to draw.
        path: the ``.png`` file to write; missing parent folders are created. It is written
            through a temporary file in the same folder, so an existing file is replaced
            whole or not at all.
        dpi: pixels per inch.
        figsize: ``(width, height)`` in inches; by default sized to the grid. The image has
            ``width * dpi`` x ``height * dpi`` pixels.

    Returns:
        The file written.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: ``path`` does not end in ``.png``, or ``dpi``/``figsize`` is not positive.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target}: plot_map writes PNG images; give a file name ending in .png")
    if dpi <= 0 or (figsize is not None and min(figsize) <= 0):
        raise ValueError(f"dpi and figsize must be positive, got dpi={dpi!r}, figsize={figsize!r}")
    try:
        import matplotlib  # noqa: F401  (the optional dependency itself: fail here, with the hint)
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as error:
        raise ImportError(PLOT_INSTALL_HINT) from error

    grid = _grid(fisher_map)
    blocks, kinds, scores = map_matrix(fisher_map, "score")
    _, _, ranks = map_matrix(fisher_map, "rank")
    labels = _column_labels(kinds, abbreviate=False)
    log_scores = np.array(
        [[np.nan if s is None or s <= 0 else np.log10(s) for s in row] for row in scores], dtype=float
    )
    rank_values = np.array([[np.nan if r is None else float(r) for r in row] for row in ranks], dtype=float)
    finite = log_scores[np.isfinite(log_scores)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    budget = fisher_map.budget
    rank_norm = Normalize(vmin=budget.rank_min, vmax=max(budget.rank_max, budget.rank_min + 1))
    panels = [
        ("log10(score)", log_scores, "magma", Normalize(vmin=low, vmax=high)),
        ("LoRA rank (x = excluded)", rank_values, "viridis", rank_norm),
    ]

    figure = Figure(figsize=figsize or _auto_figsize(grid, labels), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    excluded = [(i, j) for (i, j), module in grid.cells.items() if module.excluded]
    annotate = len(blocks) * len(kinds) <= 400
    for index, (ax, (name, values, cmap_name, norm)) in enumerate(zip(axes, panels)):
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="white")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for i, j in excluded:
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.82", edgecolor="0.45", hatch="///", linewidth=0)
            )
        if index == 1 and annotate:
            for i, j in excluded:
                ax.text(j, i, "x", ha="center", va="center", fontsize=8, color="0.15")
            for (i, j), module in grid.cells.items():
                if not module.excluded:
                    colour = "white" if norm(module.rank) < 0.55 else "black"  # viridis is dark at the low end
                    ax.text(j, i, str(module.rank), ha="center", va="center", fontsize=7, color=colour)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(kinds)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=8)
        ax.tick_params(length=0)
        figure.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    figure.suptitle(_title(fisher_map), fontsize=10)
    if grid.outside:
        listed = ", ".join(f"{m.name} ({'excluded' if m.excluded else f'rank {m.rank}'})" for m in grid.outside[:6])
        more = f" and {len(grid.outside) - 6} more" if len(grid.outside) > 6 else ""
        figure.supxlabel(f"not in the grid: {listed}{more}", fontsize=8)

    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temporary: Optional[Path] = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            figure.savefig(handle, format="png", dpi=dpi)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
        temporary = None
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    return target
