"""Blocks and kinds: laying a map's modules out as a block x kind grid.

Module names of stacked models repeat one pattern per layer
(``encoder.layer.3.attention.self.query``). :func:`split_module_name` cuts a name after its
last purely numeric dotted component that is not the leaf: the part up to there is the
*block* (``encoder.layer.3``), the rest the *kind* (``attention.self.query``). A name whose
only numeric component is its leaf (``net.0`` in an ``nn.Sequential``) or that has none
(``pooler.dense``) splits into parent path and leaf; a top-level name has block ``"(top)"``.
When some candidates have numbered blocks, the grid holds exactly those and lists the others
(``pooler.dense``, a classifier head) beside it; when none do, the grid is a single row with
one column per module.

The text matrix (:mod:`lightning_fisher.report.table`) and the heatmap
(:mod:`lightning_fisher.report.plot`) both read this grid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

from lightning_fisher.fisher_map.map import FisherMap, ModuleRecord
from lightning_fisher.data.natural_sort import natural_key

__all__ = [
    "ALL_MODULES_BLOCK",
    "TOP_BLOCK",
    "ModuleGrid",
    "column_labels",
    "is_number",
    "map_matrix",
    "module_grid",
    "split_module_name",
]

#: Block of a top-level module name (one without a dot).
TOP_BLOCK = "(top)"
#: Row label of the grid of a map whose names have no numbered blocks.
ALL_MODULES_BLOCK = "(all modules)"

_NUMBER = re.compile(r"[0-9]+")
_MATRIX_LABEL_MAX = 10  # matrix column labels longer than this are abbreviated


def is_number(component: str) -> bool:
    """Whether a dotted component of a module name is purely numeric (a layer index)."""
    return _NUMBER.fullmatch(component) is not None


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
    numbered = [index for index, part in enumerate(parts[:-1]) if is_number(part)]
    if numbered:
        cut = numbered[-1] + 1
        return ".".join(parts[:cut]), ".".join(parts[cut:])
    if len(parts) == 1:
        return TOP_BLOCK, name
    return ".".join(parts[:-1]), parts[-1]


def _has_numbered_block(name: str) -> bool:
    block, _ = split_module_name(name)
    return is_number(block.rsplit(".", 1)[-1])


@dataclass(frozen=True)
class ModuleGrid:
    """A map's candidates laid out by block (rows) and kind (columns).

    Attributes:
        blocks: row labels, in natural order (``layer.2`` before ``layer.10``).
        kinds: column labels, in the order they first appear in the map (model order).
        cells: ``{(row, column): module}``; a missing key is a cell with no module.
        outside: candidates not placed in the grid, in map order.
    """

    blocks: list[str]
    kinds: list[str]
    cells: dict[tuple[int, int], ModuleRecord]
    outside: list[ModuleRecord]


def module_grid(fisher_map: FisherMap) -> ModuleGrid:
    """The block x kind grid of a map's candidates (see the module docstring for the rule)."""
    numbered = [m for m in fisher_map.modules if _has_numbered_block(m.name)]
    if numbered:
        placed = {m.name: split_module_name(m.name) for m in numbered}
        outside = [m for m in fisher_map.modules if m.name not in placed]
        inside = numbered
    else:
        placed = {m.name: (ALL_MODULES_BLOCK, m.name) for m in fisher_map.modules}
        outside = []
        inside = list(fisher_map.modules)
    blocks = sorted({block for block, _ in placed.values()}, key=natural_key)
    kinds = list(dict.fromkeys(kind for _, kind in placed.values()))  # first appearance: model order
    row = {block: index for index, block in enumerate(blocks)}
    column = {kind: index for index, kind in enumerate(kinds)}
    cells = {(row[placed[m.name][0]], column[placed[m.name][1]]): m for m in inside}
    return ModuleGrid(blocks, kinds, cells, outside)


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
    grid = module_grid(fisher_map)
    values: list[list[Optional[float]]] = [[None] * len(grid.kinds) for _ in grid.blocks]
    for (i, j), module in grid.cells.items():
        if not module.excluded:
            values[i][j] = module.rank if field == "rank" else module.score
    return grid.blocks, grid.kinds, values


def column_labels(kinds: Sequence[str], *, abbreviate: bool) -> list[str]:
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
