"""The text report of a fisher map: header, one row per module, the rank matrix, and its options."""

import re
import statistics

import pytest
from _report_maps import MINILM_BLOCKS, MINILM_KINDS, colliding_map, minilm_map, sections  # noqa: F401 (fixtures)

from lightning_fisher import FisherMap
from lightning_fisher.report import format_map_table, map_matrix


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
    # the net is 8 wide, so the top ranks are cut to 8 (the 3-output head to 3)
    assert [colliding_map.ranks[name] for name in names] == [8, 8, 8]
    assert names == ["layers.11.dense", "layers.11.q", "layers.10.dense"]  # equal ranks: higher score first


def test_top_keeps_grouping(colliding_map):
    _, table, _ = sections(format_map_table(colliding_map, top=4))
    assert table.splitlines() == [
        "modules (4 of 28)",
        "  module  type    shape  score ± stderr  x median  rank  alpha",
        "(top)",
        "  q       Linear    8x8  1.00e+00 ± n/a     x0.07     2      4",
        "  head    Linear    3x8  2.80e+01 ± n/a     x1.93     3      6",
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


def test_spectrum_maps_show_directions_above_the_floor_and_every_exclusion_reason():
    from torch import nn

    from lightning_fisher import AllocationSettings, FisherMap
    from lightning_fisher.analysis.spectrum import ModuleSpectrum

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    names = [str(i) for i in range(6)]
    spectra = {n: ModuleSpectrum(n, (9.0, 4.0, 0.5) if int(n) % 2 else (0.5, 0.4, 0.3), 1.0, 64) for n in names}
    settings = AllocationSettings(rank=2, rank_min=1, rank_max=8, mode="median", criterion="spectrum")
    fisher_map = FisherMap.from_scores({n: 1.0 for n in names}, model, allocation=settings, spectra=spectra)
    text = format_map_table(fisher_map)
    header = next(line for line in text.splitlines() if line.split()[:1] == ["module"])
    assert "above floor" in header
    row = next(line for line in text.splitlines() if line.split()[:1] == ["1"])
    assert row.split()[-3:] == ["2", "2", "4"]  # 2 directions above the floor, rank 2, alpha 4 (2 x rank)
    assert "excluded (3):\n  no direction above the noise floor: 0, 2, 4" in text
