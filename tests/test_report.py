"""The text report and heatmap of a fisher map (``lightning-fisher show``)."""

import ast
import inspect
import re
import statistics
import sys

import pytest
import torch
from _nets import CollidingNet, linear_names
from torch import nn

from lightning_fisher import FisherMap
from lightning_fisher import report
from lightning_fisher.fisher_map import AnalysisRecord, DatasetRecord, StabilityRecord, TimestepFocusRecord
from lightning_fisher.report import PLOT_INSTALL_HINT, format_map_table, map_matrix, plot_map, split_module_name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MINILM_BLOCKS = [f"encoder.layer.{i}" for i in range(6)]
MINILM_KINDS = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


@pytest.fixture(scope="module")
def minilm_map(minilm_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm_path)
    names = linear_names(model)
    generator = torch.Generator().manual_seed(0)
    exponents = torch.rand(len(names), generator=generator) * 2.5 - 5.0  # scores over 2.5 decades
    scores = {name: float(10.0**e) for name, e in zip(names, exponents)}
    scores["pooler.dense"] = 0.0  # the loss does not depend on it: excluded
    stderr = {name: (None if index % 5 == 0 else 0.05 * s) for index, (name, s) in enumerate(scores.items())}
    analysis = AnalysisRecord(
        score="fisher_trace_per_parameter",
        loss_reduction="mean",
        timestep_focus=TimestepFocusRecord("balanced"),
        batches=16,
        samples=512,
        skipped_samples=2,
        converged=True,
        stop_reason="converged",
        seed=7,
        stability=StabilityRecord("split-half spearman", 0.9, 3, 0.95, 4, 100),
        seconds=42.3,
    )
    return FisherMap.from_scores(
        scores,
        model,
        rank=16,
        rank_min=4,
        rank_max=64,
        mode="budget",
        score_stderr=stderr,
        analysis=analysis,
        dataset=DatasetRecord("/data/drug_reviews/train", "sha256:" + "0" * 64, 512),
    )


@pytest.fixture(scope="module")
def colliding_map():
    model = CollidingNet()
    scores = {name: 1.0 + index for index, name in enumerate(linear_names(model))}
    scores["pooler.dense"] = 0.0
    scores["layers.3.q"] = 0.0  # an excluded module inside the grid
    return FisherMap.from_scores(scores, model, rank=8, rank_min=2, rank_max=32)


def sections(text):
    header, table, *rest = text.split("\n\n")
    return header, table, (rest[0] if rest else "")


def table_rows(table):
    """``{full module name: cells}`` from a grouped table (block header lines, indented rows)."""
    rows, block = {}, None
    for line in table.splitlines()[2:]:  # title, column headers
        if line.startswith("  "):
            cells = re.split(r"\s{2,}", line.strip())
            rows[f"{block}.{cells[0]}"] = cells
        else:
            block = line
    return rows


# ---------------------------------------------------------------------------------- names
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


# ---------------------------------------------------------------------------------- table
def test_minilm_table_rows(minilm_map):
    text = format_map_table(minilm_map)
    _, table, _ = sections(text)
    rows = table_rows(table)
    assert set(rows) == set(minilm_map.scores)
    median = statistics.median(s for s in minilm_map.scores.values() if s > 0)  # the exclusion reference
    for module in minilm_map.modules:
        kind, type_, shape, score, relative, rank, alpha = rows[module.name]
        assert type_ == "Linear"
        assert shape == "x".join(map(str, module.shape))
        stderr = "n/a" if module.score_stderr is None else f"{module.score_stderr:.1e}"
        assert score == f"{module.score:.2e} ± {stderr}"
        if module.excluded:
            assert (rank, alpha) == ("excluded", "-")
        else:
            assert int(rank) == minilm_map.ranks[module.name]
            assert float(alpha) == minilm_map.alphas[module.name]
            assert float(relative[1:]) == pytest.approx(module.score / median, abs=0.006)
    assert rows["encoder.layer.0.output.dense"][2] == "384x1536"
    assert rows["pooler.dense"][4] == "x0.00"
    assert [line for line in table.splitlines() if not line.startswith(" ")][1:] == MINILM_BLOCKS + ["pooler"]


