"""``show --format json|csv``: one record per module, from a real map file, and nothing else on stdout."""

import csv
import io
import json

import pytest
from _nets import CollidingNet, linear_names
from _report_maps import colliding_map  # noqa: F401 (fixture)

from lightning_fisher import AllocationSettings, FisherMap
from lightning_fisher.cli import main
from lightning_fisher.report import map_csv, map_json, module_rows
from lightning_fisher.report.export import COLUMNS
from lightning_fisher.analysis.spectrum import ModuleSpectrum


@pytest.fixture
def map_file(colliding_map, tmp_path):  # noqa: F811
    stderr = {m.name: (None if i % 3 == 0 else m.score / 10) for i, m in enumerate(colliding_map.modules)}
    model_map = FisherMap.from_scores(
        colliding_map.scores, CollidingNet(), rank=8, rank_min=2, rank_max=32, score_stderr=stderr
    )
    return model_map.save(tmp_path / "fisher_map.json")


def test_json_records_are_the_modules(map_file, capsys):
    assert main(["show", str(map_file), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    fisher_map = FisherMap.load(map_file)
    by_name = {m.name: m for m in fisher_map.modules}
    assert len(records) == len(fisher_map.modules) and all(tuple(r) == COLUMNS for r in records)
    for record in records:
        module = by_name[record["name"]]
        assert record == {
            "name": module.name, "type": "Linear", "shape": list(module.shape), "score": module.score,
            "stderr": module.score_stderr, "rank": module.rank, "alpha": module.alpha, "excluded": module.excluded,
            "exclusion_reason": module.exclusion_reason, "noise_floor": None, "above_floor": None, "sigma_sq": None,
        }
    excluded = next(r for r in records if r["name"] == "layers.3.q")
    assert (excluded["rank"], excluded["alpha"], excluded["excluded"], excluded["score"]) == (None, None, True, 0.0)
    assert excluded["exclusion_reason"] == "no gradient reached it on this data (score 0)"


def test_csv_rows_with_sort_and_top(map_file, capsys):
    assert main(["show", str(map_file), "--format", "csv", "--sort", "score", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "name,type,shape,score,stderr,rank,alpha,excluded,exclusion_reason,noise_floor,above_floor,sigma_sq")
    rows = list(csv.DictReader(io.StringIO(out)))
    fisher_map = FisherMap.load(map_file)
    best = sorted(fisher_map.modules, key=lambda m: -m.score)[:3]
    assert [r["name"] for r in rows] == [m.name for m in best]
    for row, module in zip(rows, best):
        assert row["shape"] == "x".join(map(str, module.shape))
        assert float(row["score"]) == module.score  # full precision
        assert row["stderr"] == ("" if module.score_stderr is None else repr(module.score_stderr))
        assert (int(row["rank"]), float(row["alpha"]), row["excluded"]) == (module.rank, module.alpha, "false")


def test_csv_marks_excluded_modules_and_matches_the_function(map_file):
    fisher_map = FisherMap.load(map_file)
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(map_csv(fisher_map)))}
    assert (rows["pooler.dense"]["rank"], rows["pooler.dense"]["alpha"], rows["pooler.dense"]["excluded"]) == (
        "", "", "true")
    assert json.loads(map_json(fisher_map, sort="rank")) == module_rows(fisher_map, sort="rank")


def test_data_formats_keep_stdout_clean_with_a_plot(map_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["show", str(map_file), "--format", "json", "--plot", str(tmp_path / "map.png")]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert captured.err.strip() == f"heatmap written to {tmp_path / 'map.png'}"


def test_a_spectrum_map_exports_its_spectra_floors_and_reasons(tmp_path):
    model = CollidingNet()
    names = linear_names(model)
    spectra = {n: ModuleSpectrum(n, (9.0, 4.0, 0.5) if n.endswith("q") else (0.5, 0.25), 1.0, 64) for n in names}
    settings = AllocationSettings(rank=2, rank_min=1, rank_max=4, mode="budget", criterion="spectrum")
    fisher_map = FisherMap.from_scores({n: 1.0 for n in names}, model, allocation=settings, spectra=spectra)
    records = {r["name"]: r for r in json.loads(map_json(fisher_map))}
    assert (records["q"]["sigma_sq"], records["q"]["noise_floor"], records["q"]["above_floor"]) == ([9.0, 4.0, 0.5], 1.0, 2)
    assert records["pooler.dense"]["above_floor"] == 0 and records["pooler.dense"]["excluded"]
    assert records["pooler.dense"]["exclusion_reason"] == "no direction above the noise floor"
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(map_csv(fisher_map)))}
    assert (rows["q"]["sigma_sq"], rows["q"]["noise_floor"], rows["q"]["above_floor"]) == ("9.0;4.0;0.5", "1.0", "2")
    assert rows["pooler.dense"]["exclusion_reason"] == "no direction above the noise floor"
