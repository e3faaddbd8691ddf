"""Undoing an injection that failed: the model is left as it was, not half adapted.

``peft.inject_adapter_in_model`` changes the model in place, module by module: it wraps each
target in an adapter layer, freezes every other parameter under the root and stores the config
on it. When it stops halfway (PEFT refuses a module type) or the injected ranks fail
verification, a caller that catches the error (a notebook, a retry with ``strict=False``, a
sweep) would otherwise keep training a model with some adapters and frozen weights.
:func:`injection_undone_on_error` records what injection changes and puts it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["injection_undone_on_error"]


@contextlib.contextmanager
def injection_undone_on_error(root: nn.Module, adapter_name: str = "default") -> Iterator[None]:
    """Inject (and verify) inside the block; on any error, remove what was injected and re-raise.

    Put back: modules wrapped in a new adapter layer get their original module again; layers
    that held other adapters before lose only ``adapter_name``; every parameter gets its
    ``requires_grad`` back; a ``peft_config`` attribute PEFT added to ``root`` is removed, and
    from one that was there before only the failed adapter's entry (when it is new).

    Args:
        root: the module adapters are injected into.
        adapter_name: the PEFT adapter being injected.
    """
    trainable = [(parameter, parameter.requires_grad) for parameter in root.parameters()]
    tuned_before = {name for name, module in root.named_modules() if isinstance(module, BaseTunerLayer)}
    had_config = hasattr(root, "peft_config")
    had_entry = had_config and adapter_name in root.peft_config
    try:
        yield
    except BaseException:
        _remove_adapter(root, adapter_name, tuned_before)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
        if not had_config and "peft_config" in vars(root):
            del root.peft_config
        elif had_config and not had_entry and isinstance(getattr(root, "peft_config", None), dict):
            root.peft_config.pop(adapter_name, None)
        raise


def _remove_adapter(root: nn.Module, adapter_name: str, tuned_before: set[str]) -> None:
    layers = [(name, module) for name, module in root.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in layers:
        if name in tuned_before:
            if adapter_name in getattr(layer, "r", {}):
                layer.delete_adapter(adapter_name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer.get_base_layer())
