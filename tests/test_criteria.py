"""The criterion registry: built-ins by name, a third criterion registered end to end, no name checks elsewhere."""

import ast
import warnings
import dataclasses
from pathlib import Path

import pytest
import torch
from _tasks import Task, classification_data
from torch import nn

import lightning_fisher
from lightning_fisher import AllocationSettings, FisherMap, FisherMapSchemaError, SettingsError, analyze
from lightning_fisher.analysis.accumulator import FisherAccumulator
from lightning_fisher.allocation.criteria import (
    STOPPING_METHODS,
    Criterion,
    CriterionAllocation,
    criterion_for_stopping_method,
    criterion_named,
    criterion_names,
    rank_agreement,
    register_criterion,
    registry,
    unregister_criterion,
)
from lightning_fisher.allocation.criteria.spectrum import spectrum_split_half_correlation
from lightning_fisher.allocation.criteria.trace import split_half_correlation
from lightning_fisher.fisher_map.records import ModuleRecord
from lightning_fisher.fisher_map.summary import header_fields, stop_line
from tests.test_spectrum_stopping import COSTS, SETTINGS as SPECTRUM_SETTINGS, pair

QUIET = dict(enable_progress_bar=False, logger=False, accelerator="cpu", devices=1)


def new_task():
    """Four linear layers, ``layers.0`` / ``.2`` / ``.4`` / ``.6``, the same weights each time."""
    return Task(lambda: nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)
    ), attribute="layers")


def data():
    return classification_data(96, 6)


class SampleCounts:
    """A criterion's own statistics: samples each module's hooks saw (fed by the collector's observer)."""

    def __init__(self, names):
        self.names = list(names)
        self.counts = torch.zeros(len(self.names), dtype=torch.float64)

    def observe(self, name, a, g):
        self.counts[self.names.index(name)] += a.shape[0]

    def state_tensor(self, device=None):
        return self.counts.clone() if device is None else self.counts.to(device)

    def load_state_tensor(self, state):
        self.counts = state.to(torch.float64).clone()


