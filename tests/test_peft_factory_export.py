"""adapter_state_dict and save_adapter on small models with real PEFT adapters and real files."""

import json

import peft
import pytest
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from lightning_fisher.peft_factory import adapter_state_dict, save_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # a second adapter


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.inner(x))


def base():
    torch.manual_seed(0)
    return Net()


def adapted(**extra):
    model = base()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["inner.0", "out"], rank_pattern={"out": 3}, **extra)
    peft.inject_adapter_in_model(config, model)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            nn.init.normal_(parameter)  # lora_B starts at zero: give every weight a value
    return model


KEYS = {
    "base_model.model.inner.0.lora_A.weight": (2, 6),
    "base_model.model.inner.0.lora_B.weight": (6, 2),
    "base_model.model.out.lora_A.weight": (3, 6),
    "base_model.model.out.lora_B.weight": (3, 3),
}


def test_state_holds_every_adapter_weight_under_peft_keys():
    model = adapted()
    state = adapter_state_dict(model)
    assert {key: tuple(value.shape) for key, value in state.items()} == KEYS
    assert torch.equal(state["base_model.model.out.lora_B.weight"], model.out.lora_B["default"].weight)
    assert torch.equal(state["base_model.model.inner.0.lora_A.weight"], model.inner[0].lora_A["default"].weight)
    for value in state.values():
        assert not value.requires_grad and value.device.type == "cpu" and value.is_contiguous()


def test_state_is_a_copy_cut_from_autograd():
    model = adapted()
    state = adapter_state_dict(model)
    assert state["base_model.model.out.lora_A.weight"].grad_fn is None
    assert model.out.lora_A["default"].weight.requires_grad


def test_a_transposed_weight_is_written_contiguous(tmp_path):
    model = adapted()
    layer = model.out.lora_A["default"]
    layer.weight = nn.Parameter(torch.randn(6, 3).t())
    assert not layer.weight.is_contiguous()
    state = adapter_state_dict(model)
    assert state["base_model.model.out.lora_A.weight"].is_contiguous()
    assert torch.equal(state["base_model.model.out.lora_A.weight"], layer.weight)
    save_adapter(model, tmp_path / "adapter", state=state)


def test_state_of_a_named_adapter_only():
    model = adapted()
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["out"]), model, adapter_name="other")
    state = adapter_state_dict(model, adapter_name="other")
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        "base_model.model.out.lora_A.weight": (4, 6), "base_model.model.out.lora_B.weight": (3, 4)}
    assert torch.equal(state["base_model.model.out.lora_A.weight"], model.out.lora_A["other"].weight)
    assert {key: tuple(v.shape) for key, v in adapter_state_dict(model).items()} == KEYS


def test_dora_magnitudes_are_included():
    state = adapter_state_dict(adapted(use_dora=True))
    assert {key for key in state if "magnitude" in key} == {
        "base_model.model.inner.0.lora_magnitude_vector", "base_model.model.out.lora_magnitude_vector"}


def test_keys_are_the_user_s_names_inside_a_compile_wrapper():
    model = adapted()
    compiled = torch.compile(model)  # only wrapped here: compiled at the first call
    assert {key: tuple(v.shape) for key, v in adapter_state_dict(compiled).items()} == KEYS


def test_adapters_of_a_checkpoint_wrapped_layer_are_exported():
    model = adapted()
    expected = adapter_state_dict(model)
    adapted_out = model.out
    apply_activation_checkpointing(model, check_fn=lambda module: module is adapted_out)
    assert "out._checkpoint_wrapped_module.lora_A.default.weight" in dict(model.named_parameters())
    state = adapter_state_dict(model)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], value) for key, value in expected.items())


@pytest.mark.parametrize("call", [adapter_state_dict, save_adapter])
def test_a_missing_adapter_is_an_error(call, tmp_path):
    args = (tmp_path / "x",) if call is save_adapter else ()
    with pytest.raises(ValueError, match=r"^no PEFT adapter 'default' was injected into Linear$"):
        call(nn.Linear(2, 2), *args)
    with pytest.raises(ValueError, match=r"^no PEFT adapter 'nope' was injected into Net$"):
        call(adapted(), *args, adapter_name="nope")
    assert not (tmp_path / "x").exists()


def test_a_given_state_for_a_model_without_adapters_is_an_error(tmp_path):
    state = adapter_state_dict(adapted())
    with pytest.raises(ValueError, match=r"^no PEFT adapter 'default' was injected into Linear$"):
        save_adapter(nn.Linear(2, 2), tmp_path / "x", state=state)
    assert not (tmp_path / "x").exists()


def test_a_given_state_without_a_config_is_an_error(tmp_path):
    model = adapted()
    state = adapter_state_dict(model)
    with pytest.raises(ValueError, match=r"^no PEFT adapter 'other' was injected into Net$"):
        save_adapter(model, tmp_path / "x", adapter_name="other", state=state)
    assert not (tmp_path / "x").exists()


def test_saved_folder_loads_into_a_fresh_base_with_the_same_output(tmp_path):
    model = adapted()
    directory = save_adapter(model, str(tmp_path / "nested" / "adapter"))
    assert directory == tmp_path / "nested" / "adapter" and isinstance(directory, type(tmp_path))
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (2, 4, {"out": 3})
    assert sorted(config["target_modules"]) == ["inner.0", "out"]
    with safetensors.safe_open(str(directory / "adapter_model.safetensors"), "pt") as file:
        assert file.metadata() == {"format": "pt"}
    saved = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    assert saved.keys() == adapter_state_dict(model).keys()
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(saved[key], value)
    loaded = peft.PeftModel.from_pretrained(base(), str(directory))
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
        assert not torch.allclose(base()(x), model(x))


def test_a_given_state_is_what_is_written_and_a_second_save_replaces_it(tmp_path):
    model = adapted()
    state = {key: torch.full_like(value, 0.5) for key, value in adapter_state_dict(model).items()}
    save_adapter(model, tmp_path)
    save_adapter(model, tmp_path, state=state)
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert all(torch.equal(saved[key], state[key]) for key in state) and saved.keys() == state.keys()


def test_a_named_adapter_is_saved_with_its_own_config(tmp_path):
    model = adapted()
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["out"]), model, adapter_name="other")
    save_adapter(model, tmp_path, adapter_name="other")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["target_modules"]) == (4, ["out"])
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert {key: tuple(v.shape) for key, v in saved.items()} == {
        "base_model.model.out.lora_A.weight": (4, 6), "base_model.model.out.lora_B.weight": (3, 4)}


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_weights_are_gathered_into_plain_tensors(one_process_group, tmp_path):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    model = adapted()
    mesh = DeviceMesh("cpu", [0])
    layer = model.out.lora_B["default"]
    whole = layer.weight.detach().clone()
    layer.weight = nn.Parameter(distribute_tensor(whole, mesh, [Shard(0)]))
    assert isinstance(layer.weight, DTensor)
    state = adapter_state_dict(model)
    assert type(state["base_model.model.out.lora_B.weight"]) is torch.Tensor
    assert torch.equal(state["base_model.model.out.lora_B.weight"], whole)
    save_adapter(model, tmp_path / "adapter", state=state)
    saved = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.out.lora_B.weight"], whole)
