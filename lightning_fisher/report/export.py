"""A fisher map as data, one record per candidate module: JSON and CSV (``lightning-fisher show --format``).

Every record has the same fields, in this order (:data:`COLUMNS`): ``name``, ``type``,
``shape``, ``score``, ``stderr``, ``rank``, ``alpha``, ``excluded``, ``exclusion_reason`` (why
an excluded module got no adapter, in words), and from a map analysed with the ``spectrum``
criterion ``noise_floor``, ``above_floor`` (directions above it) and ``sigma_sq`` (the recorded
squared singular values; ``null`` / empty for other maps). In JSON, ``shape`` and ``sigma_sq``
are lists and unknown values are ``null``; in CSV, ``shape`` reads ``16x8`` (as in the text
table), ``sigma_sq`` is ``;``-separated, unknown values are empty cells, ``excluded`` is
``true`` / ``false``, and numbers keep full precision (``repr`` of the float). The whole map (budget, analysis, model) is the
map file itself; these are the per-module table for a spreadsheet, pandas or ``jq``.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Literal, Optional

from lightning_fisher.fisher_map.map import FisherMap, ModuleRecord
from lightning_fisher.report.table import sorted_modules

__all__ = ["COLUMNS", "map_csv", "map_json", "module_rows"]

COLUMNS = ("name", "type", "shape", "score", "stderr", "rank", "alpha", "excluded", "exclusion_reason", "noise_floor",
           "above_floor", "sigma_sq")

Sort = Literal["name", "score", "rank"]


def _row(module: ModuleRecord) -> dict[str, Any]:
    return {
        "name": module.name,
        "type": module.type,
        "shape": list(module.shape),
        "score": module.score,
        "stderr": module.score_stderr,
        "rank": module.rank,
        "alpha": module.alpha,
        "excluded": module.excluded,
        "exclusion_reason": module.exclusion_reason,
        "noise_floor": module.noise_floor,
        "above_floor": module.above_floor,
        "sigma_sq": None if module.sigma_sq is None else list(module.sigma_sq),
    }


def module_rows(fisher_map: FisherMap, *, sort: Sort = "name", top: Optional[int] = None) -> list[dict[str, Any]]:
    """One dict per candidate module (keys :data:`COLUMNS`), in ``show``'s row order.

    Args:
        fisher_map: the map.
        sort: row order, as ``show --sort``.
        top: keep only the first ``top`` rows.
    """
    modules = sorted_modules(fisher_map, sort)
    return [_row(m) for m in (modules if top is None else modules[:top])]


def map_json(fisher_map: FisherMap, *, sort: Sort = "name", top: Optional[int] = None) -> str:
    """The rows of :func:`module_rows` as a JSON array (indented, one key per line)."""
    return json.dumps(module_rows(fisher_map, sort=sort, top=top), indent=2, allow_nan=False)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "shape":
        return "x".join(str(size) for size in value)
    if column == "sigma_sq":
        return ";".join(repr(float(v)) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def map_csv(fisher_map: FisherMap, *, sort: Sort = "name", top: Optional[int] = None) -> str:
    """The rows of :func:`module_rows` as CSV with a header line (``\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in module_rows(fisher_map, sort=sort, top=top):
        writer.writerow([_cell(column, row[column]) for column in COLUMNS])
    return buffer.getvalue()
