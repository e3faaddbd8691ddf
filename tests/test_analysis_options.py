"""AnalysisOptions: one home for the analysis options, taken whole or one by one by every entry point."""

import dataclasses
import inspect
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_fisher import AnalysisOptions, FisherAnalysisModule, SettingsError, TimestepFocus, analyze
from lightning_fisher.analysis.options import ANALYSIS_OPTIONS
from lightning_fisher.training import analyze as trainer_path
from lightning_fisher.training.defaults import TRAINER_DEFAULTS

RANKS = dict(rank=2, rank_min=1, rank_max=4)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int = 6) -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)) for _ in range(n)]


def loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_values_are_normalised_once_when_built():
    options = AnalysisOptions(include=["0"], exclude="2", timestep_focus="0.2,0.5", module_types=[nn.Linear])
    assert options.include == ("0",) and options.exclude == ("2",)  # a string is one pattern, not characters
    assert options.module_types == (nn.Linear,)
    assert options.timestep_focus == TimestepFocus("custom", (0.2, 0.5))
    assert options.candidate_selection == dict(include=("0",), exclude=("2",), module_types=(nn.Linear,))
    assert hash(options) == hash(dataclasses.replace(options))  # frozen and hashable, like the other settings


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("loss_reduction", "avg", "loss_reduction: must be one of mean, sum"),
        ("timestep_focus", "0.5,0.2", "timestep_focus"),
        ("seed", 1.5, "seed: must be an integer or None"),
        ("seed", True, "seed: must be an integer or None"),
        ("train_mode", 1, "train_mode: must be True or False"),
        ("use_rslora", "yes", "use_rslora: must be True or False"),
        ("lora_alpha", 0, "lora_alpha: must be a positive number or None"),
        ("lora_alpha", float("nan"), "lora_alpha"),
        ("include", [1], "include: expected a list of name patterns"),
        ("exclude", None, "exclude: expected a list of name patterns"),
        ("module_types", ["Linear"], "module_types: must be module classes"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(field, value, words):
    with pytest.raises(SettingsError, match=words) as caught:
        AnalysisOptions(**{field: value})
    assert caught.value.field == field


def test_every_entry_point_takes_its_defaults_from_the_options_object():
    defaults = {f.name: f.default for f in dataclasses.fields(AnalysisOptions)}
    assert defaults["seed"] == 0 and defaults["timestep_focus"] == "balanced" and defaults["loss_reduction"] == "mean"
    parameters = inspect.signature(analyze).parameters
    assert {name: parameters[name].default for name in ANALYSIS_OPTIONS} == defaults
    # one analyze: the Trainer path's older import location gives the same function
    assert trainer_path.analyze is analyze
    assert set(inspect.signature(trainer_path.analyze_with_trainer).parameters) >= {"allocation", "stopping", "options"}
    module_defaults = {n: p.default for n, p in inspect.signature(FisherAnalysisModule.__init__).parameters.items()}
    # The module records the seed but seeds nothing, so it records none unless told (documented).
    assert {name: module_defaults[name] for name in ANALYSIS_OPTIONS} == {**defaults, "seed": None}


def test_options_object_gives_the_same_map_as_the_options_one_by_one():
    one_by_one = analyze(net(), batches(), loss, exclude=["2"], seed=3, max_batches=4, min_batches=0, **RANKS)
    whole = analyze(net(), batches(), loss, options=AnalysisOptions(exclude=["2"], seed=3), max_batches=4,
                    min_batches=0, **RANKS)
    assert set(whole.scores) == {"0"} and whole.scores == one_by_one.scores
    assert dataclasses.replace(whole.analysis, seconds=0) == dataclasses.replace(one_by_one.analysis, seconds=0)
    assert whole.analysis.seed == 3


def test_options_object_beside_one_of_its_options_is_refused_whatever_the_value():
    with pytest.raises(TypeError, match=r"give either an AnalysisOptions \(options=\) or the individual options \(seed\)"):
        analyze(net(), batches(), loss, options=AnalysisOptions(), seed=0)
    with pytest.raises(TypeError, match="options must be an AnalysisOptions, got dict"):
        analyze(net(), batches(), loss, options={"seed": 1})


def test_the_plain_loop_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analyze(net(), batches(3), loss, max_batches=3, min_batches=0, **RANKS)  # stops before it is stable
    lines = [w for w in caught if "did NOT converge" in str(w.message)]
    assert len(lines) == 1 and lines[0].filename == __file__


def test_trainer_defaults_are_one_read_only_mapping():
    assert TRAINER_DEFAULTS["max_epochs"] == 1 and TRAINER_DEFAULTS["enable_checkpointing"] is False
    assert TRAINER_DEFAULTS["logger"] is False and TRAINER_DEFAULTS["limit_val_batches"] == 0
    with pytest.raises(TypeError):
        TRAINER_DEFAULTS["logger"] = True  # type: ignore[index]


def test_an_option_field_is_found_by_name_with_its_flag_and_help():
    assert AnalysisOptions.field("seed").metadata["flag"] == "seed" and AnalysisOptions.field("seed").default == 0
    assert AnalysisOptions.field("module_types").metadata["flag"] is None  # no command-line flag
    with pytest.raises(KeyError):
        AnalysisOptions.field("rank")


# --- what mutation testing (benchmarks/mutation.py) found untested ---


def test_one_module_class_is_a_tuple_of_one():
    assert AnalysisOptions(module_types=nn.Linear).module_types == (nn.Linear,)
    assert AnalysisOptions(module_types=[nn.Linear, nn.Conv2d]).module_types == (nn.Linear, nn.Conv2d)


@pytest.mark.parametrize("alpha", [True, "2", 0, -1.0, math.nan, math.inf])
def test_lora_alpha_must_be_a_positive_finite_number(alpha):
    with pytest.raises(SettingsError, match=rf"^lora_alpha: must be a positive number or None, got {alpha!r}$") as caught:
        AnalysisOptions(lora_alpha=alpha)
    assert caught.value.field == "lora_alpha"


@pytest.mark.parametrize("alpha", [0.5, 1, 16, 32.0, None])
def test_any_positive_lora_alpha_is_kept(alpha):
    assert AnalysisOptions(lora_alpha=alpha).lora_alpha == alpha


def test_the_options_fields_in_order():
    assert [f.name for f in AnalysisOptions.fields()] == [
        "include", "exclude", "module_types", "timestep_focus", "loss_reduction", "train_mode", "seed", "lora_alpha",
        "use_rslora"]
