import dataclasses
import json
import os
from importlib import resources

import jsonschema
import pytest
from _nets import CollidingNet, linear_names
from torch import nn

from lightning_fisher import (
    AllocationSettings,
    FisherMap,
    FisherMapDecodeError,
    FisherMapError,
    FisherMapNotFoundError,
    FisherMapSchemaError,
    FisherMapVersionError,
    FisherMapWriteError,
)
from lightning_fisher.errors import SettingsError
from lightning_fisher.fisher_map import codec as map_codec
from lightning_fisher.fisher_map.map import AnalysisRecord, DatasetRecord, StabilityRecord, TimestepFocusRecord


def colliding_scores(model):
    names = linear_names(model)
    scores = {name: 1.0 + index for index, name in enumerate(names)}
    scores["pooler.dense"] = 0.0  # the loss would not depend on it: excluded
    scores["q"] = 1e-4  # negligible: excluded
    return scores


@pytest.fixture
def model():
    return CollidingNet()


@pytest.fixture
def fisher_map(model):
    analysis = AnalysisRecord(
        score="fisher_trace_per_parameter",
        loss_reduction="mean",
        timestep_focus=TimestepFocusRecord("texture", (0.0, 0.4), True, (0.01, 0.39)),
        batches=7,
        samples=112,
        skipped_samples=3,
        converged=True,
        stop_reason="converged",
        seed=123,
        stability=StabilityRecord("split-half spearman", 0.9, 5, 0.97, 4, 100, (0.5, None, 0.97)),
        world_size=2,
        seconds=1.5,
    )
    scores = colliding_scores(model)
    return FisherMap.from_scores(
        scores,
        model,
        rank=8,
        rank_min=2,
        rank_max=32,
        score_stderr={name: 0.1 * s for name, s in scores.items()},
        analysis=analysis,
        dataset=DatasetRecord("/data/train", "sha256:" + "0" * 64, 112),
    )


def test_from_scores_records_everything(fisher_map, model):
    assert set(fisher_map.scores) == set(linear_names(model))
    assert set(fisher_map.excluded) == {"pooler.dense", "q"}
    assert set(fisher_map.ranks) == set(linear_names(model)) - {"pooler.dense", "q"}
    assert all(2 <= r <= 32 for r in fisher_map.ranks.values())
    # alpha/r constant by default, alpha = 2r at the base rank
    assert all(fisher_map.alphas[name] == 2 * r for name, r in fisher_map.ranks.items())
    record = next(m for m in fisher_map.modules if m.name == "layers.3.dense")
    assert record.shape == (8, 8) and record.rank_cost == 16 and record.type == "Linear"
    assert fisher_map.model.fingerprint.startswith("sha256:")
    costs = {name: 16 for name in linear_names(model)} | {"head": 8 + 3}
    assert fisher_map.rank_costs == costs
    assert fisher_map.budget.lora_parameters == sum(r * costs[name] for name, r in fisher_map.ranks.items())
    assert fisher_map.budget.flat_lora_parameters == 8 * sum(costs.values())
    assert fisher_map.versions["lightning_fisher"] and fisher_map.versions["torch"] and fisher_map.versions["peft"]


def test_round_trip_is_equal_and_file_validates(fisher_map, tmp_path):
    written = fisher_map.save(tmp_path)
    assert written == tmp_path / "fisher_map.json"
    loaded = FisherMap.load(tmp_path)
    assert loaded == fisher_map
    assert loaded.path == written
    schema = json.loads(resources.files("lightning_fisher").joinpath("schema/fisher_map.v2.json").read_text())
    document = json.loads(written.read_text())
    jsonschema.Draft202012Validator(schema).validate(document)
    assert document["schema_version"] == 2
    assert document["budget"]["criterion"] == "trace"
    assert document["analysis"]["timestep_focus"] == {
        "name": "texture", "range": [0.0, 0.4], "applied": True, "observed_range": [0.01, 0.39]
    }
    assert document["budget"]["rank"] == 8 and document["budget"]["mode"] == "median"
    # the PEFT-facing fields are exact keys
    assert document["rank_pattern"]["^layers\\.1\\.q"] == fisher_map.ranks["layers.1.q"]
    assert "^q" not in document["rank_pattern"]


