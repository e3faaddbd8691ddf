"""The criterion registry: built-ins by name, a third criterion registered end to end, no name checks elsewhere."""

import ast
import dataclasses
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher
from lightning_fisher import AllocationSettings, FisherMap, FisherMapSchemaError, SettingsError, analyze
from lightning_fisher.allocation.criteria import (
    STOPPING_METHODS,
    Criterion,
    CriterionAllocation,
    criterion_for_stopping_method,
    criterion_named,
    criterion_names,
    register_criterion,
    unregister_criterion,
)
from lightning_fisher.allocation.criteria.trace import split_half_correlation
from lightning_fisher.fisher_map.summary import header_fields, stop_line

QUIET = dict(enable_progress_bar=False, logger=False, accelerator="cpu", devices=1)


class Task(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(
            nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layers(x), y)


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


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
        Task(), data(), output=tmp_path, allocation=settings, convergence_patience=2, min_batches=3,
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
        Task(), data(), criterion="spectrum", rank=4, rank_min=1, rank_max=8, rank_mode="budget",
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
