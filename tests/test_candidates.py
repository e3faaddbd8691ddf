"""Candidate selection: PEFT-style name patterns, supported types, useful errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fisher.analysis.candidates import (
    is_supported,
    module_type_name,
    num_parameters,
    rank_cost,
    select_candidates,
    weight_shape,
)
from lightning_fisher.errors import CandidateSelectionError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.value = nn.Linear(8, 8)
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.encoder = nn.ModuleList([Block(), Block()])
        self.conv = nn.Conv2d(1, 1, 3)
        self.head = nn.Module()
        self.head.classifier = nn.Linear(8, 3)
        self.my_classifier = nn.Linear(8, 3)


def test_default_is_every_linear_in_named_modules_order() -> None:
    model = Model()
    got = select_candidates(model)
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(got) == expected
    assert len(got) == 10
    assert got["encoder.0.query"] is model.encoder[0].query


def test_patterns_match_full_name_or_dotted_suffix() -> None:
    model = Model()
    assert list(select_candidates(model, include=["classifier"])) == ["head.classifier"]  # not my_classifier
    assert list(select_candidates(model, include="my_classifier")) == ["my_classifier"]
    assert list(select_candidates(model, include=["query|value"])) == [
        "encoder.0.query", "encoder.0.value", "encoder.1.query", "encoder.1.value",
    ]
    assert list(select_candidates(model, include=[r"encoder\.1\..*"])) == [
        "encoder.1.query", "encoder.1.value", "encoder.1.ffn.0", "encoder.1.ffn.2",
    ]
    # A pattern may span several components: "ffn.0" is a dotted suffix of "encoder.0.ffn.0".
    assert list(select_candidates(model, include=["ffn.0"])) == ["encoder.0.ffn.0", "encoder.1.ffn.0"]
    with pytest.raises(CandidateSelectionError):
        select_candidates(model, include=["uery"])  # a partial component is not a match


def test_exclude_and_types() -> None:
    model = Model()
    got = select_candidates(model, exclude=[r"encoder\..*"])
    assert list(got) == ["head.classifier", "my_classifier"]
    got = select_candidates(model, module_types=[nn.Embedding, nn.Linear], include=["embed", "classifier"])
    assert list(got) == ["embed", "head.classifier"]
    assert list(select_candidates(model, module_types=[nn.Embedding])) == ["embed"]


def test_hf_conv1d_by_name_and_costs() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Module()
    model.c_attn = pytorch_utils.Conv1D(24, 8)  # nf=24 out, nx=8 in; weight [8, 24]
    model.lin = nn.Linear(8, 5, bias=False)
    model.emb = nn.Embedding(100, 8)
    got = select_candidates(model, module_types=[pytorch_utils.Conv1D])
    assert list(got) == ["c_attn"]
    assert module_type_name(model.c_attn) == "Conv1D"
    assert weight_shape(model.c_attn) == (8, 24)
    assert rank_cost(model.c_attn) == 32
    assert rank_cost(model.lin) == 13 and weight_shape(model.lin) == (5, 8)
    assert rank_cost(model.emb) == 108 and module_type_name(model.emb) == "Embedding"
    assert module_type_name(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) == "Linear"
    assert not is_supported(nn.Conv2d(1, 1, 1))


def test_unsupported_type_lists_supported() -> None:
    with pytest.raises(CandidateSelectionError, match="Conv2d.*Linear, Embedding, Conv1D"):
        select_candidates(Model(), module_types=[nn.Conv2d])
    with pytest.raises(CandidateSelectionError, match="Conv2d"):
        rank_cost(nn.Conv2d(1, 1, 1))


def test_invalid_regex_names_pattern() -> None:
    with pytest.raises(CandidateSelectionError, match=r"invalid include pattern 'query\('"):
        select_candidates(Model(), include=["query("])
    with pytest.raises(CandidateSelectionError, match=r"invalid exclude pattern '\['"):
        select_candidates(Model(), exclude=["["])


def test_empty_selection_message_says_why() -> None:
    with pytest.raises(CandidateSelectionError) as info:
        select_candidates(Model(), include=["attention"], exclude=["head"])
    message = str(info.value)
    assert "include=['attention']" in message and "exclude=['head']" in message
    assert "encoder.0.query (Linear)" in message and "['Linear']" in message

    with pytest.raises(CandidateSelectionError, match=r"no modules of types \['Embedding'\].*conv \(Conv2d\)"):
        select_candidates(_conv_only(), module_types=[nn.Embedding])


def _conv_only() -> nn.Module:
    model = nn.Module()
    model.conv = nn.Conv2d(1, 1, 3)
    return model


def test_peft_adapter_internals_are_skipped() -> None:
    peft = pytest.importorskip("peft")
    model = Model()
    injected = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["query"]), model)
    names = list(select_candidates(injected))
    assert not any("lora_" in n or "base_layer" in n for n in names)
    assert "encoder.0.value" in names and "encoder.0.query" not in names  # query is now a LoRA layer


def test_patterns_that_match_no_candidate_warn() -> None:
    model = Model()
    with pytest.warns(UserWarning) as record:
        selected = select_candidates(model, include=["query", "qurey"], exclude=["fcX", "encoder.0.query"])
    assert list(selected) == ["encoder.1.query"]
    messages = [str(w.message) for w in record]
    assert [m.split(",")[0] for m in messages] == [
        "include pattern 'qurey' matches no candidate module",
        "exclude pattern 'fcX' matches no candidate module",
    ]
    assert messages[1].startswith(
        "exclude pattern 'fcX' matches no candidate module, so it has no effect (candidates: encoder.0.query (Linear), "
    )


def test_patterns_that_match_warn_nothing(recwarn) -> None:
    select_candidates(Model(), include=r"encoder\..*", exclude="head.classifier")
    assert not [w for w in recwarn if "matches no candidate" in str(w.message)]


def _packed(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """``module`` with a weight of another shape, as a quantized layer packs it."""
    module.weight = nn.Parameter(module.weight.detach().reshape(shape), requires_grad=False)
    return module


def test_sizes_come_from_the_layer_not_from_a_packed_weight() -> None:
    linear = _packed(nn.Linear(8, 5), (20, 2))
    assert weight_shape(linear) == (5, 8) and rank_cost(linear) == 13 and num_parameters(linear) == 45
    embedding = _packed(nn.Embedding(100, 8), (400, 2))
    assert weight_shape(embedding) == (100, 8) and rank_cost(embedding) == 108 and num_parameters(embedding) == 800


def test_num_parameters_counts_weight_and_bias() -> None:
    assert num_parameters(nn.Linear(8, 5)) == 45
    assert num_parameters(nn.Linear(8, 5, bias=False)) == 40  # bias None: nothing added
    assert num_parameters(nn.Linear(1, 1, bias=False)) == 1
    assert num_parameters(nn.Embedding(100, 8)) == 800  # no bias attribute at all
    conv1d = _LookAlikeConv1D(24, 8)
    assert num_parameters(conv1d) == 8 * 24 + 24
    with pytest.raises(CandidateSelectionError, match="Conv2d"):
        num_parameters(nn.Conv2d(1, 1, 1))


def test_is_supported_is_true_for_each_supported_kind() -> None:
    assert is_supported(nn.Linear(2, 2)) is True
    assert is_supported(nn.Embedding(3, 2)) is True
    assert is_supported(_LookAlikeConv1D(2, 2)) is True
    assert is_supported(nn.Conv2d(1, 1, 1)) is False


class _LookAlikeConv1D(nn.Module):
    """transformers' Conv1D as the code recognises it: by class name and an ``nf`` attribute."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


