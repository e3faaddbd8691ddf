"""Writing injected adapters as a standard PEFT adapter folder (no Lightning needed).

Under sharding (FSDP2's ``fully_shard``, tensor parallelism) each adapter weight is a
``DTensor`` holding one shard per process. :func:`adapter_state_dict` gathers them into whole
tensors, which is a collective: every process must call it, in the same order. The folder is
then written by one process (:func:`save_adapter` with ``state=``), and loads into the
unsharded base model like any PEFT adapter. Keys are the user's module names: components that
wrappers add (activation checkpointing, ``torch.compile``) are left out, see
:mod:`lightning_fisher.analysis.module_names`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import peft
import safetensors.torch
import torch
from torch import nn

from lightning_fisher.data.atomic_io import write_bytes_atomic
from lightning_fisher.analysis.module_names import unwrapped_model, user_name

__all__ = ["adapter_state_dict", "save_adapter"]


def adapter_state_dict(root: nn.Module, *, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights as whole CPU tensors, under the keys ``PeftModel.save_pretrained`` writes.

    Sharded (``DTensor``) weights are gathered: with sharding, call this on every process.

    Args:
        root: the module the adapters were injected into (``adapter_root``).
        adapter_name: which adapter to read.

    Raises:
        ValueError: no adapter named ``adapter_name`` was injected into ``root``.
    """
    root = unwrapped_model(root)
    if adapter_name not in getattr(root, "peft_config", {}):
        raise ValueError(f"no PEFT adapter {adapter_name!r} was injected into {type(root).__name__}")
    # PEFT finds the adapter's entries by walking named_modules(), which keeps wrapper components,
    # while state_dict() drops some (checkpoint_wrapper's hook does): the adapters of a
    # checkpoint-wrapped layer would be left out. Parameters and buffers are named as PEFT walks.
    named = {**dict(root.named_parameters()), **dict(root.named_buffers())}
    state = peft.get_peft_model_state_dict(root, state_dict=named, adapter_name=adapter_name)
    # PeftModel stores its weights under the names it sees: base_model.model.<module>.
    return {f"base_model.model.{user_name(key)}": _whole(value).detach().cpu().contiguous() for key, value in state.items()}


def save_adapter(
    root: nn.Module,
    directory: Union[str, os.PathLike],
    *,
    adapter_name: str = "default",
    state: Optional[Mapping[str, torch.Tensor]] = None,
) -> Path:
    """Write the adapters injected in ``root`` as a standard PEFT adapter folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` in the layout
    ``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained(base_model, directory)``
    loads it on a fresh copy of the base model with the same ranks.

    Args:
        root: the module the adapters were injected into (``adapter_root``).
        directory: output folder (created).
        adapter_name: which adapter to write.
        state: the weights from :func:`adapter_state_dict`, when the model is sharded (gathered
            on every process, written by one); default: read from ``root`` here.

    Returns:
        ``directory``.

    Raises:
        ValueError: no adapter named ``adapter_name`` was injected into ``root``.
    """
    if state is None:
        state = adapter_state_dict(root, adapter_name=adapter_name)
    config = getattr(unwrapped_model(root), "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"no PEFT adapter {adapter_name!r} was injected into {type(root).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: an interrupted export never leaves a truncated weights file.
    write_bytes_atomic(
        directory / "adapter_model.safetensors", safetensors.torch.save(dict(state), metadata={"format": "pt"})
    )
    config.save_pretrained(str(directory))
    return directory


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    if not torch.distributed.is_available():  # not built on every platform; then nothing is sharded
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
