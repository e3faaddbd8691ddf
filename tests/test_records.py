"""The map's records: the few computed properties and helpers, on values (the codec is test_fisher_map.py)."""

import pytest

from lightning_fisher.analysis.timesteps import TimestepFocus
from lightning_fisher.fisher_map import records
from lightning_fisher.fisher_map.records import (
    AlphaPolicy,
    ModuleRecord,
    TimestepFocusRecord,
    alphas_of,
    rank_costs_of,
    ranks_of,
)


def record(name="m", **fields):
    base = dict(name=name, type="Linear", shape=(3, 8), rank_cost=11, score=1.0)
    return ModuleRecord(**{**base, **fields})


def test_excluded_is_no_rank_and_rank_zero_is_not_excluded():
    assert record().excluded is True
    assert record(rank=0).excluded is False  # falsy but a rank
    assert record(rank=4).excluded is False


def test_above_floor_counts_values_strictly_above_the_floor():
    assert record(sigma_sq=(5.0, 2.0, 1.0, 0.5), noise_floor=1.0).above_floor == 2  # 1.0 is not above 1.0
    assert record(sigma_sq=(5.0, 0.0), noise_floor=0.0).above_floor == 1  # a floor of 0.0 is a floor
    assert record(sigma_sq=(), noise_floor=1.0).above_floor == 0
    assert record(sigma_sq=(5.0,), noise_floor=None).above_floor is None
    assert record(sigma_sq=None, noise_floor=1.0).above_floor is None
    assert record().above_floor is None


def test_rank_limit_is_the_smaller_side():
    assert record(shape=(3, 8)).rank_limit == 3
    assert record(shape=(8, 3)).rank_limit == 3
    assert record(shape=(5, 5)).rank_limit == 5


def test_alpha_follows_rank_without_rslora_and_is_constant_with_it():
    plain = AlphaPolicy(lora_alpha=16)
    assert plain.use_rslora is False
    assert plain.alpha_for(8, 4) == 32.0 and isinstance(plain.alpha_for(8, 4), float)
    assert plain.alpha_for(2, 4) == 8.0
    assert plain.alpha_for(3, 4) == 12.0
    rslora = AlphaPolicy(lora_alpha=16, use_rslora=True)
    assert rslora.alpha_for(8, 4) == 16.0 and isinstance(rslora.alpha_for(8, 4), float)
    assert rslora.alpha_for(1, 4) == 16.0


def test_timestep_focus_record_of_a_focus_and_back():
    focus = TimestepFocus("custom", (0.25, 0.5))
    rec = TimestepFocusRecord.of(focus, applied=True, observed_range=(0.3, 0.45))
    assert rec == TimestepFocusRecord(name="custom", range=(0.25, 0.5), applied=True, observed_range=(0.3, 0.45))
    assert rec.focus == focus
    assert TimestepFocusRecord.of(TimestepFocus("balanced"), applied=False) == TimestepFocusRecord()
    assert TimestepFocusRecord().focus == TimestepFocus("balanced", None)


def test_ranks_alphas_and_costs_of_keep_order_and_falsy_values():
    modules = [
        record("b", rank=0, alpha=0.0, rank_cost=7),  # falsy but adapted
        record("a", rank=None, alpha=None, rank_cost=5),  # excluded
        record("c", rank=2, alpha=4.0, rank_cost=9),
    ]
    assert list(ranks_of(modules).items()) == [("b", 0), ("c", 2)]
    assert list(alphas_of(modules).items()) == [("b", 0.0), ("c", 4.0)]
    assert list(rank_costs_of(modules).items()) == [("b", 7), ("a", 5), ("c", 9)]
    assert ranks_of(iter(modules)) == {"b": 0, "c": 2}  # any iterable


def test_stopping_methods_are_still_importable_from_records():
    from lightning_fisher.allocation.criteria import STOPPING_METHODS

    assert records.STOPPING_METHODS is STOPPING_METHODS
    with pytest.raises(AttributeError, match=r"^module 'lightning_fisher.fisher_map.records' has no attribute 'nope'$"):
        records.nope
