"""A fisher map as plain text, for a terminal or a log (``lightning-fisher show``).

:func:`format_map_table` renders three parts: a header (how the map was made and what it
allocates, from :func:`lightning_fisher.fisher_map.summary.header_fields`); a table with one row per
candidate module; and, when the names have blocks (layers), a block x kind matrix of ranks
laid out by :mod:`lightning_fisher.report.grid`.
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from typing import Literal, Optional

from lightning_fisher.fisher_map.map import FisherMap, ModuleRecord
from lightning_fisher.fisher_map.summary import header_fields
from lightning_fisher.data.natural_sort import natural_key
from lightning_fisher.report.grid import column_labels, is_number, map_matrix, module_grid, split_module_name

__all__ = ["format_map_table", "sorted_modules"]

_LABEL_WIDTH = 10  # header field names ("analysis", "LoRA", ...)
_MISSING = ""  # a grid cell with no module
_EXCLUDED_CELL = "-"


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
        if not is_number(parts[index]):
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
    return [f"{label:<{_LABEL_WIDTH}}{value}" for label, value in header_fields(fisher_map)]


def sorted_modules(fisher_map: FisherMap, sort: Literal["name", "score", "rank"] = "name") -> list[ModuleRecord]:
    """The map's modules in the order of ``show --sort`` (see :func:`format_map_table`).

    Args:
        fisher_map: the map.
        sort: ``"name"`` (by block, in natural order; map order within a block), ``"score"`` or
            ``"rank"`` (highest first; excluded modules last by rank).
    """
    modules = list(fisher_map.modules)
    if sort == "name":
        order = {m.name: index for index, m in enumerate(modules)}
        modules.sort(key=lambda m: (natural_key(split_module_name(m.name)[0]), order[m.name]))
    elif sort == "score":
        modules.sort(key=lambda m: (-m.score, natural_key(m.name)))
    else:
        modules.sort(key=lambda m: (-(m.rank if m.rank is not None else -1), -m.score, natural_key(m.name)))
    return modules


def _table_lines(
    fisher_map: FisherMap, sort: str, top: Optional[int], width: Optional[int]
) -> list[str]:
    modules = sorted_modules(fisher_map, sort)
    reference = _median([m.score for m in modules if m.score > 0])
    grouped = sort == "name"
    shown = modules if top is None else modules[:top]

    indent = "  " if grouped else ""
    headers = ["module", "type", "shape", "score ± stderr", "x median", "rank", "alpha"]
    right = [False, False, True, False, True, True, True]
    spectra = any(m.sigma_sq is not None for m in modules)
    if spectra:  # how many of the mean gradient's directions clear the module's noise floor
        headers.insert(5, "above floor")
        right.insert(5, True)
    rows = []
    for m in shown:
        cells = [
            split_module_name(m.name)[1] if grouped else m.name,
            m.type,
            _shape(m.shape),
            _score_cell(m),
            _relative(m.score, reference),
            "excluded" if m.excluded else str(m.rank),
            "-" if m.alpha is None else f"{m.alpha:g}",
        ]
        if spectra:
            cells.insert(5, "-" if m.above_floor is None else str(m.above_floor))
        rows.append(cells)
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


def _reason_lines(fisher_map: FisherMap) -> list[str]:
    """Why modules got no adapter: one line a reason, with the count and the first names."""
    by_reason: dict[str, list[str]] = {}
    for m in fisher_map.modules:
        if m.excluded:
            by_reason.setdefault(m.exclusion_reason or "reason not recorded", []).append(m.name)
    lines = [f"excluded ({sum(len(v) for v in by_reason.values())}):"] if by_reason else []
    for reason, names in by_reason.items():
        listed = ", ".join(names[:4]) + (f", and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"  {reason}: {listed}")
    return lines


def _matrix_lines(fisher_map: FisherMap, width: Optional[int]) -> list[str]:
    grid = module_grid(fisher_map)
    if len(grid.blocks) < 2:
        return []  # no block structure: the table already is the whole picture
    blocks, kinds, ranks = map_matrix(fisher_map, "rank")
    labels = column_labels(kinds, abbreviate=True)
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
    ranks, ``-`` marking excluded modules. Maps with spectra get an ``above floor`` column (how
    many directions of the module's mean gradient clear its noise floor); last, the excluded
    modules with the reason they got no adapter.

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
    table = _table_lines(fisher_map, sort, top, width)
    sections = [header, table, _matrix_lines(fisher_map, width), _reason_lines(fisher_map)]
    # table and matrix lines fit by construction unless the width is very small: cut those
    return "\n\n".join("\n".join(_clip(line, width) for line in section) for section in sections if section)
