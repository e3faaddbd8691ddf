"""The diffusers example: a UNet2DConditionModel's map applied with add_adapter, saved and loaded by diffusers."""

import logging

import pytest
import torch

from _diffusers_examples import LORA_FILE, assert_round_trip, expected_layout, run_example

from lightning_fisher import FisherMap

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example run as a user runs it: ``python -m ... OUT_DIR``; its folder and record."""
    out = tmp_path_factory.mktemp("diffusers_digits")
    return out, run_example("diffusers_digits", out)[0]


def fresh_base(out):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(out / "base")


@pytest.mark.slow
def test_every_module_has_the_maps_rank_and_alpha_after_the_diffusers_round_trip(example):
    assert_round_trip(*example)


@pytest.mark.slow
def test_the_lora_file_names_each_module_as_the_map_does_under_unet(example):
    out, record = example
    fisher_map = FisherMap.load(out)
    expected = sorted(f"unet.{name}.lora_{ab}.weight" for name in fisher_map.ranks for ab in "AB")
    assert record["lora_file_keys"] == expected
    assert set(fisher_map.excluded)  # modules the map leaves out have no keys
    assert not any(f"unet.{name}.lora_" in key for name in fisher_map.excluded for key in expected)


@pytest.mark.slow
def test_the_focused_analysis_drew_only_texture_steps_of_the_scheduler(example):
    out, record = example
    assert record["focus_steps"] == [0, 399]
    lo, hi = record["analysis_steps"]
    assert 0 <= lo <= 40 and 360 <= hi <= 399  # the low-noise end, and all of it
    assert record["observed_steps"] == [lo, hi]  # what the map records, in the scheduler's steps
    focus = FisherMap.load(out).analysis.timestep_focus
    assert focus.name == "texture" and focus.applied


@pytest.mark.slow
def test_without_the_metadata_diffusers_keeps_the_ranks_but_not_the_alphas(example):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    out, _ = example
    fisher_map = FisherMap.load(out)
    state_dict, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(out / "lora")
    unet = fresh_base(out)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, network_alphas, unet, adapter_name="bare")
    from lightning_fisher.examples.diffusers_digits import lora_layout

    layout = lora_layout(unet, "bare")
    assert {name: rank for name, (rank, _) in layout.items()} == fisher_map.ranks  # ranks from lora_B's shape
    expected = expected_layout(fisher_map)
    lost = [name for name, (_, scale) in layout.items() if scale != pytest.approx(expected[name][1])]
    assert lost  # the map's alphas are not in the weights; diffusers 0.42 sets each to its rank (scale 1)


@pytest.mark.slow
def test_the_models_own_load_lora_adapter_needs_the_unet_prefix(example, caplog, tmp_path):
    from lightning_fisher import verify_adapter_ranks

    out, _ = example
    fisher_map = FisherMap.load(out)
    unet = fresh_base(out)
    with caplog.at_level(logging.WARNING):
        unet.load_lora_adapter(out / "lora", weight_name=LORA_FILE, adapter_name="default_prefix")
    assert "No LoRA keys" in caplog.text and "prefix='transformer'" in caplog.text
    assert not getattr(unet, "peft_config", {})  # the default prefix is a transformer's: nothing loaded
    unet.load_lora_adapter(out / "lora", weight_name=LORA_FILE, prefix="unet", adapter_name="digits")
    assert verify_adapter_ranks(unet, fisher_map, adapter_name="digits") == fisher_map.ranks
    x = torch.zeros(1, 1, 16, 16)
    assert unet(x, torch.tensor([10]), encoder_hidden_states=torch.zeros(1, 1, 10)).sample.shape == x.shape
    # the model's own pair: save_lora_adapter writes no prefix (and always the metadata), so prefix=None
    from lightning_fisher.examples.diffusers_digits import lora_layout

    unet.save_lora_adapter(tmp_path, adapter_name="digits")
    again = fresh_base(out)
    again.load_lora_adapter(tmp_path, weight_name=LORA_FILE, prefix=None, adapter_name="digits")
    reloaded = lora_layout(again, "digits")
    assert reloaded == lora_layout(unet, "digits")
    assert {name: pytest.approx(list(value)) for name, value in reloaded.items()} == expected_layout(fisher_map)
