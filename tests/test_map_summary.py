"""The words for a fisher map: one line, the report's header fields, the plot title, the fit summary."""

import dataclasses
import statistics

import pytest
from _nets import CollidingNet, linear_names
from torch import nn

from lightning_fisher import FisherMap
from lightning_fisher.fisher_map.map import AnalysisRecord, DatasetRecord, StabilityRecord, TimestepFocusRecord
from lightning_fisher.fisher_map.summary import at_full_size, fit_summary, header_fields, plot_title, summary_line, times_flat
from lightning_fisher.peft_factory import MapApplication


@pytest.fixture(scope="module")
def fisher_map():
    model = CollidingNet()
    scores = {name: 1.0 + index for index, name in enumerate(linear_names(model))}
    scores["pooler.dense"] = 0.0  # excluded
    analysis = AnalysisRecord(
        score="fisher_trace_per_parameter",
        loss_reduction="mean",
        timestep_focus=TimestepFocusRecord("texture", (0.0, 0.4), applied=True, observed_range=(0.01, 0.39)),
        batches=12,
        samples=1536,
        skipped_samples=0,
        converged=False,
        stop_reason="max_batches",
        seed=None,
        stability=StabilityRecord("split-half spearman", 0.9, 3, None),
        world_size=2,
    )
    return FisherMap.from_scores(
        scores, model, rank=8, rank_min=2, rank_max=32, analysis=analysis,
        dataset=DatasetRecord("/data/train", "sha256:" + "0" * 64, 1536),
    )


def spread(fisher_map):
    ranks = sorted(fisher_map.ranks.values())
    return ranks[0], ranks[-1], statistics.median(ranks)


def test_summary_line(fisher_map):
    low, high, median = spread(fisher_map)
    budget = fisher_map.budget
    assert summary_line(fisher_map) == (
        f"27/28 modules adapted, ranks {low}-{high} (median {median:g}), {budget.lora_parameters:,} LoRA "
        f"parameters = {budget.lora_parameters / budget.flat_lora_parameters:.2f}x flat rank 8 "
        f"({budget.flat_lora_parameters:,}); 15 modules at full size, rank min(d_in, d_out) (layers.5.q 8, "
        "layers.5.dense 8, layers.6.q 8, ...); NOT converged (max batches after 12 batches)"
    )
    # the test net's layers are 8 wide (its head 8 x 3): a module the rule would give more stops there
    assert high == 8 and at_full_size(fisher_map) == {m.name: m.rank for m in fisher_map.modules if m.rank == min(m.shape)}
    assert at_full_size(fisher_map)["head"] == 3
    assert len(at_full_size(fisher_map)) == 15
    assert summary_line(fisher_map) == fisher_map.summary()  # FisherMap.summary() prints the same line
    converged = dataclasses.replace(
        fisher_map, analysis=dataclasses.replace(fisher_map.analysis, converged=True, stop_reason="converged")
    )
    assert summary_line(converged).endswith("layers.6.q 8, ...)")
    skipped = dataclasses.replace(converged, analysis=dataclasses.replace(converged.analysis, skipped_samples=3))
    assert summary_line(skipped).endswith("; 3 non-finite samples skipped")


def test_summary_line_of_a_map_with_odd_and_even_rank_counts():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 2))
    three = FisherMap.from_scores({"0": 1.0, "2": 3.0, "4": 9.0}, model, rank=4, rank_min=1, rank_max=8)
    two = FisherMap.from_scores({"0": 1.0, "2": 3.0}, model, rank=4, rank_min=1, rank_max=8)
    for m in (three, two):
        low, high, median = spread(m)
        assert f"ranks {low}-{high} (median {median:g})," in summary_line(m)
        assert summary_line(m) == m.summary()


def test_times_flat():
    assert times_flat(980, 1000) == "0.98x"
    assert times_flat(5, 0) == "n/a"


def test_header_fields(fisher_map):
    fields = dict(header_fields(fisher_map.with_path("/maps/fisher_map.json")))
    assert [label for label, _ in header_fields(fisher_map)] == [
        "model", "created", "dataset", "analysis", "stopped", "focus", "run", "budget", "LoRA", "alpha", "adapted"
    ]
    assert fields["map"] == "/maps/fisher_map.json"
    assert fields["dataset"] == "/data/train (1,536 sample files)"
    assert fields["analysis"] == (
        "fisher_trace_per_parameter, 1,536 samples in 12 batches (0 skipped), 2 processes, loss reduction mean"
    )
    assert fields["stopped"] == "max_batches, converged: no (split-half spearman n/a, threshold 0.9, patience 3)"
    assert fields["focus"] == "texture (t in [0, 0.4]), applied, drew t in 0.01-0.39"
    assert fields["run"] == "no seed"
    assert fields["alpha"] == f"{fisher_map.alpha.lora_alpha:g} at rank 8, alpha/rank constant"
    low, high, median = spread(fisher_map)
    assert fields["adapted"] == f"27/28 candidate modules, ranks {low}-{high}, median {median:g}"


