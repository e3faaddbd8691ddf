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


class _Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 5)  # rank cost 13
        self.b = torch.nn.Linear(4, 4)  # 8
        self.e = torch.nn.Embedding(10, 3)  # 13
        self.act = torch.nn.ReLU()
        self.conv = torch.nn.Conv2d(1, 1, 1)


def test_flat_lora_on_counts_the_named_supported_modules_as_they_are():
    from lightning_fisher.peft_factory import flat_lora_on

    root = _Mixed()
    assert flat_lora_on(root, ["a", "e", "missing", "act", "conv"], 2) == (2, 2 * (13 + 13))
    assert flat_lora_on(root, ["b"], 3) == (1, 24)
    assert flat_lora_on(root, [], 3) == (0, 0)


def test_candidates_not_in_lists_the_unmentioned_modules_of_the_mentioned_kinds():
    from lightning_fisher.peft_factory import candidates_not_in

    root = _Mixed()
    assert candidates_not_in(root, ["a", "missing", "conv"]) == ["b"]  # Linear only: the embedding is another kind
    assert candidates_not_in(root, iter(["e"])) == []
    assert candidates_not_in(root, ["a", "e"]) == ["b"]
    assert candidates_not_in(root, ["b", "a"]) == []
    assert candidates_not_in(root, ["conv", "act", "missing"]) == []  # no supported kind mentioned
    assert candidates_not_in(root, []) == []
