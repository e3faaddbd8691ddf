"""Planning a comparison (compare_plan.py): the arms, their ranks and parameter counts, and option checks; no training."""

import pytest

from cli_models import TinyClassifier
from compare_data import dataset  # noqa: F401 (a fixture)
from lightning_fisher import FisherMap
from lightning_fisher.compare.plan import check_budgets, check_seeds, plan_arms
from lightning_fisher.errors import CompareError


def test_plan_reuses_a_budget_map_and_checks_budgets(dataset):
    median_map = FisherMap.load(dataset)
    b = median_map.budget
    budget_map = FisherMap.from_scores(median_map.scores, TinyClassifier(), rank=4, rank_min=b.rank_min,
                                       rank_max=b.rank_max, mode="budget")
    arms = plan_arms(budget_map, TinyClassifier(), budgets=[0.5, 1.0], adapter_root="backbone")
    # 1.0 first, whatever the order given; flat arms (the full rank and the twins) before the fisher arms
    assert [arm.name for arm in arms] == ["flat", "flat@0.5", "fisher", "fisher@0.5"]
    assert arms[2].fisher_map is budget_map and arms[3].rank == 2
    assert arms[2].modules == {name.split(".")[1]: r for name, r in budget_map.ranks.items()}
    # Same scaling in every arm: alpha / rank of the smaller budget equals the map's.
    assert arms[3].fisher_map.alpha.lora_alpha / 2 == budget_map.alpha.lora_alpha / 4

    with pytest.raises(CompareError, match=r"budgets: 0.9 and 1 both give rank 4"):
        plan_arms(budget_map, TinyClassifier(), budgets=[1.0, 0.9])
    with pytest.raises(CompareError, match="above the map's rank_max 16"):
        plan_arms(budget_map, TinyClassifier(), budgets=[5.0])
    with pytest.raises(CompareError, match="adapter_root='head'"):
        plan_arms(budget_map, TinyClassifier(), adapter_root="head")


def test_flat_arm_covers_the_candidates_under_the_root(dataset):
    fisher_map = FisherMap.load(dataset)
    flat = plan_arms(fisher_map, TinyClassifier(), adapter_root="backbone")[0]
    assert flat.is_flat and flat.rank == 4 and flat.fisher_map is None
    assert flat.modules == {"0": 4, "2": 4, "4": 4, "6": 4}
    assert flat.expected_parameters == 4 * sum(fisher_map.rank_costs.values())
    assert flat.to_dict()["expected_lora_parameters"] == flat.expected_parameters


def test_budget_ranks_round_half_up_and_respect_rank_min(dataset):
    scores = FisherMap.load(dataset).scores
    fisher_map = FisherMap.from_scores(scores, TinyClassifier(), rank=5, rank_min=2, rank_max=16, mode="budget")
    # 0.5 of 5 is 2.5: half up gives 3 (round() would give 2); 0.1 of 5 is below rank_min 2.
    assert check_budgets(fisher_map, [0.5, 0.1, 0.5, 2]) == [(1.0, 5), (0.5, 3), (0.1, 2), (2.0, 10)]
    with pytest.raises(CompareError, match=r"budgets: each must be a positive fraction.*got -1"):
        check_budgets(fisher_map, [-1])
    with pytest.raises(CompareError, match=r"got True"):
        check_budgets(fisher_map, [True])


def test_seeds_are_distinct_integers():
    assert check_seeds((2, 0, 1)) == [2, 0, 1]
    for bad in ([], [0, 0], [0.5], [True]):
        with pytest.raises(CompareError, match="seeds: need one or more distinct integers"):
            check_seeds(bad)


def test_learning_rates_are_distinct_positive_numbers_sorted():
    from lightning_fisher.compare.plan import check_lrs

    assert check_lrs(None) is None
    assert check_lrs([1e-3, 1e-4, 3e-4]) == [1e-4, 3e-4, 1e-3]
    for bad in ([], [1e-3, 1e-3], [0.0], [-1e-3], [float("inf")], [True]):
        with pytest.raises(CompareError, match="lrs: need one or more distinct positive learning rates"):
            check_lrs(bad)


