"""quantization_flags and quantization_declared on small models with real bitsandbytes layers."""

import sys

import peft
import pytest
import torch
from torch import nn

from lightning_fisher.peft_factory import quantization_declared, quantization_flags

bnb = pytest.importorskip("bitsandbytes")

WIDTH = 64


def four_bit():
    return bnb.nn.Linear4bit(WIDTH, WIDTH, compute_dtype=torch.float32, quant_type="nf4").to("cpu")


def eight_bit():
    return bnb.nn.Linear8bitLt(WIDTH, WIDTH, has_fp16_weights=False).to("cpu")


def test_flags_follow_the_layers_found_anywhere_under_the_root():
    assert quantization_flags(nn.Sequential(nn.Linear(WIDTH, WIDTH))) == []
    assert quantization_flags(nn.Sequential(nn.Sequential(four_bit()))) == ["is_loaded_in_4bit"]
    assert quantization_flags(nn.Sequential(nn.Linear(WIDTH, WIDTH), eight_bit())) == ["is_loaded_in_8bit"]
    assert quantization_flags(nn.Sequential(eight_bit(), four_bit())) == ["is_loaded_in_4bit", "is_loaded_in_8bit"]


def test_the_root_itself_counts():
    assert quantization_flags(four_bit()) == ["is_loaded_in_4bit"]


def test_no_flags_while_bitsandbytes_is_not_imported(monkeypatch):
    model = nn.Sequential(four_bit())
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    assert quantization_flags(model) == []
    with quantization_declared(model):
        assert not hasattr(model, "is_loaded_in_4bit")


def test_a_bitsandbytes_without_a_layer_class_skips_it(monkeypatch):
    model = nn.Sequential(four_bit(), eight_bit())
    monkeypatch.delattr(bnb.nn, "Linear8bitLt")
    assert quantization_flags(model) == ["is_loaded_in_4bit"]


def test_missing_flags_are_set_inside_and_removed_after():
    model = nn.Sequential(four_bit(), eight_bit())
    with quantization_declared(model):
        assert model.is_loaded_in_4bit is True and model.is_loaded_in_8bit is True
    assert "is_loaded_in_4bit" not in vars(model) and "is_loaded_in_8bit" not in vars(model)


def test_a_false_flag_is_set_and_put_back_false():
    model = nn.Sequential(four_bit(), eight_bit())
    model.is_loaded_in_4bit = False
    with quantization_declared(model):
        assert model.is_loaded_in_4bit is True and model.is_loaded_in_8bit is True
    assert model.is_loaded_in_4bit is False and "is_loaded_in_8bit" not in vars(model)


def test_a_true_flag_is_left_alone():
    model = nn.Sequential(four_bit(), eight_bit())
    model.is_loaded_in_4bit = True
    with quantization_declared(model):
        model.is_loaded_in_4bit = "changed inside"
        assert model.is_loaded_in_8bit is True
    assert model.is_loaded_in_4bit == "changed inside" and "is_loaded_in_8bit" not in vars(model)


class Declared(nn.Sequential):
    is_loaded_in_4bit = False  # a class default, not the instance's own attribute


def test_a_class_default_shows_through_again_after():
    model = Declared(four_bit())
    with quantization_declared(model):
        assert model.is_loaded_in_4bit is True
    assert "is_loaded_in_4bit" not in vars(model) and model.is_loaded_in_4bit is False


def test_flags_are_put_back_when_the_block_fails():
    model = nn.Sequential(four_bit())
    model.is_loaded_in_4bit = 0
    with pytest.raises(RuntimeError):
        with quantization_declared(model):
            raise RuntimeError("injection failed")
    assert model.is_loaded_in_4bit == 0 and type(model.is_loaded_in_4bit) is int


def test_peft_picks_its_bnb_layers_inside_the_block():
    model = nn.Sequential(four_bit(), eight_bit())
    with quantization_declared(model):
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0", "1"]), model)
    assert isinstance(model[0], peft.tuners.lora.bnb.Linear4bit)
    assert isinstance(model[1], peft.tuners.lora.bnb.Linear8bitLt)
    plain = nn.Sequential(four_bit())
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"]), plain)
    assert not isinstance(plain[0], peft.tuners.lora.bnb.Linear4bit)
