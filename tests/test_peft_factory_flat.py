"""Flat LoRA (peft_factory/flat.py) injected with real PEFT, and the adapter parameter count (peft_factory/injected.py)."""

import peft
import torch
from _nets import CollidingNet, linear_names

from lightning_fisher import FisherMap
from lightning_fisher.peft_factory import FLAT_RANK, adapter_parameters, adapter_ranks, count_adapter_parameters, flat_config


def scalings(model):
    return {m.scaling["default"] for m in model.modules() if hasattr(m, "scaling")}


def linear_sizes(model):
    return {name: module.in_features + module.out_features
            for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def test_defaults_every_candidate_at_the_flat_rank_with_scaling_two():
    model = CollidingNet()
    sizes = linear_sizes(model)
    config = flat_config(model)
    assert FLAT_RANK == 8 and config.r == 8 and config.lora_alpha == 16.0
    peft.inject_adapter_in_model(config, model)
    assert adapter_ranks(model) == {name: 8 for name in sizes}
    assert scalings(model) == {2.0}
    assert count_adapter_parameters(model) == 8 * sum(sizes.values())
    assert all(p.requires_grad for p in adapter_parameters(model))
    assert len(adapter_parameters(model)) == 2 * len(sizes)  # lora_A and lora_B, no bias


def test_your_options_win_and_alpha_follows_your_rank():
    model = CollidingNet()
    config = flat_config(model, r=2, target_modules=["head"], lora_dropout=0.1)
    peft.inject_adapter_in_model(config, model)
    assert adapter_ranks(model) == {"head": 2}
    assert config.lora_alpha == 4.0 and config.lora_dropout == 0.1
    assert count_adapter_parameters(model) == 2 * (8 + 3)


def test_standing_in_for_a_map_takes_its_rank_and_alpha():
    model = CollidingNet()
    names = linear_names(model)
    fmap = FisherMap.from_scores({name: float(i + 1) for i, name in enumerate(names)}, model, rank=4, rank_min=1,
                                 rank_max=16, lora_alpha=12.0)
    config = flat_config(model, like=fmap)
    assert config.r == 4 and config.lora_alpha == 12.0
    peft.inject_adapter_in_model(config, model)
    assert set(adapter_ranks(model).values()) == {4} and scalings(model) == {3.0}
    # your rank still wins; the map's alpha stays the alpha at its base rank
    assert flat_config(CollidingNet(), like=fmap, r=16).lora_alpha == 12.0


def test_loha_takes_its_own_alpha_option():
    model = CollidingNet()
    config = flat_config(model, adapter="loha", r=4)
    assert type(config).__name__ == "LoHaConfig" and config.alpha == 8.0
    peft.inject_adapter_in_model(config, model)
    assert set(adapter_ranks(model).values()) == {4}
    assert count_adapter_parameters(model) > 0