def test_plot_title(fisher_map):
    budget = fisher_map.budget
    ratio = budget.lora_parameters / budget.flat_lora_parameters
    assert plot_title(fisher_map) == (
        "CollidingNet: Fisher score and LoRA rank per module\n"
        f"focus texture (t in [0, 0.4]), 1,536 samples, 12 batches, max_batches; 27/28 adapted, {ratio:.2f}x flat "
        "rank 8 parameters"
    )
    without = dataclasses.replace(fisher_map, analysis=None)
    assert plot_title(without).splitlines()[1].startswith("no analysis record; 27/28 adapted, ")


def test_fit_summary_without_a_map():
    ranks = {"a": 8, "b": 8}
    assert fit_summary(None, None, ranks=ranks, trainable_parameters=1234) == (
        "Flat LoRA: 2 modules at rank 8, 1,234 trainable adapter parameters"
    )
    assert fit_summary(None, None, ranks={}, trainable_parameters=0, adapter_label="LoHa", map_ignored=True) == (
        "Flat LoHa: 0 modules at rank -, 0 trainable adapter parameters (fisher map ignored: ignore_fisher_map=True)"
    )


def test_fit_summary_with_a_map(fisher_map):
    excluded = ["pooler.dense", "x1", "x2", "x3", "x4"]
    application = MapApplication(
        config=None,
        ranks={"layers.0.q": 4, "layers.0.dense": 6, "head": 5},
        alphas={},
        excluded=excluded,
        outside_root=["outside.q"],
        overridden={"r": 32},
    )
    budget = fisher_map.budget
    text = fit_summary(
        fisher_map, application, ranks=application.ranks, trainable_parameters=900, adapter_root="encoder"
    )
    assert text.splitlines() == [
        "Fisher map detected: (in memory)",
        "  modules adapted: 3 / 8 candidates (5 excluded: pooler.dense, x1, x2, x3, ...)",
        "  ranks: 4-6, median 5 (map: rank 8, min 2, max 32, mode median)",
        f"  trainable adapter parameters: 900 = {900 / budget.flat_lora_parameters:.2f}x flat rank 8 on all 28 "
        f"candidates ({budget.flat_lora_parameters:,})",
        "  analysis: 1,536 samples in 12 batches, max_batches; timestep focus texture (t in [0, 0.4])",
        "  outside adapter_root 'encoder', not adapted: outside.q",
        "  settings replaced by the map: r=32",
    ]
    plain = dataclasses.replace(application, excluded=[], outside_root=[], overridden={})
    text = fit_summary(fisher_map.with_path("/d/fisher_map.json"), plain, ranks=plain.ranks, trainable_parameters=1)
    assert text.splitlines()[:2] == ["Fisher map detected: /d/fisher_map.json", "  modules adapted: 3 / 3 candidates"]
    assert len(text.splitlines()) == 5
    with pytest.raises(ValueError, match="MapApplication"):
        fit_summary(fisher_map, None, ranks={}, trainable_parameters=0)
    # flat LoRA counted on the model trained: under adapter_root, or with other shapes
    text = fit_summary(fisher_map, plain, ranks=plain.ranks, trainable_parameters=1000, adapter_root="encoder",
                       flat=(2, 500))
    assert text.splitlines()[3] == (
        "  trainable adapter parameters: 1,000 = 2.00x flat rank 8 on the 2 candidates under adapter_root 'encoder' (500)")
    text = fit_summary(fisher_map, plain, ranks=plain.ranks, trainable_parameters=1000, flat=(28, 4000))
    assert text.splitlines()[3].endswith("= 0.25x flat rank 8 on all 28 candidates (4,000)")


def test_paths_under_the_current_folder_are_shown_relative(fisher_map, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = dataclasses.replace(
        fisher_map, path=tmp_path / "data" / "fisher_map.json",
        dataset=dataclasses.replace(fisher_map.dataset, path=str(tmp_path / "data" / "train")),
    )
    fields = dict(header_fields(inside))
    assert fields["map"] == "data/fisher_map.json"
    assert fields["dataset"].startswith("data/train (")
