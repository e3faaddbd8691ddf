"""The settings objects: one home for the allocation and stopping defaults, checked once."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from _nets import linear_names
from cli_models import TinyClassifier

from lightning_fisher import (
    AllocationSettings,
    FisherAnalysisModule,
    FisherMap,
    FisherStability,
    StabilityRule,
    allocate_ranks,
    analyze,
)
from lightning_fisher.allocation.criteria.spectrum import SpectrumCriterion
from lightning_fisher.allocation.criteria.trace import TraceCriterion
from lightning_fisher.allocation.settings import allocation_from_options, field_help, resolve_settings
from lightning_fisher.cli import main
from lightning_fisher.cli.wizard_answers import load_preset
from lightning_fisher.errors import SettingsError

TESTS = Path(__file__).parent
REPO = TESTS.parent

# The names the public functions give the fields (the flags, except where a function predates them).
ALLOCATION_OPTION = {"rank": "rank", "rank_min": "rank_min", "rank_max": "rank_max", "mode": "rank_mode",
                     "score_power": "score_power", "exclude_threshold": "exclude_threshold"}
STOPPING_OPTION = {"patience": "convergence_patience", "threshold": "stability_threshold",
                   "min_batches": "min_batches", "max_batches": "max_batches"}


def legacy(settings):
    """The fields that functions also take as individual options (newer ones come only in the object)."""
    return {field: value for field, value in dataclasses.asdict(settings).items() if field in ALLOCATION_OPTION}


def defaults(function):
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def test_allocate_ranks_and_from_scores_default_to_the_settings():
    expected = AllocationSettings()
    for function in (allocate_ranks, FisherMap.from_scores):
        seen = defaults(function)
        assert {field: seen[field] for field in ALLOCATION_OPTION} == legacy(expected), function.__qualname__


def test_analysis_module_and_analyze_default_to_the_settings():
    allocation = legacy(AllocationSettings())
    stopping = dataclasses.asdict(StabilityRule())
    for function in (FisherAnalysisModule.__init__, analyze):
        seen = defaults(function)
        assert {field: seen[option] for field, option in ALLOCATION_OPTION.items()} == allocation
    seen = defaults(analyze)
    assert {field: seen[option] for field, option in STOPPING_OPTION.items()} == stopping
    seen = defaults(FisherStability.__init__)
    assert {field: seen[field] for field in STOPPING_OPTION} == stopping


def test_the_analysis_module_builds_its_settings_from_the_defaults():
    module = FisherAnalysisModule(TinyClassifier())
    assert module.allocation == AllocationSettings()
    assert FisherStability().rule == StabilityRule()


def test_print_config_shows_the_settings_defaults(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit) as exited:
        main(["analyze", "--model", "cli_models.TinyClassifier", "--dataset-dir", str(tmp_path / "data"),
              "--print_config"])
    assert exited.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    allocation = AllocationSettings()
    assert {key: config[key] for key in allocation.flags()} == allocation.flags()
    assert {field: config[option] for field, option in STOPPING_OPTION.items()} == dataclasses.asdict(StabilityRule())


def test_the_large_preset_is_the_default_budget():
    assert load_preset(REPO / "configs" / "presets" / "large.yaml") == AllocationSettings()


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(rank=0), "rank"),
        (dict(rank_min=40, rank_max=32, rank=35), "rank_min"),
        (dict(rank=200), "rank"),
        (dict(mode="flat"), "mode"),
        (dict(score_power=float("nan")), "score_power"),
        (dict(exclude_threshold=1.0), "exclude_threshold"),
        (dict(rank=True), "rank"),
        (dict(criterion="variance"), "criterion"),
    ],
)
def test_a_bad_allocation_setting_names_its_field(change, field):
    with pytest.raises(SettingsError, match=f"^{field}") as caught:
        AllocationSettings(**change)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)  # callers that caught ValueError still do


def test_a_rank_outside_default_bounds_says_which_bound_is_a_default():
    with pytest.raises(SettingsError) as caught:
        AllocationSettings(rank=8)
    assert str(caught.value) == (
        "rank (8) must lie within [rank_min, rank_max] = [16, 128]: rank_min is 16 (the default); pass rank_min=8 "
        "or less with it (--rank-min 8 on the command line)")
    with pytest.raises(SettingsError, match=r"rank_max is 200; pass rank_max=300 or more with it \(--rank-max 300"):
        AllocationSettings(rank=300, rank_max=200)


@pytest.mark.parametrize(
    "change, field",
    [(dict(patience=0), "patience"), (dict(threshold=1.5), "threshold"), (dict(min_batches=-1), "min_batches"),
     (dict(max_batches=3, min_batches=5), "max_batches")],
)
def test_a_bad_stopping_setting_names_its_field(change, field):
    with pytest.raises(SettingsError) as caught:
        StabilityRule(**change)
    assert caught.value.field == field


def test_flags_round_trip_and_name_the_yaml_keys():
    settings = AllocationSettings(rank=8, rank_min=2, rank_max=32, mode="budget")
    assert settings.flags() == {"rank": 8, "rank_min": 2, "rank_max": 32, "rank_mode": "budget",
                                "score_power": 0.5, "exclude_threshold": 0.05, "criterion": "trace"}
    assert AllocationSettings.from_flags(settings.flags()) == settings
    assert AllocationSettings.from_flags({"rank_mode": "budget", "unrelated": 1}) == AllocationSettings(mode="budget")
    assert settings.describe() == "rank 8, min 2, max 32, mode budget"


def test_an_object_and_changed_options_together_are_refused():
    settings = AllocationSettings(rank=8, rank_min=2, rank_max=32)
    options = dict(rank=64, rank_min=16, rank_max=128, mode="median", score_power=0.5, exclude_threshold=0.05)
    assert resolve_settings(AllocationSettings, settings, options, owner="f") is settings
    assert resolve_settings(AllocationSettings, None, {**options, "rank": 32}, owner="f") == AllocationSettings(rank=32)
    with pytest.raises(TypeError, match=r"f: give either an AllocationSettings or the individual options \(rank\)"):
        resolve_settings(AllocationSettings, settings, {**options, "rank": 4}, owner="f")
    with pytest.raises(TypeError, match="expected a StabilityRule"):
        resolve_settings(StabilityRule, settings, {}, owner="f")


def test_allocate_ranks_takes_the_object_and_gives_the_same_ranks():
    scores = {f"m{i}": float(i + 1) for i in range(6)}
    costs = {name: 10 for name in scores}
    settings = AllocationSettings(rank=4, rank_min=1, rank_max=16, mode="budget")
    by_object = allocate_ranks(scores, rank_costs=costs, settings=settings)
    by_options = allocate_ranks(scores, rank=4, rank_min=1, rank_max=16, mode="budget", rank_costs=costs)
    assert by_object == by_options
    assert sum(r * 10 for r in by_object.values()) <= 4 * 60


def test_the_map_budget_is_the_settings_it_was_made_with():
    tiny_task = TinyClassifier()
    settings = AllocationSettings(rank=4, rank_min=1, rank_max=16, mode="budget", score_power=1.0)
    names = linear_names(tiny_task)
    fisher_map = FisherMap.from_scores({name: float(i + 1) for i, name in enumerate(names)}, tiny_task,
                                       allocation=settings)
    assert fisher_map.allocation == settings
    assert isinstance(fisher_map.budget, AllocationSettings)
    assert fisher_map.budget.lora_parameters == sum(fisher_map.ranks[n] * fisher_map.rank_costs[n] for n in fisher_map.ranks)


def test_an_object_and_any_explicit_option_are_refused_whatever_the_value():
    tiny_task = TinyClassifier()
    names = linear_names(tiny_task)
    scores = {name: float(i + 1) for i, name in enumerate(names)}
    settings = AllocationSettings(rank=8, rank_min=2, rank_max=32, mode="budget")
    calls = {
        "allocate_ranks": lambda **kw: allocate_ranks(scores, rank_costs={n: 10 for n in names}, settings=settings, **kw),
        "FisherMap.from_scores": lambda **kw: FisherMap.from_scores(scores, tiny_task, allocation=settings, **kw),
        "FisherAnalysisModule": lambda **kw: FisherAnalysisModule(tiny_task, allocation=settings, **kw),
        "analyze": lambda **kw: analyze(tiny_task, [], allocation=settings, **kw),
    }
    mode = {"allocate_ranks": "mode", "FisherMap.from_scores": "mode"}
    for owner, call in calls.items():
        mode_option = mode.get(owner, "rank_mode")
        # the same value as the object's, the default value, another value: all refused, by name
        for explicit in ({"rank": 8}, {"rank": 64}, {mode_option: "median"}, {mode_option: "budget"}):
            with pytest.raises(TypeError, match=rf"{owner}: give either an AllocationSettings \(\w+=\) or the "
                                                rf"individual options \({next(iter(explicit))}\), not both"):
                call(**explicit)
    # the stopping rule likewise, positional options included
    rule = StabilityRule(patience=3)
    with pytest.raises(TypeError, match=r"analyze: give either a StabilityRule \(stopping=\) .*\(convergence_patience\)"):
        analyze(tiny_task, [], stopping=rule, convergence_patience=5)
    with pytest.raises(TypeError, match=r"FisherStability: give either a StabilityRule \(rule=\) .*\(patience\)"):
        FisherStability(5, rule=rule)
    assert FisherStability(rule=rule).rule is rule
    assert allocate_ranks(scores, rank_costs={n: 10 for n in names}, settings=settings) == allocate_ranks(
        scores, rank=8, rank_min=2, rank_max=32, mode="budget", rank_costs={n: 10 for n in names})


# --- what mutation testing (benchmarks/mutation.py) found untested ---


def test_allocation_from_options_passes_every_option_and_the_owner_on():
    settings = allocation_from_options(None, "caller", 8, 2, 32, "budget", 1.0, 0.1, "spectrum")
    assert settings == AllocationSettings(rank=8, rank_min=2, rank_max=32, mode="budget", score_power=1.0,
                                          exclude_threshold=0.1, criterion="spectrum")
    given = AllocationSettings()
    assert allocation_from_options(given, "caller", 64, 16, 128, "median", 0.5, 0.05) is given
    with pytest.raises(TypeError, match=r"^caller: give either an AllocationSettings or the individual options "
                                        r"\(rank_max\), not both; e.g. dataclasses.replace\(settings, rank_max=...\)$"):
        allocation_from_options(given, "caller", 64, 16, 100, "median", 0.5, 0.05)


def test_the_rank_bounds_are_inclusive():
    assert AllocationSettings(rank=4, rank_min=4, rank_max=4).as_dict()["rank"] == 4
    assert AllocationSettings(rank=2, rank_min=2, rank_max=8).rank == 2
    assert AllocationSettings(rank=8, rank_min=2, rank_max=8).rank == 8
    assert AllocationSettings(exclude_threshold=0).exclude_threshold == 0


@pytest.mark.parametrize("value", [2.5, True])
def test_a_rank_that_is_no_integer_is_refused_even_within_the_bounds(value):
    with pytest.raises(SettingsError, match=rf"^rank: must be a positive integer, got {value!r}$") as caught:
        AllocationSettings(rank=value, rank_min=1, rank_max=4)
    assert caught.value.field == "rank"


@pytest.mark.parametrize("power", [0, -0.5])
def test_a_score_power_of_zero_or_less_is_refused(power):
    with pytest.raises(SettingsError, match=rf"^score_power: must be a positive number, got {power!r}$") as caught:
        AllocationSettings(score_power=power)
    assert caught.value.field == "score_power"


def test_describe_names_a_criterion_other_than_the_default_and_from_flags_keeps_the_base():
    settings = AllocationSettings(rank=8, rank_min=2, rank_max=32, mode="budget", criterion="spectrum")
    assert settings.describe() == "rank 8, min 2, max 32, mode budget, criterion spectrum"
    assert dataclasses.replace(settings, criterion="trace").describe() == "rank 8, min 2, max 32, mode budget"
    base = AllocationSettings(rank=8, rank_min=2, rank_max=32, score_power=1.0)
    assert AllocationSettings.from_flags({"rank_mode": "budget", "unknown": 1}, base=base) == dataclasses.replace(
        base, mode="budget")


def test_field_help_gives_a_fields_text_and_reads_the_criteria_help_from_the_registry():
    fields = {f.name: f for f in AllocationSettings.fields()}
    assert field_help(fields["rank"]) == "Target median rank (flat-equivalent rank with --rank_mode budget)."
    assert field_help(fields["criterion"]) == f"trace: {TraceCriterion.help}; spectrum: {SpectrumCriterion.help}."