def test_minilm_header(minilm_map):
    header, _, _ = sections(format_map_table(minilm_map.with_path("/maps/minilm/fisher_map.json")))
    budget = minilm_map.budget
    ratio = budget.lora_parameters / budget.flat_lora_parameters
    assert budget.lora_parameters > 0 and abs(ratio - 1.0) < 0.05  # budget mode: close to flat
    fields = {line[:10].strip(): line[10:] for line in header.splitlines()}
    assert fields["map"] == "/maps/minilm/fisher_map.json"
    assert fields["model"].startswith(f"BertModel, {minilm_map.model.num_parameters:,} parameters")
    assert fields["dataset"] == "/data/drug_reviews/train (512 sample files)"
    assert "512 samples in 16 batches (2 skipped)" in fields["analysis"]
    assert fields["stopped"].startswith("converged (split-half spearman 0.950, threshold 0.9")
    assert fields["focus"] == "balanced, not applied"
    assert fields["run"] == "seed 7, 42.3 s"
    assert fields["budget"].startswith("rank 16 (min 4, max 64, mode budget")
    assert fields["LoRA"] == (
        f"{budget.lora_parameters:,} parameters = {ratio:.2f}x flat LoRA at rank 16 ({budget.flat_lora_parameters:,})"
    )
    ranks = sorted(minilm_map.ranks.values())
    median = (ranks[17] + ranks[18]) / 2
    assert fields["adapted"] == f"36/37 candidate modules, ranks {ranks[0]}-{ranks[-1]}, median {median:g}"


def test_minilm_matrix(minilm_map):
    blocks, kinds, ranks = map_matrix(minilm_map, "rank")
    assert blocks == MINILM_BLOCKS and kinds == MINILM_KINDS
    assert len(ranks) == 6 and all(len(row) == 6 for row in ranks)
    _, _, matrix = sections(format_map_table(minilm_map))
    lines = matrix.splitlines()
    assert lines[1].split() == ["query", "key", "value", "a.o.dense", "i.dense", "o.dense"]
    for block, line in zip(MINILM_BLOCKS, lines[2:8]):
        expected = [str(minilm_map.ranks[f"{block}.{kind}"]) for kind in MINILM_KINDS]
        assert line.split() == [block] + expected
    assert "a.o.dense = attention.output.dense" in matrix
    assert lines[-1] == "not in the grid: pooler.dense excluded"


def test_matrix_marks_excluded_inside_grid(colliding_map):
    _, _, matrix = sections(format_map_table(colliding_map))
    assert re.search(r"^layers\.3\s+-\s+\d+$", matrix, re.MULTILINE)
    ranks = colliding_map.ranks
    assert matrix.splitlines()[-1] == (
        f"not in the grid: q {ranks['q']}, inner.q {ranks['inner.q']}, pooler.dense excluded, head {ranks['head']}"
    )


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


# ---------------------------------------------------------------------------------- options
def test_sort_by_score_with_top(minilm_map):
    _, table, _ = sections(format_map_table(minilm_map, sort="score", top=5))
    lines = table.splitlines()
    assert lines[0] == "modules (5 of 37, by score)"
    names = [line.split()[0] for line in lines[2:]]
    expected = sorted(minilm_map.scores, key=minilm_map.scores.get, reverse=True)[:5]
    assert names == expected


def test_sort_by_rank(minilm_map, colliding_map):
    _, table, _ = sections(format_map_table(minilm_map, sort="rank"))
    rows = table.splitlines()[2:]
    assert len(rows) == 37
    ranks = [int(re.split(r"\s{2,}", row)[5]) for row in rows[:-1]]
    assert ranks == sorted(minilm_map.ranks.values(), reverse=True)
    assert rows[-1].startswith("pooler.dense") and "excluded" in rows[-1]
    _, table, _ = sections(format_map_table(colliding_map, sort="rank", top=3))
    names = [line.split()[0] for line in table.splitlines()[2:]]
    assert [colliding_map.ranks[name] for name in names] == [11, 11, 11]
    assert names == ["head", "layers.11.dense", "layers.11.q"]  # equal ranks: higher score first


