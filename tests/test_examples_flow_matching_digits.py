"""The flow-matching example: an SD3Transformer2DModel's map applied with add_adapter, saved and loaded by diffusers."""

import pytest

from _diffusers_examples import LORA_FILE, assert_round_trip, expected_layout, run_example

from lightning_fisher import FisherMap

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example run as a user runs it: ``python -m ... OUT_DIR``; its folder and record."""
    out = tmp_path_factory.mktemp("flow_matching_digits")
    record, _, stderr = run_example("flow_matching_digits", out)
    assert "received no gradient" not in stderr  # the one module that cannot learn is excluded
    return out, record


def fresh_base(out):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(out / "base")


@pytest.mark.slow
def test_every_module_has_the_maps_rank_and_alpha_after_the_sd3_round_trip(example):
    assert_round_trip(*example)


@pytest.mark.slow
def test_the_lora_file_names_each_module_as_the_map_does_under_transformer(example):
    out, record = example
    fisher_map = FisherMap.load(out)
    expected = sorted(f"transformer.{name}.lora_{ab}.weight" for name in fisher_map.ranks for ab in "AB")
    assert record["lora_file_keys"] == expected
    # the last block is context_pre_only: its text queries feed nothing, so they are not even a candidate
    assert record["exclude"] == ["transformer_blocks.1.attn.add_q_proj"]
    assert "transformer_blocks.1.attn.add_q_proj" not in {m.name for m in fisher_map.modules}


@pytest.mark.slow
def test_the_focused_analysis_drew_only_texture_sigmas(example):
    out, record = example
    low, high = record["analysis_sigmas"]
    assert 0.0 < low < 0.05 and 0.6 < high < 0.67  # shift 3: texture's t <= 0.4 is sigma <= 0.667
    assert record["observed_sigmas"] == pytest.approx([low, high])  # what the map records, as sigmas
    focus = FisherMap.load(out).analysis.timestep_focus
    assert focus.name == "texture" and focus.applied and record["focus"] == "texture"


@pytest.mark.slow
def test_the_models_own_load_lora_adapter_reads_the_file_with_its_default_prefix(example):
    import torch

    from lightning_fisher import verify_adapter_ranks
    from lightning_fisher.examples.diffusers_digits import lora_layout

    out, _ = example
    fisher_map = FisherMap.load(out)
    transformer = fresh_base(out)
    transformer.load_lora_adapter(out / "lora", weight_name=LORA_FILE, adapter_name="digits")  # prefix="transformer"
    assert verify_adapter_ranks(transformer, fisher_map, adapter_name="digits") == fisher_map.ranks
    layout = lora_layout(transformer, "digits")
    assert {name: pytest.approx(list(value)) for name, value in layout.items()} == expected_layout(fisher_map)
    x, label = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 10)
    assert transformer(x, label, label[:, 0], torch.tensor([500.0])).sample.shape == x.shape
