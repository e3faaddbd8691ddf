"""adapter_scaling and learning_rate_warnings: scalings and the warnings' exact text."""

import math

import peft
import pytest

from lightning_fisher.peft_factory import adapter_scaling, learning_rate_warnings
from lightning_fisher.peft_factory.plan import MapApplication


def application(ranks, alphas):
    return MapApplication(config=None, ranks=dict(ranks), alphas=dict(alphas), excluded=[])


@pytest.mark.parametrize(("alpha", "rank", "rslora", "expected"), [
    (16.0, 8, False, 2.0),
    (16.0, 4, True, 8.0),
    (6.0, 9, True, 2.0),
    (6.0, 9, False, 6.0 / 9),
    (3.0, 1, True, 3.0),
])
def test_adapter_scaling_is_alpha_over_rank_or_its_square_root(alpha, rank, rslora, expected):
    assert adapter_scaling(alpha, rank, use_rslora=rslora) == pytest.approx(expected, rel=1e-12)


def test_adapter_scaling_defaults_to_plain_lora():
    assert adapter_scaling(8.0, 4) == 2.0


def test_constant_scaling_gives_no_warning():
    app = application({"a": 2, "b": 8, "c": 32}, {"a": 4.0, "b": 16.0, "c": 64.0})
    config = peft.LoraConfig(r=8, lora_alpha=16)
    assert learning_rate_warnings(1e-3, app, config, "lora", 8) == []


def test_rslora_map_warns_with_the_largest_scaling_and_a_smaller_learning_rate():
    # alpha constant under rsLoRA: rank 2 scales by 16 / sqrt(2), flat rank 8 by 16 / sqrt(8): twice
    app = application({"b": 8, "a": 2, "c": 32}, {"b": 16.0, "a": 16.0, "c": 16.0})
    config = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True)
    assert learning_rate_warnings(1e-3, app, config, "lora", 8) == [
        "the fisher map raises the largest adapter scaling to 2.00x flat LoRA's at rank 8 "
        "(a: rank 2, alpha 16, scaling 11.3 vs 5.66), so at learning rate 0.001 its largest step is "
        "2.00x flat LoRA's; for the same largest step use about 0.0005 and watch validation closely"
    ]


def test_without_rslora_the_same_map_scales_by_alpha_over_rank():
    app = application({"b": 8, "a": 2, "c": 32}, {"b": 16.0, "a": 16.0, "c": 16.0})
    config = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=False)
    (warning,) = learning_rate_warnings(2e-4, app, config, "lora", 8)
    assert warning.startswith("the fisher map raises the largest adapter scaling to 4.00x flat LoRA's at rank 8 "
                              "(a: rank 2, alpha 16, scaling 8 vs 2)")
    assert "use about 5e-05 and" in warning


def test_loha_reads_its_alpha_option_and_never_uses_rslora():
    app = application({"x": 4, "y": 16}, {"x": 12.0, "y": 12.0})
    config = peft.LoHaConfig(r=8, alpha=12)
    (warning,) = learning_rate_warnings(1e-3, app, config, "loha", 8)
    assert "to 2.00x flat LoRA's at rank 8 (x: rank 4, alpha 12, scaling 3 vs 1.5)" in warning


def test_the_flat_scaling_comes_from_the_config_alpha():
    app = application({"x": 8}, {"x": 16.0})
    assert learning_rate_warnings(1e-3, app, peft.LoraConfig(r=8, lora_alpha=16), "lora", 8) == []
    (warning,) = learning_rate_warnings(1e-3, app, peft.LoraConfig(r=8, lora_alpha=8), "lora", 8)
    assert "to 2.00x flat LoRA's at rank 8 (x: rank 8, alpha 16, scaling 2 vs 1)" in warning
    assert learning_rate_warnings(1e-3, app, peft.LoraConfig(r=8, lora_alpha=32), "lora", 8) == []


def test_the_base_rank_sets_the_flat_scaling():
    app = application({"x": 4}, {"x": 8.0})
    config = peft.LoraConfig(r=4, lora_alpha=8)
    assert learning_rate_warnings(1e-3, app, config, "lora", 4) == []
    (warning,) = learning_rate_warnings(1e-3, app, config, "lora", 16)
    assert "to 4.00x flat LoRA's at rank 16 (x: rank 4, alpha 8, scaling 2 vs 0.5)" in warning


@pytest.mark.parametrize(("rank", "warns"), [(8, False), (7, True), (9, False)])
def test_a_scaling_just_above_flat_warns(rank, warns):
    # 8 / 7 = 1.14x flat; exactly flat or below: silent
    app = application({"x": rank}, {"x": 8.0})
    config = peft.LoraConfig(r=8, lora_alpha=8)
    assert len(learning_rate_warnings(1e-3, app, config, "lora", 8)) == int(warns)


def test_a_ratio_within_rounding_of_one_is_silent():
    app = application({"x": 3}, {"x": 3.0 * (1 + 1e-12)})
    assert learning_rate_warnings(1e-3, app, peft.LoraConfig(r=3, lora_alpha=3), "lora", 3) == []


def test_a_ratio_exactly_at_the_tolerance_is_silent():
    app = application({"x": 1}, {"x": 1 + 1e-9})
    assert learning_rate_warnings(1e-3, app, peft.LoraConfig(r=1, lora_alpha=1), "lora", 1) == []
    app = application({"x": 1}, {"x": 1 + 2e-9})
    assert len(learning_rate_warnings(1e-3, app, peft.LoraConfig(r=1, lora_alpha=1), "lora", 1)) == 1


def test_a_ceiling_warns_only_above_it():
    app = application({"x": 8}, {"x": 16.0})
    config = peft.LoraConfig(r=8, lora_alpha=16)
    assert learning_rate_warnings(2e-4, app, config, "lora", 8, ceiling=(2e-4, "fragile task")) == []
    assert learning_rate_warnings(1e-4, app, config, "lora", 8, ceiling=(2e-4, "fragile task")) == []
    assert learning_rate_warnings(3e-4, app, config, "lora", 8, ceiling=(2e-4, "fragile task")) == [
        "adapter learning rate 0.0003 is above 0.0002 (fragile task): a fisher map concentrates adapter "
        "capacity where the data pulls hardest, so it adapts faster and can overfit sooner than flat ranks; "
        "consider at most 0.0002 and watch validation closely"
    ]


def test_no_ceiling_by_default_and_a_zero_ceiling_counts():
    app = application({"x": 8}, {"x": 16.0})
    config = peft.LoraConfig(r=8, lora_alpha=16)
    assert learning_rate_warnings(1e3, app, config, "lora", 8) == []
    (warning,) = learning_rate_warnings(1e-6, app, config, "lora", 8, ceiling=(0.0, "no training"))
    assert warning.startswith("adapter learning rate 1e-06 is above 0 (no training)")


def test_both_warnings_scaling_first():
    app = application({"x": 2}, {"x": 16.0})
    config = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True)
    warnings = learning_rate_warnings(1e-3, app, config, "lora", 8, ceiling=(5e-4, "why"))
    assert [w.split(" ")[:3] for w in warnings] == [["the", "fisher", "map"], ["adapter", "learning", "rate"]]
    assert f"use about {1e-3 / math.sqrt(4):.2g} " in warnings[0]
