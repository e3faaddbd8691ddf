"""The user's module names, whatever wrappers a strategy or recipe put around the layers.

A fisher map names modules as the user's model names them, so that the same map applies to
the model unwrapped, wrapped for training, or loaded fresh from a checkpoint. Wrappers that
torch inserts into the module tree add name components of their own:

- ``_checkpoint_wrapped_module``: ``checkpoint_wrapper`` / ``apply_activation_checkpointing``
  (used with FSDP2 recipes, e.g. in Lightning's ``configure_model``);
- ``_fsdp_wrapped_module``: FSDP1 (``FullyShardedDataParallel``) and its offload wrapper;
- ``_orig_mod``: ``torch.compile`` of a module (``OptimizedModule``);
- ``module``: ``DistributedDataParallel`` / ``DataParallel`` at the root.

The first three are private attribute names of torch's wrappers, so they are dropped wherever
they occur. ``module`` is an ordinary word a user may name a layer, so it is dropped only when
the root object actually is a data-parallel wrapper (:func:`unwrapped_model`).

FSDP2 (``fully_shard``) and tensor parallelism add no component: they change a module's class
and turn its parameters into ``DTensor`` s in place, so names are the user's already.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

__all__ = ["WRAPPER_COMPONENTS", "named_modules", "named_parameters", "unwrapped_model", "user_name"]

#: Name components that only torch's wrappers add (never the user's own layers).
WRAPPER_COMPONENTS = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod"})


def user_name(name: str) -> str:
    """``name`` without the components of torch's wrappers (:data:`WRAPPER_COMPONENTS`).

    ``"layers.0._checkpoint_wrapped_module.attn._orig_mod.q"`` becomes ``"layers.0.attn.q"``.
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The user's model inside root wrappers: ``DistributedDataParallel`` / ``DataParallel``
    (``.module``), ``torch.compile`` (``._orig_mod``) and FSDP1 (``._fsdp_wrapped_module``).
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "_fsdp_wrapped_module", None), nn.Module):
            model = model._fsdp_wrapped_module
        else:
            return model


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` under the user's names, the root itself excluded.

    A wrapper and the module it wraps get the same name; only the innermost is yielded (it
    is the layer the user wrote; the wrapper holds no weights of its own).
    """
    entries = list(unwrapped_model(model).named_modules())
    for (name, module), following in zip(entries, [*entries[1:], (None, None)]):
        if not name or following[0] is not None and user_name(following[0]) == user_name(name):
            continue  # the root, or a wrapper whose wrapped module comes next
        yield user_name(name), module


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` under the user's names."""
    for name, parameter in unwrapped_model(model).named_parameters():
        yield user_name(name), parameter
