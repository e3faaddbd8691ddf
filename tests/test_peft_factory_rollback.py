"""injection_undone_on_error: a failed injection leaves the model as it was (real PEFT injections)."""

import peft
import pytest
import torch
from torch import nn

from lightning_fisher.peft_factory import injection_undone_on_error

# PEFT warns when a second adapter goes into a model, and when the failed one is deleted
pytestmark = [
    pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Adapter second was active:UserWarning"),
]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.act = nn.ReLU()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.block = Block()
        self.last = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)


def net():
    torch.manual_seed(0)
    model = Net()
    model.norm.weight.requires_grad_(False)  # one frozen parameter before injection
    return model


def flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


def children_by_identity(model):
    return {name: id(module) for name, module in model.named_modules()}


def test_a_peft_refusal_halfway_unwraps_the_layers_already_wrapped():
    model = net()
    before_modules, before_flags = children_by_identity(model), flags(model)
    # PEFT wraps first and block.q, then refuses the ReLU.
    config = peft.LoraConfig(r=2, target_modules=["first", "block.q", "block.act"])
    with pytest.raises(ValueError, match="is not supported"):
        with injection_undone_on_error(model):
            peft.inject_adapter_in_model(config, model)
    assert children_by_identity(model) == before_modules
    assert type(model.first) is nn.Linear and type(model.block.q) is nn.Linear
    assert flags(model) == before_flags
    assert not hasattr(model, "peft_config")


def test_an_error_after_a_complete_injection_removes_adapters_config_and_freezing():
    model = net()
    before_modules, before_flags = children_by_identity(model), flags(model)
    with pytest.raises(RuntimeError, match="ranks differ"):
        with injection_undone_on_error(model):
            peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["first", "block.q", "last"]), model)
            assert flags(model)["first.base_layer.weight"] is False  # PEFT froze the base
            assert "default" in model.peft_config
            raise RuntimeError("ranks differ")
    assert children_by_identity(model) == before_modules
    assert flags(model) == before_flags
    assert flags(model)["norm.weight"] is False and flags(model)["first.weight"] is True
    assert "peft_config" not in vars(model)


def test_a_layer_at_the_root_itself_is_put_back_on_the_root():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    linears = list(model)
    with pytest.raises(KeyError):
        with injection_undone_on_error(model):
            peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0", "1"]), model)
            raise KeyError("stop")
    assert list(model) == linears and all(type(m) is nn.Linear for m in model)


def test_layers_tuned_before_lose_only_the_failed_adapter():
    model = net()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["first", "block.q"]), model)
    wrapped_first, after_first = model.first, flags(model)
    first_config = model.peft_config["default"]
    with pytest.raises(RuntimeError):
        with injection_undone_on_error(model, adapter_name="second"):
            peft.inject_adapter_in_model(peft.LoraConfig(r=3, target_modules=["first", "last"]), model,
                                         adapter_name="second")
            assert set(model.first.r) == {"default", "second"}
            raise RuntimeError("verification failed")
    assert model.first is wrapped_first
    assert model.first.r == {"default": 2} and set(model.first.lora_A) == {"default"}
    assert model.block.q.r == {"default": 2}
    assert type(model.last) is nn.Linear
    assert flags(model) == after_first
    assert model.peft_config == {"default": first_config}  # it had a config before: kept, less the failed entry


def test_a_tuner_layer_without_ranks_is_left_alone():
    model = net()
    peft.inject_adapter_in_model(peft.IA3Config(target_modules=["first"], feedforward_modules=[]), model)
    ia3_first = model.first
    with pytest.raises(RuntimeError, match="late"):
        with injection_undone_on_error(model, adapter_name="second"):
            peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["last"]), model, adapter_name="second")
            raise RuntimeError("late")
    assert model.first is ia3_first and set(model.first.ia3_l) == {"default"}
    assert type(model.last) is nn.Linear


def test_an_interrupt_is_undone_too():
    model = net()
    before_modules, before_flags = children_by_identity(model), flags(model)
    with pytest.raises(KeyboardInterrupt):
        with injection_undone_on_error(model):
            peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["first"]), model)
            raise KeyboardInterrupt
    assert children_by_identity(model) == before_modules and flags(model) == before_flags


def test_a_successful_injection_is_kept():
    model = net()
    with injection_undone_on_error(model):
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["first", "block.q"]), model)
    assert model.first.r == {"default": 2} and model.block.q.r == {"default": 2}
    assert flags(model)["first.base_layer.weight"] is False
    assert flags(model)["first.lora_A.default.weight"] is True
    assert "default" in model.peft_config


def test_nothing_changes_when_the_block_fails_before_injecting():
    model = net()
    model.peft_config = {"kept": "yes"}
    before_modules, before_flags = children_by_identity(model), flags(model)
    with pytest.raises(ZeroDivisionError):
        with injection_undone_on_error(model):
            1 / 0
    assert children_by_identity(model) == before_modules and flags(model) == before_flags
    assert model.peft_config == {"kept": "yes"}


def test_an_entry_the_config_held_before_is_kept():
    model = net()
    model.peft_config = {"default": "kept", "other": "kept too"}
    with pytest.raises(ZeroDivisionError):
        with injection_undone_on_error(model):  # the default adapter name, already in the config
            1 / 0
    assert model.peft_config == {"default": "kept", "other": "kept too"}


def test_the_default_adapter_is_the_one_removed_from_layers_tuned_before():
    model = net()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["first"]), model, adapter_name="other")
    with pytest.raises(RuntimeError):
        with injection_undone_on_error(model):
            peft.inject_adapter_in_model(peft.LoraConfig(r=3, target_modules=["first", "last"]), model)
            assert set(model.first.r) == {"other", "default"}
            raise RuntimeError("verification failed")
    assert model.first.r == {"other": 2} and type(model.last) is nn.Linear
    assert set(model.peft_config) == {"other"}


def test_a_config_that_is_not_a_dict_is_left_alone_and_the_error_shown():
    model = net()
    model.peft_config = "not a mapping"
    with pytest.raises(ZeroDivisionError):
        with injection_undone_on_error(model):
            1 / 0
    assert model.peft_config == "not a mapping"