_LookAlikeConv1D.__name__ = "Conv1D"


class _OtherConv1D(nn.Module):  # another class of the same name: a Conv1D type selects it by name
    def __init__(self) -> None:
        super().__init__()
        self.nf = 4
        self.weight = nn.Parameter(torch.zeros(2, 4))


_OtherConv1D.__name__ = "Conv1D"


def test_a_conv1d_type_selects_any_conv1d_by_name() -> None:
    model = nn.Module()
    model.a = _LookAlikeConv1D(4, 2)
    model.b = _OtherConv1D()
    model.lin = nn.Linear(2, 2)
    assert list(select_candidates(model, module_types=[_OtherConv1D])) == ["a", "b"]
    assert list(select_candidates(model, module_types=[_LookAlikeConv1D, nn.Linear])) == ["a", "b", "lin"]


def test_an_unsupported_type_is_named_by_class_name_and_a_non_type_by_repr() -> None:
    with pytest.raises(CandidateSelectionError) as info:
        select_candidates(Model(), module_types=[nn.Conv2d])
    assert str(info.value) == ("module type Conv2d is not supported for Fisher scoring; supported types are "
                               "Linear, Embedding, Conv1D (nn.Linear, nn.Embedding, transformers Conv1D)")
    with pytest.raises(CandidateSelectionError) as info:
        select_candidates(Model(), module_types=["Linear"])
    assert str(info.value).startswith("module type 'Linear' is not supported for Fisher scoring")


def _linears(count: int) -> nn.Module:
    model = nn.Module()
    for i in range(count):
        model.add_module(f"l{i}", nn.Linear(1, 1))
    return model


def test_empty_selection_lists_eight_modules_then_how_many_more() -> None:
    with pytest.raises(CandidateSelectionError) as info:
        select_candidates(_linears(8), include="nothing")
    listed = ", ".join(f"l{i} (Linear)" for i in range(8))
    assert str(info.value) == (
        f"no candidate modules: include='nothing', exclude=() selected none of the 8 modules of types ['Linear'], "
        f"e.g. {listed}. Patterns must match a full name or a dot-separated suffix of it (PEFT target_modules semantics)."
    )
    with pytest.raises(CandidateSelectionError) as info:
        select_candidates(_linears(11), include="nothing")
    assert f"e.g. {listed}, ... (3 more). Patterns" in str(info.value)


def test_empty_model_says_none_seen() -> None:
    with pytest.raises(CandidateSelectionError) as info:
        select_candidates(nn.Module())
    assert str(info.value) == (
        "no candidate modules: the model has no modules of types ['Linear'] (outside PEFT adapters). Modules seen: "
        "none. Pass module_types= with the layer types to score (Linear, Embedding, Conv1D)."
    )


def test_a_single_string_pattern_that_matches_nothing_is_named_whole() -> None:
    with pytest.warns(UserWarning) as record:
        select_candidates(Model(), exclude="qurey")
    assert [str(w.message).split(",")[0] for w in record] == ["exclude pattern 'qurey' matches no candidate module"]