class TopHalf(Criterion):
    """A toy third criterion: modules scoring at least the median score get the base rank, the rest none."""

    name = "top-half"
    help = "modules at or above the median score get the base rank"
    stopping_method = "split-half spearman over all modules (top half)"
    correlation_of = "the halves' module scores, top half"

    def __init__(self):
        self.gathered = []

    def statistics(self, candidates, settings, *, seed, loss_reduction):
        self.gathered.append(SampleCounts(candidates))
        return self.gathered[-1]

    def split_half_correlation(self, accumulator, statistics, settings, reduce):
        assert statistics is self.gathered[-1]
        return split_half_correlation(accumulator)

    def allocate(self, records, settings):
        scores = sorted(m.score for m in records)
        median = scores[(len(scores) - 1) // 2]
        ranks = {m.name: settings.rank for m in records if m.score >= median}
        excluded = {m.name: "below the median score" for m in records if m.name not in ranks}
        return CriterionAllocation(ranks, excluded)


@pytest.fixture
def top_half():
    criterion = register_criterion(TopHalf())
    yield criterion
    unregister_criterion(criterion.name)


def test_the_built_in_criteria_are_found_by_name_and_by_stopping_method():
    assert criterion_names()[:2] == ("trace", "spectrum")
    for name in ("trace", "spectrum"):
        criterion = criterion_named(name)
        assert criterion.name == name and STOPPING_METHODS[name] == criterion.stopping_method
        assert criterion_for_stopping_method(criterion.stopping_method) is criterion
    assert STOPPING_METHODS["trace"] == "split-half spearman over all modules"  # as recorded in every map so far
    with pytest.raises(KeyError, match="'nope' is not registered; registered: trace, spectrum"):
        criterion_named("nope")
    with pytest.raises(SettingsError, match="criterion: must be one of trace, spectrum, got 'nope'.*register_criterion"):
        AllocationSettings(criterion="nope")


def test_a_criterion_is_registered_once_with_its_own_stopping_method(top_half):
    with pytest.raises(ValueError, match="named 'top-half' is registered already"):
        register_criterion(TopHalf())
    clash = type("Clash", (TopHalf,), {"name": "clash", "stopping_method": STOPPING_METHODS["trace"]})
    with pytest.raises(ValueError, match="is 'trace''s; give the new criterion's stopping rule its own name"):
        register_criterion(clash())
    with pytest.raises(TypeError, match="expected a Criterion"):
        register_criterion(object())
    with pytest.raises(ValueError, match="built in"):
        unregister_criterion("trace")
    assert "clash" not in criterion_names() and criterion_names()[-1] == "top-half"


def test_a_third_criterion_runs_end_to_end(top_half, tmp_path):
    settings = AllocationSettings(criterion="top-half", rank=4, rank_min=1, rank_max=8, mode="budget")
    fisher_map = analyze(
        new_task(), data(), output=tmp_path, allocation=settings, convergence_patience=2, min_batches=3,
        stability_threshold=0.0, trainer_kwargs=QUIET,
    )
    # gathered its own statistics through the collector's observer, from every analysed sample
    counts = top_half.gathered[-1].counts
    assert counts.tolist() == [float(fisher_map.analysis.samples)] * 4 and fisher_map.analysis.samples >= 24
    # allocated by its own rule from the measured scores
    scores = fisher_map.scores
    median = sorted(scores.values())[1]
    assert fisher_map.ranks == {name: 4 for name, score in scores.items() if score >= median}
    assert {m.name: m.exclusion_reason for m in fisher_map.modules if m.excluded} == {
        name: "below the median score" for name, score in scores.items() if score < median
    }
    # stopped by its own rule, recorded and described as such
    assert fisher_map.analysis.stability.method == "split-half spearman over all modules (top half)"
    assert "(of the halves' module scores, top half)" in stop_line(fisher_map)
    # written, read back and described with its name
    loaded = FisherMap.load(tmp_path)
    assert loaded.budget.criterion == "top-half" and loaded.ranks == fisher_map.ranks
    assert dict(header_fields(loaded))["budget"] == "rank 4 (min 1, max 8, mode budget), criterion top-half"
    # reallocated by another criterion from the same map, and back
    trace = loaded.reallocate(dataclasses.replace(loaded.allocation, criterion="trace"))
    assert trace.budget.criterion == "trace" and len(trace.ranks) >= 3
    assert trace.reallocate(loaded.allocation).ranks == loaded.ranks
    # a process that does not know the criterion refuses the map, naming the field
    unregister_criterion("top-half")
    with pytest.raises(FisherMapSchemaError, match=r"\$\.budget\.criterion: .*'top-half'.*register_criterion"):
        FisherMap.load(tmp_path)
    register_criterion(top_half)


def test_analyze_takes_the_criterion_like_every_other_allocation_option():
    fisher_map = analyze(
        new_task(), data(), criterion="spectrum", rank=4, rank_min=1, rank_max=8, rank_mode="budget",
        convergence_patience=2, min_batches=3, max_batches=6, stability_threshold=0.0, trainer_kwargs=QUIET,
    )
    assert fisher_map.budget.criterion == "spectrum" and fisher_map.spectra
    assert fisher_map.analysis.stability.method == STOPPING_METHODS["spectrum"]


def _criterion_name_comparisons(path: Path) -> list[str]:
    """``x == "trace"``-like comparisons (and ``in`` tests) against a built-in criterion's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            constants = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Constant)]
            constants += [e for n in node.comparators if isinstance(n, (ast.Tuple, ast.List, ast.Set)) for e in n.elts
                          if isinstance(e, ast.Constant)]
            if any(c.value in ("trace", "spectrum") for c in constants):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_only_the_criteria_modules_compare_criterion_names():
    package = Path(lightning_fisher.__file__).parent
    outside = [hit for path in sorted(package.rglob("*.py")) if "criteria" not in path.parts
               for hit in _criterion_name_comparisons(path)]
    assert len(outside) <= 1, outside


# --- what mutation testing (benchmarks/mutation.py) found untested -----------------------------



def halves_fed(first, second):
    """An accumulator whose half 0 holds ``first`` and half 1 ``second`` (one sample each)."""
    acc = FisherAccumulator([f"m{i}" for i in range(len(first))])
    acc.update(torch.tensor([first, second], dtype=torch.float64).T)
    return acc


def test_trace_split_half_with_three_modules_is_a_correlation_not_trivially_one():
    assert split_half_correlation(halves_fed([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])) == pytest.approx(-1.0, abs=1e-5)
    assert split_half_correlation(halves_fed([1.0, 2.0], [2.0, 1.0])) == 1.0  # two modules: trivially


@pytest.mark.parametrize("first, second", [([2.0, 2.0, 2.0], [1.0, 3.0, 5.0]), ([1.0, 3.0, 5.0], [2.0, 2.0, 2.0])])
def test_trace_split_half_is_undefined_while_either_half_alone_is_uniform(first, second):
    # not 0.0, which a rank correlation with a constant vector gives
    assert split_half_correlation(halves_fed(first, second)) is None
    trace = criterion_named("trace")
    assert trace.split_half_correlation(halves_fed(first, second), None, AllocationSettings(), lambda t: t) is None
    assert trace.split_half_correlation(
        halves_fed([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]), None, AllocationSettings(), lambda t: t
    ) == pytest.approx(-0.5, abs=1e-5)


def record(name, score, shape=(16, 16), sigma_sq=None, noise_floor=None):
    return ModuleRecord(name=name, type="Linear", shape=shape, rank_cost=sum(shape), score=score,
                        sigma_sq=sigma_sq, noise_floor=noise_floor)


def test_trace_allocation_uses_the_settings_the_module_sizes_and_names_each_exclusion():
    records = [record("a", 1.0), record("b", 4.0), record("c", 16.0, shape=(64, 3)), record("d", 0.01),
               record("e", 0.0), record("f", 2.0)]
    settings = AllocationSettings(rank=4, rank_min=1, rank_max=16, mode="median", score_power=1.0, exclude_threshold=0.1)
    result = criterion_named("trace").allocate(records, settings)
    # median kept score 3: rank 4 x score / 3, c cut to its size min(64, 3) = 3
    assert result.ranks == {"a": 1, "b": 5, "c": 3, "f": 3}
    assert result.excluded == {
        "d": "score below exclude_threshold (0.1) x the median score",
        "e": "no gradient reached it on this data (score 0)",
    }


def test_the_base_description_lists_the_settings_a_criterion_reads():
    class Powered(TopHalf):
        settings_used = ("score_power", "exclude_threshold")

    assert Powered().describe_settings(AllocationSettings(score_power=0.75, exclude_threshold=0.1)) == (
        "score power 0.75, exclude threshold 0.1"
    )
    assert TopHalf().describe_settings(AllocationSettings()) == ""
    assert criterion_named("spectrum").describe_settings(AllocationSettings()) == (
        "greedy by gain per parameter above each module's noise floor"
    )
    assert repr(criterion_named("trace")) == "TraceCriterion(name='trace')"


def test_rank_agreement_is_spearmans_rho():
    first = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert rank_agreement(first, torch.tensor([2.0, 4.0, 1.0, 5.0, 3.0])) == pytest.approx(0.3, abs=1e-5)


def test_the_built_ins_are_rebuilt_from_their_import_paths(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    assert [type(criterion_named(name)).__name__ for name in criterion_names()] == ["TraceCriterion", "SpectrumCriterion"]
    assert repr(STOPPING_METHODS) == repr({
        "trace": "split-half spearman over all modules",
        "spectrum": "split-half spearman of the spectrum allocation's ranks over all modules",
    })
    unregister_criterion("never-registered")  # nothing to remove: no error


def test_spectrum_split_half_allocates_each_half_within_the_module_sizes():
    # a keeps 3 directions in half 0 and 2 in half 1, but fits only rank 2: the halves then agree
    halves = {"a": pair("a", [9, 8, 7], [9, 8]), "b": pair("b", [6, 5], [6, 5]), "c": pair("c", [4], [4]),
              "d": pair("d", [3, 2], [3, 2])}
    limits = {"a": 2, "b": 8, "c": 8, "d": 8}
    assert spectrum_split_half_correlation(halves, COSTS, SPECTRUM_SETTINGS, limits) == 1.0
    assert spectrum_split_half_correlation(halves, COSTS, SPECTRUM_SETTINGS) == pytest.approx(0.9428090415820634)

    class Statistics:  # what SpectrumCriterion reads of its SpectrumSet
        rank_costs, rank_limits = COSTS, limits
        last_correlation = None

        def check_due(self):
            return True

        def half_sketch(self):
            return torch.zeros(1)

        def half_spectra(self, sketch):
            return halves

    spectrum = criterion_named("spectrum")
    assert spectrum.split_half_correlation(None, Statistics(), SPECTRUM_SETTINGS, lambda t: t) == 1.0


@pytest.mark.parametrize("empty_half", [0, 1])
def test_spectrum_split_half_with_one_half_empty_is_no_agreement_not_undefined(empty_half):
    # one half clears no floor, the other does: its all-zero ranks are uniform, so 0.0 (None only if both are empty)
    def noise_and_signal(i):
        return ([0.5], [9, 5 - i]) if empty_half == 0 else ([9, 5 - i], [0.5])

    halves = {name: pair(name, *noise_and_signal(i)) for i, name in enumerate("abc")}
    assert spectrum_split_half_correlation(halves, COSTS, SPECTRUM_SETTINGS) == 0.0


def test_spectrum_split_half_with_one_half_truly_uniform_is_no_agreement():
    halves = {"a": pair("a", [9], [9, 5]), "b": pair("b", [9], [0.5]), "c": pair("c", [9], [9])}
    assert spectrum_split_half_correlation(halves, COSTS, SPECTRUM_SETTINGS) == 0.0  # ranks (1, 1, 1) vs (2, 0, 1)


def test_spectrum_statistics_carry_the_seed_and_the_loss_reduction():
    stats = criterion_named("spectrum").statistics({"l": nn.Linear(8, 40)}, SPECTRUM_SETTINGS, seed=7, loss_reduction="sum")
    accumulator = stats.accumulators["l"]
    assert (accumulator._seed, accumulator.loss_reduction, stats.rank_max) == (7, "sum", 8)


def spectrum_records():
    return [record("a", 1.0, shape=(16, 1), sigma_sq=(9.0, 8.0, 7.0), noise_floor=1.0),
            record("b", 1.0, sigma_sq=(6.0, 5.0, 4.0), noise_floor=1.0),
            record("c", 1.0, sigma_sq=(0.5,), noise_floor=1.0)]


def test_spectrum_allocation_uses_the_settings_and_the_module_sizes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = criterion_named("spectrum").allocate(spectrum_records(), SPECTRUM_SETTINGS)
    assert result.ranks == {"a": 1, "b": 2}  # a: the cheapest second direction, but it fits rank 1 only
    assert set(result.excluded) == {"c"}


def test_spectrum_allocation_refuses_records_without_a_spectrum_and_names_them():
    records = [record(name, 1.0, sigma_sq=(2.0,), noise_floor=None) for name in "wxyz"] + spectrum_records()
    spectrum = criterion_named("spectrum")
    expected = ("criterion 'spectrum': 4 module(s) have no recorded spectrum, e.g. ['w', 'x', 'y']; "
                "run the analysis with criterion='spectrum' (lightning-fisher analyze --criterion spectrum)")
    assert spectrum.missing_statistics(records) == expected
    assert spectrum.missing_statistics(spectrum_records()) is None
    with pytest.raises(ValueError) as error:
        spectrum.allocate(records, SPECTRUM_SETTINGS)
    assert str(error.value) == expected


def test_a_spectrum_stopping_at_its_stored_length_warns_with_the_budget_reached():
    short = [record("a", 1.0, sigma_sq=(9.0, 8.0), noise_floor=1.0), record("b", 1.0, sigma_sq=(6.0,), noise_floor=1.0),
             record("c", 1.0, sigma_sq=(5.0, 4.0, 3.0, 2.5), noise_floor=1.0),
             record("d", 1.0, shape=(16, 2), sigma_sq=(7.0, 6.0), noise_floor=1.0)]
    settings = AllocationSettings(rank=4, rank_min=1, rank_max=8, mode="budget", criterion="spectrum")
    with pytest.warns(UserWarning) as caught:
        result = criterion_named("spectrum").allocate(short, settings)
    assert result.ranks == {"a": 2, "b": 1, "c": 4, "d": 2}
    message = str(caught[0].message)
    # a and b stop at their stored values; c too (4 stored, 4 given); d is at its size, not short
    assert "the map stores 4 singular values per module" in message
    assert "3 module(s) stop at 4 below rank_max 8 (e.g. a, b, c)" in message
    assert "the budget reaches 260 of 456 parameters (0.57x)" in message
    with pytest.warns(UserWarning) as caught:  # median mode: no budget to report
        criterion_named("spectrum").allocate(short, dataclasses.replace(settings, mode="median", rank=3))
    assert "below rank_max 8 (e.g. a, b, c). Analyse again with --rank-max 8" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing short when each module could take no more
        criterion_named("spectrum").allocate(short, dataclasses.replace(settings, rank_max=1, rank_min=1, rank=1))
