import dataclasses
import math
import warnings

import peft
import pytest
import torch
from _nets import CollidingNet, linear_names
from torch import nn

from lightning_fisher import (
    AdapterRankMismatchError,
    FisherMap,
    FisherMapOverrideWarning,
    lora_config_from_fisher_map,
    peft_config_from_fisher_map,
    verify_adapter_ranks,
)
from lightning_fisher.peft_factory import adapter_ranks, plan_from_fisher_map


def spread_scores(names, excluded=()):
    """Scores whose square-root ranks differ from module to module."""
    scores = {name: float((index % 7 + 1) ** 2) for index, name in enumerate(names)}
    for name in excluded:
        scores[name] = 0.0
    return scores


@pytest.fixture
def colliding():
    torch.manual_seed(0)
    model = CollidingNet()
    scores = spread_scores(linear_names(model), excluded=("pooler.dense", "q"))
    # prefix collision with different ranks, and the whole-name/suffix pair split
    scores["layers.1.q"] = 1.0
    scores["layers.10.q"] = 49.0
    scores["inner.q"] = 25.0
    fmap = FisherMap.from_scores(scores, model, rank=8, rank_min=2, rank_max=32)
    return model, fmap


def lora_a_ranks(model):
    return {
        name: module.lora_A["default"].weight.shape[0]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def test_map_ranks_are_distinct_where_names_collide(colliding):
    _, fmap = colliding
    assert fmap.ranks["layers.1.q"] != fmap.ranks["layers.10.q"]
    assert "pooler.dense" in fmap.excluded and "layers.0.dense" in fmap.ranks
    assert "q" in fmap.excluded and "inner.q" in fmap.ranks


@pytest.mark.parametrize("inject", ["get_peft_model", "inject_adapter_in_model"])
def test_injection_on_colliding_names(colliding, inject):
    model, fmap = colliding
    config = lora_config_from_fisher_map(fmap)
    if inject == "get_peft_model":
        tuned = peft.get_peft_model(model, config)
        root = tuned.base_model.model
    else:
        tuned = peft.inject_adapter_in_model(config, model)
        root = tuned
    assert lora_a_ranks(root) == fmap.ranks
    modules = dict(root.named_modules())
    for name in fmap.excluded:
        assert type(modules[name]) is nn.Linear  # untouched
    assert verify_adapter_ranks(tuned, fmap) == fmap.ranks
    # scaling alpha / r is the same everywhere (alpha = 2r at the base rank)
    scalings = {modules[name].scaling["default"] for name in fmap.ranks}
    assert scalings == {2.0}


def test_tampered_map_fails_verification(colliding):
    model, fmap = colliding
    peft.inject_adapter_in_model(lora_config_from_fisher_map(fmap), model)
    records = list(fmap.modules)
    index = next(i for i, m in enumerate(records) if m.name == "layers.10.q")
    records[index] = dataclasses.replace(records[index], rank=records[index].rank - 1)
    unexcluded = next(i for i, m in enumerate(records) if m.name == "pooler.dense")
    records[unexcluded] = dataclasses.replace(records[unexcluded], rank=4, alpha=8.0)
    tampered = dataclasses.replace(fmap, modules=tuple(records))
    with pytest.raises(AdapterRankMismatchError) as excinfo:
        verify_adapter_ranks(model, tampered)
    message = str(excinfo.value)
    assert "layers.10.q: adapter rank" in message
    assert "pooler.dense: no adapter" in message
    assert "layers.1.q" not in message


def test_verification_reports_adapter_on_excluded_module(colliding):
    model, fmap = colliding
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["dense", "q"]), model)
    with pytest.raises(AdapterRankMismatchError) as excinfo:
        verify_adapter_ranks(model, fmap)
    message = str(excinfo.value)
    assert "pooler.dense: has a rank-4 adapter but is excluded by the map" in message
    assert "q: has a rank-4 adapter but is excluded" in message


def test_map_file_path_is_accepted(colliding, tmp_path):
    model, fmap = colliding
    fmap.save(tmp_path)
    config = lora_config_from_fisher_map(tmp_path, lora_dropout=0.1)
    assert config.lora_dropout == 0.1
    assert config.rank_pattern == fmap.rank_pattern and config.alpha_pattern == fmap.alpha_pattern
    assert config.target_modules == fmap.target_modules