def test_top_keeps_grouping(colliding_map):
    _, table, _ = sections(format_map_table(colliding_map, top=4))
    assert table.splitlines() == [
        "modules (4 of 28)",
        "  module  type    shape  score ± stderr  x median  rank  alpha",
        "(top)",
        "  q       Linear    8x8  1.00e+00 ± n/a     x0.07     2      4",
        "  head    Linear    3x8  2.80e+01 ± n/a     x1.93    11     22",
        "inner",
        "  q       Linear    8x8  2.00e+00 ± n/a     x0.14     3      6",
        "layers.0",
        "  q       Linear    8x8  3.00e+00 ± n/a     x0.21     4      8",
    ]


def test_width_fits_every_line(minilm_map):
    text = format_map_table(minilm_map, sort="score", width=60)
    assert max(len(line) for line in text.splitlines()) <= 60
    _, table, matrix = sections(text)
    assert "e.l." in table  # module names abbreviated, layer numbers kept
    # the 6 matrix columns do not fit in 60 characters: they wrap, block labels repeated
    assert len(re.findall(r"^encoder\.layer\.0\s+\d", matrix, re.MULTILINE)) == 2


@pytest.mark.parametrize("kwargs, field", [({"sort": "size"}, "sort"), ({"top": 0}, "top"), ({"width": 5}, "width")])
def test_invalid_options_name_the_field(colliding_map, kwargs, field):
    with pytest.raises(ValueError, match=field):
        format_map_table(colliding_map, **kwargs)


def test_loaded_map_names_its_file(colliding_map, tmp_path):
    path = colliding_map.save(tmp_path)
    text = format_map_table(FisherMap.load(path))
    assert text.splitlines()[0] == f"map       {path}"


# ---------------------------------------------------------------------------------- plot
def test_plot_writes_png_of_requested_size(minilm_map, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    target = tmp_path / "plots" / "deep" / "minilm.png"
    written = plot_map(minilm_map, target, dpi=50, figsize=(8.0, 4.0))
    assert written == target
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(target)
    assert pixels.shape[:2] == (200, 400)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1]).tolist()}) > 50  # drawn, not blank
    assert [p.name for p in target.parent.iterdir()] == ["minilm.png"]  # no temporary file left


def test_plot_default_size_scales_with_dpi_and_replaces(colliding_map, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    target = tmp_path / "map.png"
    target.write_bytes(b"old")
    plot_map(colliding_map, target, dpi=40)
    small = image.imread(target).shape[:2]
    plot_map(colliding_map, target, dpi=80)
    large = image.imread(target).shape[:2]
    assert large == pytest.approx((2 * small[0], 2 * small[1]), abs=1)
    assert large[0] > 200  # 12 block rows get room
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]


def test_plot_map_without_blocks(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fisher_map = FisherMap.from_scores({"0": 1.0, "2": 3.0}, model, rank=4, rank_min=1, rank_max=8)
    path = plot_map(fisher_map, tmp_path / "mlp.png", dpi=30, figsize=(6, 3))
    assert image.imread(path).shape[:2] == (90, 180)


def test_plot_without_matplotlib(colliding_map, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as excinfo:
        plot_map(colliding_map, tmp_path / "map.png")
    assert str(excinfo.value) == PLOT_INSTALL_HINT == "plotting needs matplotlib: pip install 'lightning-fisher[plot]'"
    assert list(tmp_path.iterdir()) == []


def test_plot_rejects_other_formats(colliding_map, tmp_path):
    with pytest.raises(ValueError, match=r"map\.svg.*\.png"):
        plot_map(colliding_map, tmp_path / "map.svg")


# ---------------------------------------------------------------------------------- imports
def test_report_is_core():
    """Imports only the standard library and the map at module level: no Lightning, no matplotlib.

    ``lightning_fisher.fisher_map`` itself is checked not to load Lightning in test_package.
    """
    tree = ast.parse(inspect.getsource(report))
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    third_party = {name for name in imported if name.split(".")[0] not in sys.stdlib_module_names}
    assert third_party == {"lightning_fisher.fisher_map"}
    plot_imports = {
        node.names[0].name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(next(n for n in tree.body if getattr(n, "name", None) == "plot_map"))
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    assert "matplotlib" in plot_imports