def test_arms_for_each_criterion_and_budget():
    import dataclasses

    from lightning_fisher import AllocationSettings
    from lightning_fisher.analysis.spectrum import ModuleSpectrum

    model = TinyClassifier()
    names = ["backbone.0", "backbone.2", "backbone.4", "backbone.6", "head"]
    spectra = {n: ModuleSpectrum(n, (9.0, 4.0, 1.5, 0.5) if n != "backbone.2" else (0.5, 0.4), 1.0, 64) for n in names}
    settings = AllocationSettings(rank=4, rank_min=1, rank_max=16, mode="budget", criterion="spectrum")
    spectrum_map = FisherMap.from_scores({n: float(i + 1) for i, n in enumerate(names)}, model, allocation=settings,
                                         spectra=spectra)
    arms = plan_arms(spectrum_map, model, budgets=[1.0, 0.5], criteria=["spectrum", "trace"])
    assert [a.name for a in arms] == ["flat", "flat@0.5", "fisher", "fisher@0.5", "fisher-trace", "fisher-trace@0.5"]
    assert arms[2].fisher_map is spectrum_map
    assert "backbone.2" not in arms[3].modules  # no direction above its floor at any budget
    assert arms[4].fisher_map.budget.criterion == "trace" and "backbone.2" in arms[4].modules
    # one twin at half the rank, shared by both criteria's half-budget arms
    assert [(a.name, a.twin) for a in arms if not a.is_flat] == [
        ("fisher", "flat"), ("fisher@0.5", "flat@0.5"), ("fisher-trace", "flat"), ("fisher-trace@0.5", "flat@0.5")]
    for arm in arms[2:]:
        assert arm.expected_parameters <= arms[0].expected_parameters * arm.budget_fraction
    trace_map = spectrum_map.reallocate(dataclasses.replace(settings, criterion="trace"))
    trace_map = dataclasses.replace(trace_map, modules=tuple(dataclasses.replace(m, sigma_sq=None, noise_floor=None)
                                                             for m in trace_map.modules))
    with pytest.raises(CompareError, match="have no recorded spectrum.*analyze --criterion spectrum"):
        plan_arms(trace_map, model, criteria=["spectrum"])
    with pytest.raises(CompareError, match="'variance' is not one of trace, spectrum"):
        plan_arms(trace_map, model, criteria=["variance"])


def test_every_smaller_or_larger_budget_gets_a_flat_twin_at_its_rank(dataset):
    """flat@F: flat LoRA on the same candidates at round(r * F), F times flat's parameters; fisher@F is judged against it."""
    fisher_map = FisherMap.load(dataset)  # rank 4, rank_min 1, rank_max 16
    costs = sum(fisher_map.rank_costs.values())
    arms = plan_arms(fisher_map, TinyClassifier(), budgets=[0.5, 2, 0.25, 0.7], adapter_root="backbone")
    flat = {arm.name: arm for arm in arms if arm.is_flat}
    assert list(flat) == ["flat", "flat@0.5", "flat@2", "flat@0.25", "flat@0.7"]
    # 0.7 of 4 is 2.8: rank 3, the same half-up rounding as fisher@0.7
    assert [arm.rank for arm in flat.values()] == [4, 2, 8, 1, 3]
    assert [arm.expected_parameters for arm in flat.values()] == [4 * costs, 2 * costs, 8 * costs, costs, 3 * costs]
    assert flat["flat@0.5"].expected_parameters * 2 == flat["flat"].expected_parameters
    assert flat["flat@0.5"].modules == {"0": 2, "2": 2, "4": 2, "6": 2}  # the candidates under the root, as flat
    assert flat["flat@0.5"].budget_fraction == 0.5 and flat["flat@0.5"].family == "flat"
    for arm in arms:
        if arm.is_flat:
            assert arm.twin is None and arm.baseline is None
            continue
        twin = flat[arm.twin]
        assert arm.twin == arm.baseline == ("flat" if arm.budget_fraction == 1.0 else f"flat@{arm.budget_fraction:g}")
        assert (twin.rank, twin.budget_fraction) == (arm.rank, arm.budget_fraction)
        # the fisher arm spends what its twin spends, less at most one rank step of one module
        assert twin.expected_parameters - max(fisher_map.rank_costs.values()) < arm.expected_parameters
        assert arm.expected_parameters <= twin.expected_parameters
    assert arms[-1].to_dict()["twin"] == "flat@0.7" and arms[-1].to_dict()["family"] == "fisher"
    assert flat["flat@2"].to_dict()["twin"] is None

    # With rank_min above round(r * F), fisher@F spends rank_min's budget, and so does its twin.
    clamped = FisherMap.from_scores(fisher_map.scores, TinyClassifier(), rank=4, rank_min=2, rank_max=16, mode="budget")
    twin = plan_arms(clamped, TinyClassifier(), budgets=[0.25], adapter_root="backbone")[1]
    assert (twin.name, twin.rank, twin.expected_parameters) == ("flat@0.25", 2, 2 * costs)
