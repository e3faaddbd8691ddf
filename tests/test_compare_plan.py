"""Planning a comparison (compare_plan.py): the arms, their ranks and parameter counts, and option checks; no training."""

import pytest

from cli_models import TinyClassifier
from compare_data import dataset  # noqa: F401 (a fixture)
from lightning_fisher import FisherMap
from lightning_fisher.compare_plan import check_budgets, check_seeds, plan_arms
from lightning_fisher.errors import CompareError


def test_plan_reuses_a_budget_map_and_checks_budgets(dataset):
    median_map = FisherMap.load(dataset)
    b = median_map.budget
    budget_map = FisherMap.from_scores(median_map.scores, TinyClassifier(), rank=4, rank_min=b.rank_min,
                                       rank_max=b.rank_max, mode="budget")
    arms = plan_arms(budget_map, TinyClassifier(), budgets=[0.5, 1.0], adapter_root="backbone")
    assert [arm.name for arm in arms] == ["flat", "fisher", "fisher@0.5"]  # 1.0 first, whatever the order given
    assert arms[1].fisher_map is budget_map and arms[2].rank == 2
    assert arms[1].modules == {name.split(".")[1]: r for name, r in budget_map.ranks.items()}
    # Same scaling in every arm: alpha / rank of the smaller budget equals the map's.
    assert arms[2].fisher_map.alpha.lora_alpha / 2 == budget_map.alpha.lora_alpha / 4

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
    from lightning_fisher.compare_plan import check_lrs

    assert check_lrs(None) is None
    assert check_lrs([1e-3, 1e-4, 3e-4]) == [1e-4, 3e-4, 1e-3]
    for bad in ([], [1e-3, 1e-3], [0.0], [-1e-3], [float("inf")], [True]):
        with pytest.raises(CompareError, match="lrs: need one or more distinct positive learning rates"):
            check_lrs(bad)


def test_arms_for_each_criterion_and_budget():
    import dataclasses

    from lightning_fisher import AllocationSettings
    from lightning_fisher.spectrum import ModuleSpectrum

    model = TinyClassifier()
    names = ["backbone.0", "backbone.2", "backbone.4", "backbone.6", "head"]
    spectra = {n: ModuleSpectrum(n, (9.0, 4.0, 1.5, 0.5) if n != "backbone.2" else (0.5, 0.4), 1.0, 64) for n in names}
    settings = AllocationSettings(rank=4, rank_min=1, rank_max=16, mode="budget", criterion="spectrum")
    spectrum_map = FisherMap.from_scores({n: float(i + 1) for i, n in enumerate(names)}, model, allocation=settings,
                                         spectra=spectra)
    arms = plan_arms(spectrum_map, model, budgets=[1.0, 0.5], criteria=["spectrum", "trace"])
    assert [a.name for a in arms] == ["flat", "fisher", "fisher@0.5", "fisher-trace", "fisher-trace@0.5"]
    assert arms[1].fisher_map is spectrum_map
    assert "backbone.2" not in arms[2].modules  # no direction above its floor at any budget
    assert arms[3].fisher_map.budget.criterion == "trace" and "backbone.2" in arms[3].modules
    for arm in arms[1:]:
        assert arm.expected_parameters <= arms[0].expected_parameters * arm.budget_fraction
    trace_map = spectrum_map.reallocate(dataclasses.replace(settings, criterion="trace"))
    trace_map = dataclasses.replace(trace_map, modules=tuple(dataclasses.replace(m, sigma_sq=None, noise_floor=None)
                                                             for m in trace_map.modules))
    with pytest.raises(CompareError, match="have no recorded spectrum.*analyze --criterion spectrum"):
        plan_arms(trace_map, model, criteria=["spectrum"])
    with pytest.raises(CompareError, match="'variance' is not one of trace, spectrum"):
        plan_arms(trace_map, model, criteria=["variance"])
