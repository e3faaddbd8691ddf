"""One name per option: the command line's names work in every Python call; the older spellings still do."""

import inspect
import re

import pytest
import torch
from torch import nn

from lightning_fisher import (
    AllocationSettings,
    FisherAnalysisModule,
    FisherMap,
    FisherStability,
    StabilityRule,
    allocate_ranks,
    analyze,
)
from lightning_fisher.allocation.settings import other_spellings, settings_or_options

SCORES = {"a": 1.0, "b": 16.0, "c": 4.0}
COSTS = {"a": 10, "b": 10, "c": 10}


def test_the_settings_objects_take_and_give_the_command_line_names():
    allocation = AllocationSettings(rank=4, rank_min=1, rank_max=8, rank_mode="budget")
    assert allocation == AllocationSettings(rank=4, rank_min=1, rank_max=8, mode="budget")
    assert allocation.rank_mode == allocation.mode == "budget"
    rule = StabilityRule(convergence_patience=3, stability_threshold=0.5)
    assert rule == StabilityRule(patience=3, threshold=0.5)
    assert (rule.convergence_patience, rule.stability_threshold) == (3, 0.5)
    # the flags a settings object writes are the same names
    assert allocation.flags()["rank_mode"] == "budget"


@pytest.mark.parametrize(
    "call",
    [
        lambda: AllocationSettings(rank_mode="budget", mode="median"),
        lambda: StabilityRule(patience=2, convergence_patience=3),
        lambda: FisherStability(threshold=0.5, stability_threshold=0.6),
        lambda: allocate_ranks(SCORES, mode="budget", rank_mode="budget"),
    ],
)
def test_both_spellings_of_one_option_are_refused(call):
    with pytest.raises(TypeError, match="are one option; give it once"):
        call()


def test_allocation_functions_take_either_spelling_with_the_same_result():
    ranks = dict(rank=2, rank_min=1, rank_max=4, rank_costs=COSTS)
    budget = allocate_ranks(SCORES, rank_mode="budget", **ranks)
    assert budget == allocate_ranks(SCORES, mode="budget", **ranks)
    assert budget != allocate_ranks(SCORES, **ranks)  # the option acts: median mode gives other ranks
    assert FisherStability(convergence_patience=2, stability_threshold=0.5).rule == StabilityRule(patience=2, threshold=0.5)


def test_analyze_and_the_analysis_module_take_the_older_spellings_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]

    def loss(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    common = dict(rank=2, rank_min=1, rank_max=4, max_batches=4, min_batches=0)
    new = analyze(model, data, loss, rank_mode="budget", convergence_patience=2, stability_threshold=0.5, **common)
    old = analyze(model, data, loss, mode="budget", patience=2, threshold=0.5, **common)
    assert new.budget.mode == old.budget.mode == "budget" and new.ranks == old.ranks
    assert (old.analysis.stability.patience, old.analysis.stability.threshold) == (2, 0.5)
    with pytest.raises(TypeError, match="analyze: mode and rank_mode are one option"):
        analyze(model, data, loss, mode="budget", rank_mode="budget")
    from_scores = FisherMap.from_scores({"0": 1.0, "2": 3.0}, model, rank_mode="budget", rank=2, rank_min=1, rank_max=4)
    assert from_scores.budget.mode == "budget"


def test_the_analysis_module_takes_mode_as_rank_mode():
    from lightning.pytorch import LightningModule

    class Task(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

    module = FisherAnalysisModule(Task(), mode="budget", rank=2, rank_min=1, rank_max=4)
    assert module.session.allocation.mode == "budget"


def _callback_from_yaml(tmp_path, init_args: str):
    """FisherStability as a LightningCLI config file builds it: every parameter passed, defaults included."""
    from cli_models import TinyClassifier
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  logger: false\n  enable_checkpointing: false\n  callbacks:\n"
        f"    - class_path: lightning_fisher.FisherStability\n      init_args: {init_args}\n"
    )
    cli = LightningCLI(TinyClassifier, args=["--config", str(config)], run=False, save_config_callback=None)
    return next(c for c in cli.trainer.callbacks if isinstance(c, FisherStability))


@pytest.mark.parametrize(
    "init_args, patience, threshold",
    [
        ("{patience: 7}", 7, 0.9),
        ("{convergence_patience: 7, stability_threshold: 0.5}", 7, 0.5),
        ("{threshold: 0.6, convergence_patience: 3}", 3, 0.6),
        ("{patience: 4, convergence_patience: 4}", 4, 0.9),
    ],
)
def test_a_lightning_cli_config_takes_either_spelling_for_the_callback(tmp_path, init_args, patience, threshold):
    rule = _callback_from_yaml(tmp_path, init_args).rule
    assert (rule.patience, rule.threshold, rule.min_batches) == (patience, threshold, StabilityRule.min_batches)


def test_a_lightning_cli_config_with_two_values_for_one_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match="FisherStability: convergence_patience and patience are one option"):
        _callback_from_yaml(tmp_path, "{patience: 7, convergence_patience: 8}")


