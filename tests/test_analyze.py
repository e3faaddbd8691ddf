"""``analyze()`` writing the map: an earlier map at the destination is kept as ``.bak`` and the change reported."""

import json
import logging

import pytest
from _tasks import Task, classification_data
from torch import nn

from lightning_fisher import FisherMap, analyze
from lightning_fisher.fisher_map.summary import rank_changes, replaced_map_note

QUIET = dict(enable_progress_bar=False, accelerator="cpu", devices=1)
SETTINGS = dict(convergence_patience=2, min_batches=2, stability_threshold=0.0, trainer_kwargs=QUIET)


def new_task():
    """Three linear layers, ``layers.0`` / ``.2`` / ``.4``, the same weights each time."""
    return Task(lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)),
                attribute="layers")


def data():
    return classification_data(64, 6)


@pytest.fixture
def messages(caplog):
    caplog.set_level(logging.INFO)
    return lambda: caplog.messages


def test_a_new_analysis_keeps_the_previous_map_as_bak(tmp_path, messages):
    first = analyze(new_task(), data(), output=tmp_path, rank=4, rank_min=1, rank_max=16, **SETTINGS)
    assert not (tmp_path / "fisher_map.json.bak").exists()
    first_text = (tmp_path / "fisher_map.json").read_text()
    second = analyze(new_task(), data(), output=tmp_path, rank=8, rank_min=8, rank_max=8, **SETTINGS)
    assert (tmp_path / "fisher_map.json.bak").read_text() == first_text  # byte for byte
    # rank 8 everywhere, cut to the size of the 6-input and 4-output layers
    assert FisherMap.load(tmp_path / "fisher_map.json").ranks == second.ranks == {
        "layers.0": 6, "layers.2": 8, "layers.4": 4}
    changed = [f"{name} {first.ranks[name]}->{r}" for name, r in second.ranks.items() if first.ranks[name] != r]
    assert changed  # the first map's ranks were not all 8
    note = [m for m in messages() if m.startswith("fisher map replaced")]
    assert note == [
        f"fisher map replaced: the previous one (created {first.created}) is kept as "
        f"{tmp_path / 'fisher_map.json.bak'}; ranks changed in {len(changed)} of 3 modules: {', '.join(changed)}"
    ]
    # the third run keeps the second map: one backup, the latest previous map
    analyze(new_task(), data(), output=tmp_path / "fisher_map.json", rank=8, rank_min=8, rank_max=8, **SETTINGS)
    assert json.loads((tmp_path / "fisher_map.json.bak").read_text())["created"] == second.created
    assert messages()[-1].endswith("; ranks unchanged in all 3 modules")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher_map.json", "fisher_map.json.bak"]


def test_an_unreadable_previous_file_is_kept_too(tmp_path, messages):
    (tmp_path / "fisher_map.json").write_text("{ truncated")
    analyze(new_task(), data(), output=tmp_path, rank=4, rank_min=1, rank_max=16, **SETTINGS)
    assert (tmp_path / "fisher_map.json.bak").read_text() == "{ truncated"
    assert FisherMap.load(tmp_path).budget.rank == 4
    assert [m for m in messages() if m.startswith("fisher map replaced")] == [
        f"fisher map replaced: the previous file is kept as {tmp_path / 'fisher_map.json.bak'} (not a readable "
        "fisher map: Expecting property name enclosed in double quotes: line 1 column 3 (char 2))"
    ]


def test_rank_changes_name_excluded_and_absent_modules(tmp_path):
    first = analyze(new_task(), data(), rank=4, rank_min=1, rank_max=16, **SETTINGS)
    second = analyze(new_task(), data(), rank=4, rank_min=1, rank_max=16, exclude=["layers.4"], **SETTINGS)
    assert [c for c in rank_changes(first, second) if c.startswith("layers.4")] == [
        f"layers.4 {first.ranks['layers.4']}->absent"]
    assert replaced_map_note(first, first, "x.bak").endswith("ranks unchanged in all 3 modules")


def test_the_replaced_note_says_when_the_criterion_changed():
    trace = analyze(new_task(), data(), rank=4, rank_min=1, rank_max=16, **SETTINGS)
    spectrum = analyze(new_task(), data(), rank=4, rank_min=1, rank_max=16, criterion="spectrum", rank_mode="budget",
                       **{**SETTINGS, "max_batches": 8})
    note = replaced_map_note(trace, spectrum, "x.bak")
    assert note.startswith(f"fisher map replaced: the previous one (created {trace.created}) is kept as x.bak; "
                           "criterion trace -> spectrum; ranks ")
    assert "criterion" not in replaced_map_note(trace, trace, "x.bak")
