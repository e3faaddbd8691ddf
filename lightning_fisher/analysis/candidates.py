"""Candidate modules: which layers of a model the Fisher analysis scores.

A candidate is a module that could receive a LoRA adapter and whose per-sample weight
gradient the collector can score exactly: ``nn.Linear``, ``nn.Embedding`` and the
Hugging Face ``Conv1D`` (GPT-2 style, weight ``[in, out]``, ``y = x @ W + b``). ``Conv1D`` is
recognised by its class name and its ``nf`` attribute, so ``transformers`` is never required.

Quantized layers are candidates too: bitsandbytes' ``Linear4bit`` and ``Linear8bitLt`` are
``nn.Linear`` subclasses (``Embedding4bit`` / ``Embedding8bit`` are ``nn.Embedding`` ones), and
the collector reads only a layer's input and output gradient, never its weight. A packed
weight's ``.shape`` is not the layer's (4-bit: ``[out * in / 2, 1]`` bytes, repacked again on
CPU), so every size here comes from ``in_features`` / ``out_features`` (``num_embeddings`` /
``embedding_dim``): a layer has the same shape, rank cost and parameter count quantized or not.

Name patterns follow PEFT's ``target_modules`` convention: a pattern is a regular expression
that must match the module's full name or a dot-separated suffix of it. ``"classifier"``
selects ``classifier`` and ``head.classifier`` but not ``my_classifier``; ``r"encoder\\..*"``
selects everything under ``encoder``.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from lightning_fisher.errors import CandidateSelectionError
from lightning_fisher.analysis.module_names import named_modules

__all__ = [
    "SUPPORTED_TYPE_NAMES",
    "is_supported",
    "module_type_name",
    "num_parameters",
    "rank_cost",
    "select_candidates",
    "weight_shape",
]

#: Canonical names of the module kinds the collector can score.
SUPPORTED_TYPE_NAMES = ("Linear", "Embedding", "Conv1D")

# Name components that mark a module as part of an already-injected PEFT adapter: the LoRA
# factors (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_dropout`` ...) and the wrapped
# original layer (``base_layer``). Scoring them would score the adapter, not the model.
_ADAPTER_PREFIX = "lora_"
_ADAPTER_COMPONENT = "base_layer"

_MAX_LISTED = 8


def _is_conv1d(obj: Union[nn.Module, type]) -> bool:
    cls = obj if isinstance(obj, type) else type(obj)
    if cls.__name__ != "Conv1D":
        return False
    # The class itself sets ``nf`` in __init__ only; accept the class by name, instances by attribute.
    return isinstance(obj, type) or hasattr(obj, "nf")


def _type_name_or_none(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Embedding):
        return "Embedding"
    if _is_conv1d(module):
        return "Conv1D"
    return None


def is_supported(module: nn.Module) -> bool:
    """Whether the collector can score ``module`` (a Linear, Embedding or HF Conv1D)."""
    return _type_name_or_none(module) is not None


def module_type_name(module: nn.Module) -> str:
    """Canonical kind of a supported module: ``"Linear"``, ``"Embedding"`` or ``"Conv1D"``.

    Subclasses report their base kind (``NonDynamicallyQuantizableLinear`` is ``"Linear"``),
    because that is what decides how a LoRA adapter is built for them.

    Args:
        module: a supported module.

    Raises:
        CandidateSelectionError: ``module`` is of an unsupported type.
    """
    name = _type_name_or_none(module)
    if name is None:
        raise CandidateSelectionError(
            f"module of type {type(module).__name__} is not supported; supported types are "
            f"{', '.join(SUPPORTED_TYPE_NAMES)}"
        )
    return name


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """Shape of the module's weight as the unquantized layer stores it.

    Linear ``[out_features, in_features]``, Embedding ``[num_embeddings, embedding_dim]``,
    ``Conv1D`` ``[in, out]``. A quantized layer's packed weight has another ``.shape``; this is
    the logical one, read from the layer's sizes.

    Args:
        module: a supported module.

    Raises:
        CandidateSelectionError: ``module`` is of an unsupported type.
    """
    kind = module_type_name(module)
    if kind == "Linear":
        return (int(module.out_features), int(module.in_features))
    if kind == "Embedding":
        return (int(module.num_embeddings), int(module.embedding_dim))
    return tuple(module.weight.shape)  # Conv1D: no quantized form keeps this class


def num_parameters(module: nn.Module) -> int:
    """Weight and bias entries of the module as unquantized: the per-parameter normaliser of its score.

    Args:
        module: a supported module.

    Raises:
        CandidateSelectionError: ``module`` is of an unsupported type.
    """
    rows, cols = weight_shape(module)
    bias = getattr(module, "bias", None)
    return rows * cols + (bias.numel() if isinstance(bias, torch.Tensor) else 0)


def rank_cost(module: nn.Module) -> int:
    """LoRA parameters added per unit of rank: ``d_in + d_out`` (Embedding: vocabulary + dim).

    Args:
        module: a supported module.

    Raises:
        CandidateSelectionError: ``module`` is of an unsupported type.
    """
    rows, cols = weight_shape(module)
    return int(rows + cols)


def _check_module_types(module_types: Sequence[type]) -> tuple[type, ...]:
    types = tuple(module_types)
    for cls in types:
        ok = isinstance(cls, type) and (issubclass(cls, (nn.Linear, nn.Embedding)) or _is_conv1d(cls))
        if not ok:
            shown = cls.__name__ if isinstance(cls, type) else repr(cls)
            raise CandidateSelectionError(
                f"module type {shown} is not supported for Fisher scoring; supported types are "
                f"{', '.join(SUPPORTED_TYPE_NAMES)} (nn.Linear, nn.Embedding, transformers Conv1D)"
            )
    return types


def _compile_patterns(patterns: Union[str, Sequence[str]], what: str) -> list[re.Pattern[str]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(rf"(?:.*\.)?(?:{pattern})"))
        except re.error as err:
            raise CandidateSelectionError(f"invalid {what} pattern {pattern!r}: {err}") from err
    return compiled


def _matches_any(name: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    return any(p.fullmatch(name) for p in patterns)


def _is_of_types(module: nn.Module, types: tuple[type, ...]) -> bool:
    for cls in types:
        if _is_conv1d(cls):
            if _is_conv1d(module):
                return True
        elif isinstance(module, cls):
            return True
    return False


def _inside_adapter(name: str) -> bool:
    return any(part.startswith(_ADAPTER_PREFIX) or part == _ADAPTER_COMPONENT for part in name.split("."))


def _describe(modules: list[tuple[str, nn.Module]]) -> str:
    shown = ", ".join(f"{name} ({type(m).__name__})" for name, m in modules[:_MAX_LISTED])
    more = f", ... ({len(modules) - _MAX_LISTED} more)" if len(modules) > _MAX_LISTED else ""
    return shown + more


def select_candidates(
    model: nn.Module,
    *,
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str]] = (),
    module_types: Optional[Sequence[type]] = None,
) -> dict[str, nn.Module]:
    """Modules of ``model`` to score, by full name, in ``model.named_modules()`` order.

    The root module itself is never a candidate (it has no name to put in a map), and
    neither is any module inside an already-injected PEFT adapter: a module whose name has a
    component starting with ``lora_`` or equal to ``base_layer``. Names are the user's: the
    components torch's wrappers add (activation checkpointing, ``torch.compile``, FSDP1, DDP)
    are left out (:mod:`lightning_fisher.analysis.module_names`).

    Args:
        model: the model to search.
        include: name patterns (PEFT ``target_modules`` semantics: a regex matching the full
            name or a dot-separated suffix). ``None`` selects every module of ``module_types``.
            A single string is one pattern.
        exclude: name patterns removed from the selection, same semantics.

        A pattern of ``include`` or ``exclude`` that matches none of the modules of
        ``module_types`` is most likely a typo: each one gets a ``UserWarning``.
        module_types: module classes to consider; default ``(nn.Linear,)``. Supported:
            ``nn.Linear``, ``nn.Embedding`` (and subclasses) and transformers' ``Conv1D``.

    Raises:
        CandidateSelectionError: an unsupported type, an invalid pattern, or nothing selected.
    """
    types = _check_module_types((nn.Linear,) if module_types is None else module_types)
    includes = None if include is None else _compile_patterns(include, "include")
    excludes = _compile_patterns(exclude, "exclude")

    named = [(n, m) for n, m in named_modules(model) if not _inside_adapter(n)]
    of_type = [(n, m) for n, m in named if _is_of_types(m, types)]
    selected = {
        n: m
        for n, m in of_type
        if (includes is None or _matches_any(n, includes)) and not _matches_any(n, excludes)
    }
    if not selected:
        raise CandidateSelectionError(_empty_selection_message(include, exclude, types, named, of_type))
    names = [n for n, _ in of_type]
    for what, raw, compiled in (("include", include, includes), ("exclude", exclude, excludes)):
        for pattern in _unmatched(raw, compiled or [], names):
            warnings.warn(
                f"{what} pattern {pattern!r} matches no candidate module, so it has no effect (candidates: "
                f"{_describe(of_type)}); patterns match a full name or a dot-separated suffix of it "
                "(PEFT target_modules semantics)",
                UserWarning,
                stacklevel=2,
            )
    return selected


def _unmatched(
    raw: Union[str, Sequence[str], None], compiled: list[re.Pattern[str]], names: list[str]
) -> list[str]:
    """The patterns of ``raw`` (compiled in the same order) that match none of ``names``."""
    patterns = [raw] if isinstance(raw, str) else list(raw or [])
    return [text for text, pattern in zip(patterns, compiled) if not any(pattern.fullmatch(n) for n in names)]


def _empty_selection_message(
    include: Union[str, Sequence[str], None],
    exclude: Union[str, Sequence[str]],
    types: tuple[type, ...],
    named: list[tuple[str, nn.Module]],
    of_type: list[tuple[str, nn.Module]],
) -> str:
    type_names = [t.__name__ for t in types]
    setting = f"include={include!r}, exclude={exclude!r}"
    if not of_type:
        return (
            f"no candidate modules: the model has no modules of types {type_names} "
            f"(outside PEFT adapters). Modules seen: {_describe(named) or 'none'}. "
            f"Pass module_types= with the layer types to score ({', '.join(SUPPORTED_TYPE_NAMES)})."
        )
    return (
        f"no candidate modules: {setting} selected none of the {len(of_type)} modules of types "
        f"{type_names}, e.g. {_describe(of_type)}. Patterns must match a full name or a "
        f"dot-separated suffix of it (PEFT target_modules semantics)."
    )