def test_round_trip_without_optional_records(model, tmp_path):
    fmap = FisherMap.from_scores(colliding_scores(model), model, rank=4, rank_min=1, rank_max=8, mode="budget")
    path = fmap.save(tmp_path / "custom_name.json")
    assert path.name == "custom_name.json"
    assert FisherMap.load(path) == fmap


def test_from_scores_rejects_unknown_module(model):
    with pytest.raises(ValueError, match="not modules of CollidingNet"):
        FisherMap.from_scores({"nope.linear": 1.0}, model)


def write_document(tmp_path, document):
    path = tmp_path / "fisher_map.json"
    path.write_text(json.dumps(document))
    return path


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FisherMapNotFoundError) as excinfo:
        FisherMap.load(tmp_path)
    assert str(tmp_path / "fisher_map.json") in str(excinfo.value)
    assert isinstance(excinfo.value, FisherMapError) and isinstance(excinfo.value, FileNotFoundError)


def test_truncated_json_names_file_and_position(fisher_map, tmp_path):
    path = fisher_map.save(tmp_path)
    path.write_text(path.read_text()[:200])
    with pytest.raises(FisherMapDecodeError) as excinfo:
        FisherMap.load(path)
    assert str(path) in str(excinfo.value) and "line" in str(excinfo.value)


@pytest.mark.parametrize(
    "edit, json_path",
    [
        (lambda d: d["modules"][3].__setitem__("rank", "sixteen"), "$.modules[3].rank"),
        (lambda d: d["budget"].__setitem__("mode", "flat"), "$.budget.mode"),
        (lambda d: d.pop("seed_of_nothing", None) or d["analysis"].pop("seed"), "$.analysis"),
        (lambda d: d["modules"][0].__setitem__("score", -1.0), "$.modules[0].score"),
        (lambda d: d.__setitem__("extra", 1), "$"),
        (lambda d: d["model"].__setitem__("fingerprint", "md5:abc"), "$.model.fingerprint"),
    ],
)
def test_schema_violation_names_file_and_field(fisher_map, tmp_path, edit, json_path):
    document = fisher_map.to_dict()
    edit(document)
    path = write_document(tmp_path, document)
    with pytest.raises(FisherMapSchemaError) as excinfo:
        FisherMap.load(path)
    assert excinfo.value.json_path == json_path
    assert str(path) in str(excinfo.value) and json_path in str(excinfo.value)


@pytest.mark.parametrize(
    "edit, json_path",
    [
        # a rank edited alone is the rank's problem (alpha and rank_pattern still agree on the old one)
        (lambda d: d["modules"][2].__setitem__("rank", d["modules"][2]["rank"] + 1), "$.modules[2].rank"),
        (lambda d: d["modules"][2].__setitem__("alpha", d["modules"][2]["alpha"] + 1), "$.modules[2].alpha"),
        (lambda d: d["rank_pattern"].__setitem__("^layers\\.1\\.q", 31), "$.rank_pattern"),
        (lambda d: d.__setitem__("target_modules", "(?:q)"), "$.target_modules"),
        (lambda d: d["modules"][4].__setitem__("name", d["modules"][5]["name"]), "$.modules[5].name"),
        (lambda d: (d["modules"][2].__setitem__("rank", 99), d["modules"][2].__setitem__("alpha", 198.0)), "$.modules[2].rank"),
    ],
)
def test_inconsistent_map_names_field(fisher_map, tmp_path, edit, json_path):
    document = fisher_map.to_dict()
    edit(document)
    path = write_document(tmp_path, document)
    with pytest.raises(FisherMapSchemaError) as excinfo:
        FisherMap.load(path)
    assert excinfo.value.json_path == json_path, str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_a_rank_edited_alone_is_reported_as_the_rank(fisher_map, tmp_path):
    document = fisher_map.to_dict()
    module = document["modules"][2]
    old, module["rank"] = module["rank"], module["rank"] + 1
    path = write_document(tmp_path, document)
    with pytest.raises(FisherMapSchemaError) as excinfo:
        FisherMap.load(path)
    assert str(excinfo.value) == (
        f"{path}: $.modules[2].rank: rank {old + 1} of {module['name']!r} was changed alone: its alpha "
        f"{module['alpha']:g} and $.rank_pattern still give rank {old}. Change a rank with `lightning-fisher "
        "reallocate` (or edit the rank, alpha, rank_pattern, alpha_pattern and budget.lora_parameters together)")


