"""The user's module names under torch's wrappers: checkpointing, compile, FSDP1, DDP / DataParallel."""

import peft
import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from lightning_fisher import FisherMap, select_candidates
from lightning_fisher.analysis.fingerprint import model_fingerprint
from lightning_fisher.analysis.module_names import named_modules, unwrapped_model, user_name
from lightning_fisher.peft_factory import adapter_ranks
from lightning_fisher.peft_factory.export import adapter_state_dict


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))


def checkpointed(net):
    inner = net[2]
    apply_activation_checkpointing(net, check_fn=lambda m: m is inner[0] or m is inner[1])
    return net


@pytest.mark.parametrize(
    ("wrapped", "plain"),
    [
        ("layers.0._checkpoint_wrapped_module.attn.q", "layers.0.attn.q"),
        ("_fsdp_wrapped_module.layers.1._fsdp_wrapped_module.mlp", "layers.1.mlp"),
        ("_orig_mod.blocks.2._orig_mod.proj", "blocks.2.proj"),
        ("module.encoder", "module.encoder"),  # a user's own "module" attribute stays
    ],
)
def test_user_name_drops_only_wrapper_components(wrapped, plain):
    assert user_name(wrapped) == plain


def test_root_wrappers_are_unwrapped():
    net = model()
    assert unwrapped_model(nn.DataParallel(net)) is net
    assert unwrapped_model(torch.compile(net)) is net  # compiles lazily: nothing runs here
    assert unwrapped_model(nn.DataParallel(torch.compile(net))) is net


@pytest.mark.parametrize("wrap", [checkpointed, torch.compile, nn.DataParallel], ids=["checkpoint", "compile", "dp"])
def test_candidates_fingerprint_and_map_use_the_users_names(wrap):
    plain = model()
    wrapped = wrap(model())
    assert list(select_candidates(wrapped)) == list(select_candidates(plain)) == ["0", "2.0", "2.1"]
    assert model_fingerprint(wrapped) == model_fingerprint(plain)
    scores = {"0": 1.0, "2.0": 2.0, "2.1": 3.0}
    assert FisherMap.from_scores(scores, wrapped).to_dict()["model"] == FisherMap.from_scores(scores, plain).to_dict()["model"]


def test_a_wrapper_and_the_layer_it_wraps_are_one_name():
    names = dict(named_modules(checkpointed(model())))
    assert isinstance(names["2.0"], nn.Linear) and "2.0._checkpoint_wrapped_module" not in names


def test_adapters_of_checkpoint_wrapped_layers_keep_their_names_and_are_exported():
    plain, wrapped = model(), model()
    config = dict(r=2, target_modules=r"0|2\.1", init_lora_weights="gaussian")  # regex: full names
    for net in (plain, wrapped):
        torch.manual_seed(1)
        peft.inject_adapter_in_model(peft.LoraConfig(**config), net)
    checkpointed(wrapped)
    assert adapter_ranks(wrapped) == adapter_ranks(plain) == {"0": 2, "2.1": 2}
    exported, expected = adapter_state_dict(wrapped), adapter_state_dict(plain)
    assert set(exported) == set(expected) == {f"base_model.model.{m}.lora_{f}.weight" for m in ("0", "2.1") for f in "AB"}
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key


# --- what mutation testing (benchmarks/mutation.py) found untested -----------------------------


def test_only_a_compiled_module_is_unwrapped_through_orig_mod_and_fsdp1_roots_are_unwrapped():
    class Holder(nn.Module):  # a user's module that happens to keep a module under that name
        def __init__(self):
            super().__init__()
            self._orig_mod = nn.Linear(2, 2)

    holder = Holder()
    assert unwrapped_model(holder) is holder

    class FakeFSDP1(nn.Module):  # what FSDP1's root looks like to unwrapped_model
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    inner = nn.Sequential(nn.Linear(2, 2))
    assert unwrapped_model(FakeFSDP1(inner)) is inner
    assert [name for name, _ in named_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))] == ["0", "1"]  # no root