def test_user_alpha_and_rslora(colliding):
    model, fmap = colliding
    config = lora_config_from_fisher_map(fmap, lora_alpha=4, use_rslora=True)
    peft.inject_adapter_in_model(config, model)
    modules = dict(model.named_modules())
    for name, rank in fmap.ranks.items():
        # rsLoRA: alpha is the same for every module, scaling alpha / sqrt(r)
        assert math.isclose(modules[name].scaling["default"], 4 / math.sqrt(rank))
    plain = lora_config_from_fisher_map(fmap, lora_alpha=4)
    for name, rank in fmap.ranks.items():
        assert math.isclose(plain.alpha_pattern["^" + name.replace(".", "\\.")], 4 * rank / 8)


def test_overridden_settings_are_reported(colliding):
    _, fmap = colliding
    with pytest.warns(FisherMapOverrideWarning, match=r"r=16.*target_modules=\['q'\]"):
        config = lora_config_from_fisher_map(fmap, r=16, target_modules=["q"])
    assert config.target_modules == fmap.target_modules
    plan = plan_from_fisher_map(fmap, r=16)
    assert plan.overridden == {"r": 16}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_config_from_fisher_map(fmap, lora_dropout=0.0)  # nothing overridden, nothing said


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = CollidingNet()
        self.extra = nn.Linear(8, 8)


def test_adapter_root_rebases_names():
    wrapper = Wrapper()
    scores = spread_scores(linear_names(wrapper))
    fmap = FisherMap.from_scores(scores, wrapper, rank=8, rank_min=2, rank_max=32)
    plan = plan_from_fisher_map(fmap, adapter_root="model")
    assert plan.outside_root == ["extra"]
    assert set(plan.ranks) == {name[len("model."):] for name in fmap.ranks if name.startswith("model.")}
    tuned = peft.get_peft_model(wrapper.model, plan.config)
    verify_adapter_ranks(tuned, fmap, adapter_root="model")
    assert lora_a_ranks(tuned.base_model.model) == plan.ranks
    with pytest.raises(ValueError, match="adapter_root='encoder'"):
        plan_from_fisher_map(fmap, adapter_root="encoder")


def test_dora_passes_through(colliding):
    model, fmap = colliding
    peft.inject_adapter_in_model(lora_config_from_fisher_map(fmap, use_dora=True), model)
    modules = dict(model.named_modules())
    for name, rank in fmap.ranks.items():
        assert "default" in modules[name].lora_magnitude_vector
    verify_adapter_ranks(model, fmap)


@pytest.mark.parametrize("adapter", ["loha", "lokr"])
def test_loha_and_lokr_take_the_map(colliding, adapter):
    model, fmap = colliding
    config = peft_config_from_fisher_map(fmap, adapter=adapter)
    assert type(config).__name__ == {"loha": "LoHaConfig", "lokr": "LoKrConfig"}[adapter]
    tuned = peft.get_peft_model(model, config)
    assert adapter_ranks(tuned) == fmap.ranks
    verify_adapter_ranks(tuned, fmap)


def test_real_minilm_encoder(minilm_path):
    transformers = pytest.importorskip("transformers")
    encoder = transformers.AutoModel.from_pretrained(minilm_path)
    names = linear_names(encoder)
    assert len(names) == 37 and "pooler.dense" in names and "encoder.layer.0.attention.output.dense" in names
    generator = torch.Generator().manual_seed(0)
    scores = {name: float(torch.rand((), generator=generator)) + 0.01 for name in names}
    scores["pooler.dense"] = 0.0
    fmap = FisherMap.from_scores(scores, encoder, rank=8, rank_min=2, rank_max=32, mode="budget")
    assert "pooler.dense" in fmap.excluded
    assert len(set(fmap.ranks.values())) > 3
    for inject in ("get_peft_model", "inject_adapter_in_model"):
        model = transformers.AutoModel.from_pretrained(minilm_path)
        config = lora_config_from_fisher_map(fmap)
        tuned = peft.get_peft_model(model, config) if inject == "get_peft_model" else peft.inject_adapter_in_model(config, model)
        root = tuned.base_model.model if inject == "get_peft_model" else tuned
        assert lora_a_ranks(root) == fmap.ranks
        assert type(dict(root.named_modules())["pooler.dense"]) is nn.Linear
        verify_adapter_ranks(tuned, fmap)
        trainable = sum(p.numel() for n, p in root.named_parameters() if "lora_" in n)
        assert trainable == fmap.budget.lora_parameters


