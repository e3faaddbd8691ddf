"""Reading maps of every schema version, re-allocating a stored map, and the spectrum records."""

import dataclasses
import json
import warnings
import shutil
from pathlib import Path

import peft
import pytest
from _nets import CollidingNet, linear_names

from lightning_fisher import AllocationSettings, FisherMap, lora_config_from_fisher_map, verify_adapter_ranks
from lightning_fisher.analysis.spectrum import ModuleSpectrum
from lightning_fisher.allocation.spectrum_rule import NO_DIRECTION

V1_MAP = Path(__file__).parent / "data" / "fisher_map_v1.json"


def test_a_stored_version_1_map_loads_as_a_trace_map_and_applies(tmp_path):
    fisher_map = FisherMap.load(V1_MAP)
    assert fisher_map.budget.criterion == "trace"
    assert fisher_map.allocation == AllocationSettings(rank=4, rank_min=1, rank_max=16, mode="budget",
                                                       exclude_threshold=0.2)
    assert all(m.sigma_sq is None and m.noise_floor is None for m in fisher_map.modules)
    assert fisher_map.excluded == ["q", "layers.3.q", "layers.4.dense", "layers.8.dense", "layers.10.q"]
    assert all("predates" in m.exclusion_reason for m in fisher_map.modules if m.excluded)
    model = peft.get_peft_model(CollidingNet(), lora_config_from_fisher_map(fisher_map))
    verify_adapter_ranks(model, fisher_map)
    # saved again, it becomes a version 2 map with the same content
    again = FisherMap.load(fisher_map.save(tmp_path))
    assert json.loads((tmp_path / "fisher_map.json").read_text())["schema_version"] == 2
    assert again.ranks == fisher_map.ranks and again.alphas == fisher_map.alphas


def _scored_map(**settings):
    model = CollidingNet()
    names = linear_names(model)
    scores = {n: float((i * 7) % 11) / 10 for i, n in enumerate(names)}
    return FisherMap.from_scores(scores, model, allocation=AllocationSettings(**settings)), model


def test_reallocate_equals_a_fresh_allocation_of_the_same_scores():
    fisher_map, model = _scored_map(rank=4, rank_min=1, rank_max=16, mode="budget")
    settings = AllocationSettings(rank=2, rank_min=1, rank_max=8, mode="budget", score_power=1.0)
    again = fisher_map.reallocate(settings)
    fresh = FisherMap.from_scores(fisher_map.scores, model, allocation=settings,
                                  lora_alpha=fisher_map.alpha.alpha_for(2, 4))
    assert again.ranks == fresh.ranks and again.alphas == fresh.alphas
    assert again.budget == fresh.budget
    assert again.analysis == fisher_map.analysis and again.model == fisher_map.model
    assert again.path is None
    # alpha/rank is kept: the scaling of every module is the map's
    assert {n: a / again.ranks[n] for n, a in again.alphas.items()} == pytest.approx(
        {n: fisher_map.alpha.lora_alpha / 4 for n in again.ranks})


def test_trace_exclusions_say_why():
    fisher_map, _ = _scored_map(rank=4, rank_min=1, rank_max=16, exclude_threshold=0.2)
    reasons = {m.name: m.exclusion_reason for m in fisher_map.modules if m.excluded}
    assert reasons["q"] == "no gradient reached it on this data (score 0)"  # score 0.0
    assert reasons["layers.3.q"].startswith("score below exclude_threshold (0.2)")
    assert all(m.exclusion_reason is None for m in fisher_map.modules if not m.excluded)


def _spectra(names, signal):
    """A rank-2 signal on the modules in ``signal``, pure noise (below the floor) elsewhere."""
    return {n: ModuleSpectrum(n, (9.0, 4.0, 0.5, 0.4) if n in signal else (0.5, 0.4, 0.3, 0.2), 1.0, 64)
            for n in names}


