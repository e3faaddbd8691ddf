import math

import pytest
import torch

from lightning_fisher.analysis.accumulator import FisherAccumulator
from lightning_fisher.errors import SettingsError
from lightning_fisher.analysis.stability import StabilityRule, StabilityTracker, StopReason, split_half_correlation


def fed(values_per_batch, names=("a", "b", "c", "d", "e")):
    acc = FisherAccumulator(names)
    for values in values_per_batch:
        acc.update(torch.as_tensor(values, dtype=torch.float64))
    return acc


def test_split_half_correlation_uses_independent_halves():
    # samples alternate between halves: even positions -> half 0, odd -> half 1
    increasing = torch.arange(1.0, 6.0).unsqueeze(1)
    decreasing = torch.arange(5.0, 0.0, -1.0).unsqueeze(1)
    same = fed([torch.cat([increasing, increasing], dim=1)])
    assert split_half_correlation(same) == pytest.approx(1.0)
    opposite = fed([torch.cat([increasing, decreasing], dim=1)])
    assert split_half_correlation(opposite) == pytest.approx(-1.0)


def test_split_half_correlation_undefined_until_both_halves_rank_something():
    acc = fed([torch.arange(1.0, 6.0).unsqueeze(1)])  # one sample: half 1 empty
    assert split_half_correlation(acc) is None
    flat = fed([torch.ones(5, 2)])  # every module equal: no ranking
    assert split_half_correlation(flat) is None
    assert split_half_correlation(fed([torch.ones(2, 2)], names=("a", "b"))) == 1.0


def test_consecutive_running_means_would_agree_on_pure_noise_but_halves_do_not():
    """The reason for split halves: running means converge on noise, halves reveal it."""
    generator = torch.Generator().manual_seed(0)
    acc = FisherAccumulator([f"m{i}" for i in range(30)])
    previous = None
    consecutive, halves = [], []
    for _ in range(40):
        acc.update(torch.rand(30, 16, generator=generator, dtype=torch.float64))  # no module differs
        current = acc.score_tensor()
        if previous is not None:
            from torchmetrics.functional import spearman_corrcoef

            consecutive.append(float(spearman_corrcoef(previous, current)))
        previous = current
        halves.append(split_half_correlation(acc))
    assert consecutive[-1] > 0.9  # consecutive means agree although there is nothing to find
    assert abs(sum(halves[-10:]) / 10) < 0.5  # halves say: no reproducible ranking


def test_tracker_needs_patience_consecutive_stable_batches():
    tracker = StabilityTracker(StabilityRule(patience=3, threshold=0.9, min_batches=0, max_batches=None))
    readings = [0.95, 0.95, 0.5, None, 0.91, 0.92]
    assert [tracker.update(r) for r in readings] == [None] * 6
    assert tracker.stable_batches == 2
    assert tracker.update(0.99) is StopReason.CONVERGED
    assert tracker.history == readings + [0.99]


def test_tracker_respects_min_and_max_batches():
    tracker = StabilityTracker(StabilityRule(patience=1, threshold=0.5, min_batches=4, max_batches=10))
    assert [tracker.update(1.0) for _ in range(3)] == [None, None, None]
    assert tracker.update(1.0) is StopReason.CONVERGED
    capped = StabilityTracker(StabilityRule(patience=2, threshold=0.9, min_batches=0, max_batches=3))
    assert [capped.update(0.0) for _ in range(3)] == [None, None, StopReason.MAX_BATCHES]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patience=0), "patience"),
        (dict(threshold=1.5), "threshold"),
        (dict(min_batches=-1), "min_batches"),
        (dict(max_batches=0), "max_batches"),
        (dict(min_batches=10, max_batches=5), "max_batches (5) is smaller"),
    ],
)
def test_rule_validation(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StabilityRule(**kwargs)


def test_a_negative_threshold_is_refused_naming_the_field():
    with pytest.raises(SettingsError) as caught:
        StabilityRule(threshold=-0.5)
    assert caught.value.field == "threshold"
    assert str(caught.value) == (
        "threshold (stability_threshold): must be a split-half correlation in [0, 1], got -0.5; below 0 the rule "
        "would count halves that disagree as stable (0.9 by default)")
    assert StabilityRule(threshold=0.0).threshold == 0.0  # the loosest rule that still asks the halves to agree


def test_correlation_is_finite_with_ties():
    acc = fed([torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [0.0, 0.0]])])
    rho = split_half_correlation(acc)
    assert rho is not None and math.isfinite(rho) and rho == pytest.approx(1.0)


# --- what mutation testing (benchmarks/mutation.py) found untested -----------------------------


@pytest.mark.parametrize("change", [
    dict(patience=True), dict(min_batches=True), dict(max_batches=True), dict(max_batches=8.0),
    dict(threshold=-1.5), dict(threshold=1.01), dict(max_batches=4, min_batches=5),
])
def test_a_stopping_rule_refuses_bools_floats_and_out_of_range_values(change):
    from lightning_fisher.errors import SettingsError

    with pytest.raises(SettingsError):
        StabilityRule(**change)


@pytest.mark.parametrize("change", [
    dict(threshold=0.0), dict(threshold=1.0), dict(max_batches=1, min_batches=0), dict(max_batches=5, min_batches=5),
    dict(min_batches=0), dict(max_batches=None),
])
def test_a_stopping_rule_accepts_the_ends_of_each_range(change):
    rule = StabilityRule(**change)
    assert all(getattr(rule, key) == value for key, value in change.items())


def test_a_correlation_exactly_at_the_threshold_counts_as_stable():
    tracker = StabilityTracker(StabilityRule(patience=2, threshold=0.9, min_batches=0, max_batches=None))
    assert [tracker.update(0.9), tracker.update(0.9)] == [None, StopReason.CONVERGED]


def test_last_correlation_is_the_latest_value_and_none_before_any():
    tracker = StabilityTracker(StabilityRule(patience=3, threshold=0.9, min_batches=0, max_batches=None))
    assert tracker.last_correlation is None
    tracker.update(0.4)
    tracker.update(0.7)
    assert tracker.last_correlation == 0.7
    tracker.update(None)
    assert tracker.last_correlation is None and tracker.history == [0.4, 0.7, None]
