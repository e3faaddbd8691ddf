"""Quantized bases: PEFT's bitsandbytes LoRA layers also for a model quantized by hand.

PEFT wraps a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` in its bnb LoRA layer (which
dequantizes the base weight to merge an adapter) only when the model it injects into says it
was loaded in 4 or 8 bits: ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``, which transformers'
``from_pretrained(quantization_config=...)`` sets. A model whose ``nn.Linear`` layers were
replaced by hand has no such flag, and PEFT falls back to its plain ``Linear`` LoRA layer:
training works, but merging adds a float delta to the packed bytes and fails.
:func:`quantization_declared` sets the missing flags for the duration of an injection.

bitsandbytes is never imported here: a model cannot hold its layers unless it was imported.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import nn

__all__ = ["quantization_declared", "quantization_flags"]

# bitsandbytes layer class -> the flag PEFT reads on the model to pick its LoRA layer for it.
_FLAGS = (("Linear4bit", "is_loaded_in_4bit"), ("Linear8bitLt", "is_loaded_in_8bit"))
_ABSENT = object()


def quantization_flags(root: nn.Module) -> list[str]:
    """The ``is_loaded_in_*bit`` flags PEFT needs on ``root`` for the bitsandbytes layers under it.

    Args:
        root: the module adapters are injected into.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    found = []
    for class_name, flag in _FLAGS:
        layer_class = getattr(bnb.nn, class_name, None)
        if layer_class is not None and any(isinstance(module, layer_class) for module in root.modules()):
            found.append(flag)
    return found


@contextlib.contextmanager
def quantization_declared(root: nn.Module) -> Iterator[None]:
    """Inject inside the block with ``root`` declaring the bitsandbytes quantization it holds.

    Usage with plain PEFT on a model quantized by hand::

        with quantization_declared(model):
            peft.inject_adapter_in_model(lora_config_from_fisher_map(path), model)

    A flag already true (a transformers model loaded in 4 bits) is left alone; the flags set
    here are put back as they were after the block.

    Args:
        root: the module adapters are injected into.
    """
    previous = {}
    for flag in quantization_flags(root):
        if not getattr(root, flag, False):
            previous[flag] = vars(root).get(flag, _ABSENT)
            setattr(root, flag, True)
    try:
        yield
    finally:
        for flag, value in previous.items():
            if value is _ABSENT:
                delattr(root, flag)
            else:
                setattr(root, flag, value)