def test_eva_initialisation_is_refused(colliding):
    _, fmap = colliding
    with pytest.raises(ValueError, match="EVA"):
        lora_config_from_fisher_map(fmap, init_lora_weights="eva")


def test_rebase_names_and_root_module():
    from lightning_fisher.peft_factory import rebase_names, root_module

    names = ["model.a", "model.b.c", "head", "modelx.d"]
    assert rebase_names(names, "model") == ({"a": "model.a", "b.c": "model.b.c"}, ["head", "modelx.d"])
    assert rebase_names(names, "model.") == rebase_names(names, "model")
    assert rebase_names(names, None) == ({name: name for name in names}, [])
    wrapper = Wrapper()
    assert root_module(wrapper, "model") is wrapper.model and root_module(wrapper, "") is wrapper


def test_adapter_options_in_one_place(colliding):
    from lightning_fisher.peft_factory import ADAPTER_CONFIGS, MAP_OWNED_OPTIONS, alpha_option, alpha_policy, config_class

    _, fmap = colliding
    assert config_class("lokr") is peft.LoKrConfig and set(ADAPTER_CONFIGS) == {"lora", "loha", "lokr"}
    with pytest.raises(ValueError, match="adapter: must be one of lora, loha, lokr, got 'ia3'"):
        config_class("ia3")
    assert [alpha_option(a) for a in ("lora", "loha", "lokr")] == ["lora_alpha", "alpha", "alpha"]
    assert "r" in MAP_OWNED_OPTIONS and "lora_dropout" not in MAP_OWNED_OPTIONS
    assert alpha_policy(fmap, "lora", {}) == fmap.alpha
    mine = alpha_policy(fmap, "lora", {"lora_alpha": 4, "use_rslora": True})
    assert (mine.lora_alpha, mine.use_rslora) == (4.0, True)
    assert alpha_policy(fmap, "loha", {"alpha": 3, "use_rslora": True}).use_rslora is False  # no rsLoRA for LoHa


def test_changed_modules_between_two_rank_maps():
    from lightning_fisher.peft_factory import changed_modules

    assert changed_modules({"a": 4, "b": 8}, {"a": 4, "b": 8}) == []
    assert changed_modules({"a": 4, "b": 8, "c": 2}, {"a": 5, "b": 8, "d": 2}) == ["c", "d", "a"]


def test_rebase_names_strips_exactly_the_root_and_root_module_of_none():
    from lightning_fisher.peft_factory import rebase_names, root_module

    assert rebase_names(["modelX.a", "model.a"], "modelX") == ({"a": "modelX.a"}, ["model.a"])
    assert rebase_names(["m.a", "ma"], "m...") == ({"a": "m.a"}, ["ma"])
    wrapper = Wrapper()
    assert root_module(wrapper, None) is wrapper


def with_alpha(fmap, **policy):
    from lightning_fisher.fisher_map.records import AlphaPolicy

    return dataclasses.replace(fmap, alpha=AlphaPolicy(**policy))


def test_a_maps_rslora_is_kept_unless_you_say_otherwise(colliding):
    from lightning_fisher.peft_factory import alpha_policy

    _, fmap = colliding
    rs = with_alpha(fmap, lora_alpha=16.0, use_rslora=True)
    assert alpha_policy(rs, "lora", {}).use_rslora is True
    assert alpha_policy(rs, "lora", {"use_rslora": False}).use_rslora is False
    assert alpha_policy(rs, "lora", {"lora_alpha": 0}).lora_alpha == 0.0  # falsy but given
    assert lora_config_from_fisher_map(rs).use_rslora is True
    assert lora_config_from_fisher_map(fmap).use_rslora is False


class Tagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 5)
        self.other = nn.Linear(5, 5)


def test_adapter_ranks_read_the_weights_of_the_named_adapter_only():
    model = Tagged()
    peft.inject_adapter_in_model(peft.LoraConfig(r=3, target_modules=["emb", "fc"]), model)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["other"]), model, adapter_name="second")
    assert adapter_ranks(model) == {"emb": 3, "fc": 3}
    assert adapter_ranks(model, "second") == {"other": 2}
    model.fc.r["default"] = 7  # the weights decide, not the layer's r
    model.emb.r["default"] = 9
    assert adapter_ranks(model) == {"emb": 3, "fc": 3}
    ia3 = peft.inject_adapter_in_model(peft.IA3Config(target_modules=["fc"], feedforward_modules=[]), Tagged())
    assert adapter_ranks(ia3) == {}  # a tuner layer without ranks


def test_adapter_ranks_of_loha_come_from_r():
    model = peft.inject_adapter_in_model(peft.LoHaConfig(r=3, target_modules=["fc"]), Tagged())
    assert adapter_ranks(model) == {"fc": 3}


@pytest.fixture
def wrapped_map():
    torch.manual_seed(0)
    wrapper = Wrapper()
    names = linear_names(wrapper)
    scores = spread_scores(names, excluded=("model.pooler.dense", "model.q"))
    return wrapper, FisherMap.from_scores(scores, wrapper, rank=6, rank_min=2, rank_max=32)


def test_plan_fields_under_an_adapter_root(wrapped_map):
    _, fmap = wrapped_map
    plan = plan_from_fisher_map(fmap, adapter_root="model")
    assert plan.excluded == ["q", "pooler.dense"]
    assert plan.ranks == {n[len("model."):]: r for n, r in fmap.ranks.items() if n.startswith("model.")}
    assert plan.alphas == {n: fmap.alpha.alpha_for(r, 6) for n, r in plan.ranks.items()}
    assert plan.config.r == 6 and plan.config.lora_alpha == fmap.alpha.alpha_for(6, 6) == 12.0
    loha = plan_from_fisher_map(fmap, adapter="loha", adapter_root="model").config
    assert (loha.r, loha.alpha) == (6, 12.0)


def test_the_config_functions_pass_the_adapter_root_and_default_to_lora(wrapped_map):
    _, fmap = wrapped_map
    expected = plan_from_fisher_map(fmap, adapter_root="model").config
    config = peft_config_from_fisher_map(fmap, adapter_root="model")
    assert type(config) is peft.LoraConfig and config.target_modules == expected.target_modules
    assert "extra" not in config.target_modules
    lora = lora_config_from_fisher_map(fmap, adapter_root="model")
    assert lora.target_modules == expected.target_modules and lora.rank_pattern == expected.rank_pattern


def test_verification_under_a_root_names_excluded_and_unknown_modules(wrapped_map):
    wrapper, fmap = wrapped_map
    net = wrapper.model
    net.added = nn.Linear(8, 8)  # after the analysis: not a module the map knows
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["pooler.dense", "added"]), net)
    with pytest.raises(AdapterRankMismatchError) as info:
        verify_adapter_ranks(net, fmap, adapter_root="model")
    lines = str(info.value).splitlines()
    assert lines[0] == f"adapters do not match the fisher map in {len(lines) - 1} module(s):"
    assert "  pooler.dense: has a rank-4 adapter but is excluded by the map" in lines
    assert "  added: has a rank-4 adapter but is not a module the map adapts" in lines


def test_verification_reads_the_named_adapter_and_names_the_map_file(colliding, tmp_path):
    model, fmap = colliding
    fmap.save(tmp_path)
    peft.inject_adapter_in_model(lora_config_from_fisher_map(fmap), model, adapter_name="mine")
    assert verify_adapter_ranks(model, fmap, adapter_name="mine") == fmap.ranks
    with pytest.raises(AdapterRankMismatchError) as info:
        verify_adapter_ranks(model, tmp_path)  # no "default" adapter
    assert str(info.value).startswith(
        f"adapters do not match the fisher map ({tmp_path / 'fisher_map.json'}) in {len(fmap.ranks)} module(s):\n  ")
