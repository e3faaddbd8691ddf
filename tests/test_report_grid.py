"""The block x kind grid of a map: names split into blocks and kinds, blocks in natural order."""

import re

import pytest
from _report_maps import MINILM_BLOCKS, MINILM_KINDS, colliding_map, minilm_map, sections  # noqa: F401 (fixtures)
from torch import nn

from lightning_fisher import FisherMap
from lightning_fisher.report import format_map_table, map_matrix, split_module_name
from lightning_fisher.report.grid import column_labels


@pytest.mark.parametrize(
    "name, expected",
    [
        ("encoder.layer.3.attention.self.query", ("encoder.layer.3", "attention.self.query")),
        ("model.layers.10.mlp.down_proj", ("model.layers.10", "mlp.down_proj")),
        ("layers.1.q", ("layers.1", "q")),
        ("layers.10.q", ("layers.10", "q")),
        ("down_blocks.0.attentions.1.proj_in", ("down_blocks.0.attentions.1", "proj_in")),
        ("layers.3.ff.0", ("layers.3", "ff.0")),  # a numeric leaf does not end the block
        ("net.0", ("net", "0")),
        ("pooler.dense", ("pooler", "dense")),
        ("bert.pooler.dense", ("bert.pooler", "dense")),
        ("head", ("(top)", "head")),
        ("layer2.fc", ("layer2", "fc")),  # only purely numeric components count
    ],
)
def test_split_module_name(name, expected):
    assert split_module_name(name) == expected


def test_blocks_in_natural_order(colliding_map):
    blocks, kinds, ranks = map_matrix(colliding_map, "rank")
    assert blocks == [f"layers.{i}" for i in range(12)]  # layers.2 before layers.10
    assert kinds == ["q", "dense"]
    text = format_map_table(colliding_map)
    _, table, _ = sections(text)
    lines = table.splitlines()
    assert lines.index("layers.2") < lines.index("layers.10") < lines.index("layers.11")
    # names without a numbered block stay in the table, grouped by parent
    assert lines.index("(top)") < lines.index("inner") < lines.index("layers.0") and lines[-2] == "pooler"


def test_map_matrix_values(minilm_map, colliding_map):
    for fisher_map in (minilm_map, colliding_map):
        blocks, kinds, ranks = map_matrix(fisher_map, "rank")
        _, _, scores = map_matrix(fisher_map, "score")
        in_grid = {}
        for i, block in enumerate(blocks):
            for j, kind in enumerate(kinds):
                name = f"{block}.{kind}"
                if ranks[i][j] is not None:
                    in_grid[name] = ranks[i][j]
                    assert scores[i][j] == fisher_map.scores[name]
                else:
                    assert scores[i][j] is None
        structured = {n: r for n, r in fisher_map.ranks.items() if re.search(r"\.[0-9]+\.", n)}
        assert in_grid == structured
    assert map_matrix(minilm_map, "rank")[2][0][0] == minilm_map.ranks["encoder.layer.0.attention.self.query"]
    assert set(minilm_map.ranks) == {f"{b}.{k}" for b in MINILM_BLOCKS for k in MINILM_KINDS}
    assert map_matrix(colliding_map, "rank")[2][3][0] is None  # layers.3.q is excluded
    with pytest.raises(ValueError, match="field"):
        map_matrix(minilm_map, "alpha")


def test_map_without_blocks_is_one_row():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fisher_map = FisherMap.from_scores({"0": 1.0, "2": 3.0}, model, rank=4, rank_min=1, rank_max=8)
    blocks, kinds, ranks = map_matrix(fisher_map, "rank")
    assert blocks == ["(all modules)"] and kinds == ["0", "2"]
    assert ranks == [[fisher_map.ranks["0"], fisher_map.ranks["2"]]]
    text = format_map_table(fisher_map)
    assert len(text.split("\n\n")) == 2  # header and table; no matrix for a single row


def test_column_labels_are_the_shortest_distinct_suffixes():
    kinds = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    full = ["query", "attention.output.dense", "intermediate.dense", "output.dense"]  # "dense" alone is ambiguous
    assert column_labels(kinds, abbreviate=False) == full
    assert column_labels(kinds, abbreviate=True) == ["query", "a.o.dense", "i.dense", "o.dense"]
    assert column_labels(["a.long_name_x", "b.long_name_x"], abbreviate=True) == ["a.long_name_x", "b.long_name_x"]
