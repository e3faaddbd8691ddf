"""What PEFT injected into a model: each adapted module's rank, and the adapters' parameters."""

from __future__ import annotations

import peft
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from lightning_fisher.analysis.module_names import unwrapped_model, user_name

__all__ = ["adapter_parameters", "adapter_ranks", "count_adapter_parameters"]


def _tuned_root(model: nn.Module) -> nn.Module:
    if isinstance(model, peft.PeftModel):
        return model.base_model.model
    if isinstance(model, BaseTuner):
        return model.model
    return model


def adapter_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """``{module name: rank}`` of the adapters named ``adapter_name`` injected in ``model``.

    Names are relative to the model PEFT injected into (a ``PeftModel`` is unwrapped), in the
    user's words: without the components torch's wrappers add (:mod:`lightning_fisher.analysis.module_names`),
    so a model wrapped for activation checkpointing after injection still reads as the map. The
    rank is read from the adapter's weights where they show it (LoRA's ``lora_A``), else from
    the layer's ``r``.

    Args:
        model: a ``PeftModel``, or a module adapters were injected into in place.
        adapter_name: the PEFT adapter to read.
    """
    ranks = {}
    for name, module in unwrapped_model(_tuned_root(model)).named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(module, "r", {}):
            continue
        rank = int(module.r[adapter_name])
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter_name in lora_a:
            rank = int(lora_a[adapter_name].weight.shape[0])  # a sharded DTensor's shape is global
        embedding_a = getattr(module, "lora_embedding_A", None)
        if embedding_a is not None and adapter_name in embedding_a:
            rank = int(embedding_a[adapter_name].shape[0])
        ranks[user_name(name)] = rank
    return ranks


def adapter_parameters(root: nn.Module) -> list[nn.Parameter]:
    """Every parameter of every adapter injected under ``root`` (all adapter names), base weights not included.

    Args:
        root: the module the adapters were injected into (or any module above it).
    """
    return [
        p
        for module in root.modules()
        if isinstance(module, BaseTunerLayer)
        for layer_name in module.adapter_layer_names
        for p in getattr(module, layer_name).parameters()
    ]


def count_adapter_parameters(root: nn.Module) -> int:
    """Number of adapter parameters under ``root`` (see :func:`adapter_parameters`).

    Args:
        root: the module the adapters were injected into.
    """
    return sum(p.numel() for p in adapter_parameters(root))