def test_a_lightning_cli_config_with_the_rule_object_says_to_give_the_options(tmp_path):
    with pytest.raises(ValueError, match="In a YAML config .* give the options one by one, not rule"):
        _callback_from_yaml(tmp_path, "{rule: {patience: 3}}")


def test_either_spelling_left_at_its_default_gives_way_only_for_the_signature_spellings():
    assert FisherStability(patience=StabilityRule.patience, convergence_patience=8).rule.patience == 8
    assert FisherStability(patience=8, convergence_patience=StabilityRule.patience).rule.patience == 8
    with pytest.raises(TypeError, match="are one option"):
        FisherStability(patience=7, convergence_patience=8)
    # spellings not in a signature (Python only) stay strict, default or not
    with pytest.raises(TypeError, match="are one option"):
        AllocationSettings(rank_mode="median", mode=AllocationSettings.mode)


# --- what mutation testing (benchmarks/mutation.py) found untested ---
# The package applies these decorators when it is imported, before mutation testing switches a
# mutant on, so only a decorator applied here, inside the test, to a class of its own, shows one.


def _whole(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_a_spelling_in_the_signature_is_keyword_only_with_the_parameters_type_and_default():
    class Owner:
        @other_spellings(in_signature=True, new="old")
        def __init__(self, old: int = 5, other: str = "x"):
            self.old, self.other = old, other

    parameters = inspect.signature(Owner.__init__).parameters
    assert list(parameters) == ["self", "old", "other", "new"]
    new = parameters["new"]
    assert (new.kind, new.default, new.annotation) == (inspect.Parameter.KEYWORD_ONLY, 5, int)
    assert parameters["old"].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert (Owner(new=7).old, Owner(new=7, old=5).old, Owner(new=5, old=7).old, Owner(new=7, old=7).old) == (7, 7, 7, 7)
    # "Owner" as the message names it: the class, without ".__init__"
    with pytest.raises(TypeError, match=_whole(f"{Owner.__qualname__}: new and old are one option; give it once")):
        Owner(new=7, old=8)


def test_a_spelling_outside_the_signature_is_accepted_and_strict():
    class Owner:
        @other_spellings(new="old")
        def __init__(self, old: int = 5, other: str = "x"):
            self.old, self.other = old, other

    assert list(inspect.signature(Owner.__init__).parameters) == ["self", "old", "other"]
    assert (Owner(new=7).old, Owner(new=7).other, Owner(3).old) == (7, "x", 3)
    # both spellings refused even when one is at the default
    with pytest.raises(TypeError, match=_whole(f"{Owner.__qualname__}: new and old are one option; give it once")):
        Owner(new=5, old=5)


def test_settings_or_options_names_the_class_that_refuses_both():
    class Owner:
        @settings_or_options("settings", AllocationSettings, ("rank",))
        def __init__(self, rank: int = 64, settings=None):
            self.rank, self.settings = rank, settings

    assert list(inspect.signature(Owner.__init__).parameters) == ["self", "rank", "settings"]
    settings = AllocationSettings(rank=32)
    assert (Owner(settings=settings).settings, Owner(rank=8).rank) == (settings, 8)
    message = (f"{Owner.__qualname__}: give either an AllocationSettings (settings=) or the individual options (rank), "
               "not both; e.g. settings=dataclasses.replace(settings, ...). In a YAML config (LightningCLI passes "
               "every option) give the options one by one, not settings:")
    with pytest.raises(TypeError, match=_whole(message)):
        Owner(8, settings=settings)  # positional too
    with pytest.raises(TypeError, match=_whole(message)):
        Owner(rank=64, settings=settings)