def test_spectrum_criterion_allocates_from_the_spectra_and_records_them(tmp_path):
    model = CollidingNet()
    names = linear_names(model)
    spectra = _spectra(names, signal={"layers.0.q", "layers.5.dense", "head"})
    settings = AllocationSettings(rank=1, rank_min=1, rank_max=4, mode="budget", criterion="spectrum")
    fisher_map = FisherMap.from_scores({n: 1.0 for n in names}, model, allocation=settings, spectra=spectra)
    # budget mode: the two directions above the floor first, then (budget left) the recorded ones
    # below it, on adapted modules only; the noise-only modules stay without an adapter
    # (the 8 x 3 head stops at its size, 3, though the made-up spectrum has a 4th value)
    assert fisher_map.ranks == {"layers.0.q": 4, "layers.5.dense": 4, "head": 3}
    median = fisher_map.reallocate(dataclasses.replace(settings, mode="median", rank=2))
    # median mode stops once half the adapted modules reach rank 2; head (cheapest) goes first
    assert median.ranks == {"layers.0.q": 2, "layers.5.dense": 1, "head": 2}
    noise = [m for m in fisher_map.modules if m.name not in fisher_map.ranks]
    assert {m.exclusion_reason for m in noise} == {NO_DIRECTION}
    assert fisher_map.budget.criterion == "spectrum"
    loaded = FisherMap.load(fisher_map.save(tmp_path))
    assert loaded == fisher_map
    assert loaded.modules[0].sigma_sq == spectra[names[0]].sigma_sq and loaded.modules[0].noise_floor == 1.0
    # back to the trace criterion without a new analysis, and to spectrum again
    trace = loaded.reallocate(dataclasses.replace(settings, criterion="trace"))
    assert trace.budget.criterion == "trace" and len(trace.ranks) > 3
    assert trace.reallocate(settings).ranks == fisher_map.ranks


def test_spectrum_criterion_needs_spectra():
    fisher_map, _ = _scored_map(rank=4, rank_min=1, rank_max=16)
    with pytest.raises(ValueError, match=r"criterion 'spectrum': 28 module\(s\) have no recorded spectrum.*--criterion spectrum"):
        fisher_map.reallocate(dataclasses.replace(fisher_map.allocation, criterion="spectrum"))


def test_a_hand_edited_version_1_map_is_still_checked(tmp_path):
    document = json.loads(V1_MAP.read_text())
    document["modules"][1]["rank"] = 99
    path = tmp_path / "fisher_map.json"
    path.write_text(json.dumps(document))
    with pytest.raises(Exception, match=r"\$\.modules\[1\]\.rank"):
        FisherMap.load(path)
    shutil.rmtree(tmp_path)


def test_spectra_all_below_their_floors_are_a_clear_error():
    model = CollidingNet()
    names = linear_names(model)
    settings = AllocationSettings(rank=1, rank_min=1, rank_max=4, mode="budget", criterion="spectrum")
    with pytest.raises(ValueError, match="no module has a direction above its noise floor.*analyse more samples"):
        FisherMap.from_scores({n: 1.0 for n in names}, model, allocation=settings, spectra=_spectra(names, signal=()))


def test_reallocating_past_the_stored_spectrum_warns_with_the_budget_reached():
    model = CollidingNet()  # 8-wide layers: a module could take rank 8
    names = linear_names(model)
    spectra = {n: ModuleSpectrum(n, (9.0, 8.0, 7.0, 6.0), 1.0, 64) for n in names}  # stored by a rank_max-4 analysis
    settings = AllocationSettings(rank=2, rank_min=1, rank_max=4, mode="budget", criterion="spectrum")
    fisher_map = FisherMap.from_scores({n: 1.0 for n in names}, model, allocation=settings, spectra=spectra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the stored values: no warning
        fisher_map.reallocate(dataclasses.replace(settings, rank=3))
    with pytest.warns(UserWarning) as caught:
        wide = fisher_map.reallocate(dataclasses.replace(settings, rank=6, rank_max=8))
    budget = 6 * sum(fisher_map.rank_costs.values())
    reached = wide.budget.lora_parameters
    assert wide.ranks == {n: 3 if n == "head" else 4 for n in names} and reached < budget  # the head is 8 x 3
    assert str(caught[0].message) == (
        f"criterion 'spectrum': the map stores 4 singular values per module (its analysis' rank_max), so "
        f"{len(names) - 1} module(s) stop at 4 below rank_max 8 (e.g. q, inner.q, layers.0.q); the budget reaches "
        f"{reached:,} of {budget:,} parameters ({reached / budget:.2f}x). Analyse again with --rank-max 8 to "
        "allocate beyond the stored values"
    )