def test_unsupported_version(fisher_map, tmp_path):
    document = fisher_map.to_dict()
    document["schema_version"] = 3
    path = write_document(tmp_path, document)
    with pytest.raises(FisherMapVersionError, match="Upgrade lightning-fisher") as excinfo:
        FisherMap.load(path)
    assert str(path) in str(excinfo.value)


def test_save_validates_before_writing(fisher_map, tmp_path):
    broken = dataclasses.replace(fisher_map, created=20261202)
    with pytest.raises(FisherMapSchemaError, match=r"\$\.created"):
        broken.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_budget_with_a_bad_setting_cannot_be_built(fisher_map):
    # The budget is the allocation settings plus counts: its check runs when it is built, so a
    # map with mode "flat" cannot exist, let alone be saved.
    with pytest.raises(SettingsError, match="mode: must be one of median, budget, got 'flat'") as caught:
        dataclasses.replace(fisher_map.budget, mode="flat")
    assert caught.value.field == "mode"


def test_failure_in_serializer_keeps_previous_map(fisher_map, tmp_path, monkeypatch):
    path = fisher_map.save(tmp_path)
    before = path.read_bytes()

    def exploding_dumps(*args, **kwargs):
        raise RuntimeError("serializer crashed")

    monkeypatch.setattr("lightning_fisher.fisher_map.codec.json.dumps", exploding_dumps)
    with pytest.raises(RuntimeError, match="serializer crashed"):
        fisher_map.save(tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher_map.json"]


def test_failure_mid_write_keeps_previous_map_and_no_temp_file(fisher_map, model, tmp_path, monkeypatch):
    path = fisher_map.save(tmp_path)
    before = path.read_bytes()
    other = FisherMap.from_scores(colliding_scores(model), model, rank=16, rank_min=4, rank_max=64)

    def failing_fsync(fd):  # the new text has been written to the temporary file by now
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(FisherMapWriteError) as excinfo:
        other.save(tmp_path)
    assert str(path) in str(excinfo.value) and "No space left" in str(excinfo.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher_map.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_folder(fisher_map, tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(FisherMapWriteError, match=str(tmp_path)):
            fisher_map.save(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_destination_that_cannot_be_a_folder(fisher_map, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the map folder should be")
    with pytest.raises(FisherMapWriteError, match="not_a_folder"):
        fisher_map.save(blocker / "maps")
    assert blocker.read_text() == "a file where the map folder should be"


def test_a_map_never_gives_a_module_more_rank_than_it_has(tmp_path):
    # the shipped digits config's shape of problem: a 64 x 4 layer among wider ones
    model = nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 64), nn.Linear(64, 64))
    scores = {"0": 10.0, "2": 1.0, "3": 1.0}
    for mode in ("median", "budget"):
        fisher_map = FisherMap.from_scores(scores, model, rank=8, rank_min=2, rank_max=32, mode=mode)
        assert fisher_map.ranks["0"] == 4 and fisher_map.ranks["2"] == 4
        assert fisher_map.budget.lora_parameters == sum(r * fisher_map.rank_costs[n] for n, r in fisher_map.ranks.items())
        assert "2 modules at full size, rank min(d_in, d_out) (0 4, 2 4)" in fisher_map.summary()
    assert fisher_map.ranks["3"] == 12  # budget: what the narrow layers cannot take goes to the wide one
    # reallocating with a huge rank_max cannot get past the limits either
    wide = fisher_map.reallocate(AllocationSettings(rank=200, rank_min=1, rank_max=1000, mode="median"))
    assert {n: r <= min(m.shape) for n, r in wide.ranks.items() for m in wide.modules if m.name == n} == {
        "0": True, "2": True, "3": True}
    assert wide.ranks == {"0": 4, "2": 4, "3": 64}
    written = FisherMap.load(wide.save(tmp_path))
    assert written.ranks == wide.ranks


# --- what mutation testing (benchmarks/mutation.py) found untested -----------------------------



def excluding_everything(d):
    for m in d["modules"]:
        m.update(rank=None, alpha=None, excluded=True, exclusion_reason="test")


@pytest.mark.parametrize(
    "edit, json_path, message",
    [
        (excluding_everything, "$.modules", ": every module is excluded; a map must adapt at least one module"),
        (lambda d: d["budget"].__setitem__("lora_parameters", d["budget"]["lora_parameters"] + 1),
         "$.budget.lora_parameters", "is 2786 but the module ranks give 2785"),
        (lambda d: d.__setitem__("target_modules", "(?:q)"), "$.target_modules",
         ": does not agree with the module records; regenerate the map, or edit the records and this field together"),
        (lambda d: d["rank_pattern"].__setitem__("^layers\\.1\\.q", 31), "$.rank_pattern", "(keys ['^layers\\\\.1\\\\.q'])"),
        (lambda d: d["alpha_pattern"].__setitem__("^extra", 4.0), "$.alpha_pattern", "(keys ['^extra'])"),
        (lambda d: d["modules"][4].__setitem__("name", d["modules"][5]["name"]), "$.modules[5].name",
         "duplicate module name 'layers.1.dense'"),
        (lambda d: (d["modules"][2].__setitem__("rank", 99), d["modules"][2].__setitem__("alpha", 198.0)),
         "$.modules[2].rank",
         "rank 99 of 'layers.0.q' is outside [rank_min, rank_max] = [2, 32]; the module's size min(d_in, d_out) is 8"),
        (lambda d: d["modules"][2].__setitem__("rank", 5), "$.modules[2].rank",
         "rank 5 of 'layers.0.q' was changed alone: its alpha 8 and $.rank_pattern still give rank 4. Change a rank "
         "with `lightning-fisher reallocate` (or edit the rank, alpha, rank_pattern, alpha_pattern and "
         "budget.lora_parameters together)"),
        (lambda d: d["budget"].update(rank_min=40, rank=40), "$.budget.rank_min", "rank_min (40) is greater than rank_max (32)"),
        (lambda d: d["modules"][2].__setitem__("alpha", 9.5), "$.modules[2].alpha",
         "alpha 9.5 of 'layers.0.q' does not follow the alpha policy in $.alpha (expected 8)"),
        (lambda d: d["rank_pattern"].update(dict.fromkeys(["^d", "^c", "^b", "^a"], 4)), "$.rank_pattern",
         "(keys ['^a', '^b', '^c'])"),
    ],
)
def test_an_inconsistent_map_says_what_disagrees(fisher_map, tmp_path, edit, json_path, message):
    document = fisher_map.to_dict()
    edit(document)
    path = write_document(tmp_path, document)
    with pytest.raises(FisherMapSchemaError) as excinfo:
        FisherMap.load(path)
    assert excinfo.value.json_path == json_path, str(excinfo.value)
    assert str(excinfo.value).startswith(f"{path}: {json_path}: ")
    assert str(excinfo.value).endswith(message)  # the whole text, not a word of it


@pytest.mark.parametrize("version", [True, None, "2"])
def test_a_schema_version_that_is_not_an_integer_is_a_schema_error(fisher_map, version):
    # negative cases for the version field itself: a bool is not version 1, a missing one is not the current one
    document = fisher_map.to_dict()
    if version is None:
        del document["schema_version"]
    else:
        document["schema_version"] = version
    with pytest.raises(FisherMapSchemaError) as excinfo:
        map_codec.validate_document(document, None)
    assert str(excinfo.value).startswith("fisher map: $")
    assert "schema_version" in str(excinfo.value)


def test_the_written_file_is_indented_json_and_refuses_nan(fisher_map, tmp_path):
    path = fisher_map.save(tmp_path / "a" / "b")  # missing parents are created
    text = path.read_text()
    assert text.startswith('{\n  "schema_version": 2,\n  "created": ') and text.endswith("}\n")
    document = fisher_map.to_dict()
    document["analysis"]["seconds"] = float("nan")
    with pytest.raises(ValueError):
        map_codec.write_document(document, tmp_path / "nan")
    assert not (tmp_path / "nan" / "fisher_map.json").exists()


def test_save_names_the_file_it_refuses_to_write(fisher_map, tmp_path):
    broken = dataclasses.replace(fisher_map, created=20261202)
    with pytest.raises(FisherMapSchemaError) as excinfo:
        broken.save(tmp_path)
    assert str(excinfo.value).startswith(f"{tmp_path / 'fisher_map.json'}: $.created")


def test_a_folder_named_like_a_json_file_holds_the_map(tmp_path):
    folder = tmp_path / "maps.json"
    folder.mkdir()
    assert map_codec.resolve_map_path(folder) == folder / "fisher_map.json"
    assert map_codec.resolve_map_path(tmp_path / "mine.JSON") == tmp_path / "mine.JSON"


def test_records_keep_what_the_file_says_not_todays_defaults(fisher_map, model, tmp_path):
    document = fisher_map.to_dict()
    document["created"] = "2020-01-02T03:04:05+00:00"
    document["versions"] = dict.fromkeys(document["versions"], "0.0.1")
    document["analysis"]["timestep_focus"].update(range=None, observed_range=None)
    loaded = FisherMap.load(write_document(tmp_path, document))
    assert (loaded.created, loaded.versions) == (document["created"], document["versions"])
    assert (loaded.analysis.timestep_focus.range, loaded.analysis.timestep_focus.observed_range) == (None, None)
    assert FisherMap.from_dict(document).path is None
    at_rank_min = FisherMap.from_scores(colliding_scores(model), model, rank=8, rank_min=3, rank_max=32)
    assert 3 in at_rank_min.ranks.values()
    assert FisherMap.load(at_rank_min.save(tmp_path / "min")).ranks == at_rank_min.ranks


def test_a_map_without_a_focus_range_or_a_duration_writes_none_and_leaves_seconds_out(fisher_map):
    from lightning_fisher.fisher_map.map import TimestepFocusRecord as Focus

    analysis = dataclasses.replace(fisher_map.analysis, timestep_focus=Focus(), seconds=None)
    document = dataclasses.replace(fisher_map, analysis=analysis).to_dict()
    assert (document["analysis"]["timestep_focus"]["range"], document["analysis"]["timestep_focus"]["observed_range"]) == (None, None)
    assert "seconds" not in document["analysis"]


def test_a_stability_record_without_history_reads_as_an_empty_history(fisher_map, tmp_path):
    document = fisher_map.to_dict()
    del document["analysis"]["stability"]["history"]  # optional in the schema (maps written before it existed)
    assert FisherMap.load(write_document(tmp_path, document)).analysis.stability.history == ()


def test_a_rank_out_of_bounds_names_the_module_size_only_when_it_is_the_bound(model, tmp_path):
    narrow_bounds = FisherMap.from_scores(colliding_scores(model), model, rank=4, rank_min=2, rank_max=8)
    document = narrow_bounds.to_dict()
    document["modules"][2].update(rank=99, alpha=198.0)
    with pytest.raises(FisherMapSchemaError) as excinfo:
        FisherMap.load(write_document(tmp_path, document))
    assert str(excinfo.value).endswith("rank 99 of 'layers.0.q' is outside [rank_min, rank_max] = [2, 8]")


@pytest.mark.parametrize("old_rank", [12, 32])  # above the size, up to rank_max itself
def test_a_map_from_before_ranks_were_capped_at_a_modules_size_loads_with_a_warning(fisher_map, tmp_path, old_rank):
    from lightning_fisher.fisher_map.patterns import peft_patterns

    document = fisher_map.to_dict()
    module = document["modules"][2]  # layers.0.q: 8 x 8, so its size is 8 (rank_max 32)
    assert module["name"] == "layers.0.q" and module["rank"] < 8 and fisher_map.budget.rank_max == 32
    module["rank"], module["alpha"] = old_rank, fisher_map.alpha.alpha_for(old_rank, fisher_map.budget.rank)
    ranks = {m["name"]: m["rank"] for m in document["modules"] if m["rank"] is not None}
    document.update(peft_patterns(ranks, {m["name"]: m["alpha"] for m in document["modules"] if m["rank"] is not None}))
    document["budget"]["lora_parameters"] += (old_rank - fisher_map.ranks["layers.0.q"]) * (8 + 8)
    path = write_document(tmp_path, document)
    with pytest.warns(UserWarning, match=r"1 module\(s\) with a rank above their size min\(d_in, d_out\) "
                                         rf"\(layers\.0\.q {old_rank} > 8\): a map written before ranks were capped"):
        loaded = FisherMap.load(path)
    assert loaded.ranks["layers.0.q"] == old_rank  # applies as written: nothing silently changed
    assert loaded.reallocate(loaded.allocation).ranks["layers.0.q"] <= 8  # reallocating caps it


def test_recorded_rank_reads_only_an_integer_from_a_mapping():
    from lightning_fisher.fisher_map.codec import _recorded_rank

    assert _recorded_rank({"rank_pattern": {r"^a\.b": 3}}, "a.b") == 3
    assert _recorded_rank({"rank_pattern": {r"^a\.b": 0}}, "a.b") == 0  # falsy but a number
    for value in (True, 4.0, "4", None):
        assert _recorded_rank({"rank_pattern": {r"^a\.b": value}}, "a.b") is None, value
    assert _recorded_rank({"rank_pattern": [r"^a\.b"]}, "a.b") is None  # not a mapping
    assert _recorded_rank({}, "a.b") is None
    assert _recorded_rank({"rank_pattern": {"^a": 2}}, "a.b") is None


def test_a_map_is_read_as_utf8_whatever_the_locale(fisher_map, tmp_path):
    """A non-ASCII path in a map (saved as UTF-8) reads back under an ASCII locale, as under Windows' cp1252."""
    import subprocess
    import sys
    from pathlib import Path

    import lightning_fisher

    path = fisher_map.save(tmp_path / "fisher_map.json")
    document = json.loads(path.read_text(encoding="utf-8"))
    document["dataset"]["path"] = "/data/Übungen"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    assert FisherMap.load(path).dataset.path == "/data/Übungen"  # here (a UTF-8 locale) ...
    package_root = str(Path(lightning_fisher.__file__).resolve().parents[1])  # the package this test imported
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": package_root}
    code = ("import locale, sys; from lightning_fisher import FisherMap; "
            "print(locale.getpreferredencoding(False), FisherMap.load(sys.argv[1]).dataset.path.encode('unicode_escape'))")
    result = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ANSI_X3.4-1968", r"b'/data/\\xdcbungen'"]  # ... and under ASCII
