"""Writing injected adapters as a standard PEFT adapter folder (no Lightning needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import peft
import safetensors.torch
from torch import nn

from lightning_fisher.atomic_io import write_bytes_atomic

__all__ = ["save_adapter"]


def save_adapter(root: nn.Module, directory: Union[str, os.PathLike], *, adapter_name: str = "default") -> Path:
    """Write the adapters injected in ``root`` as a standard PEFT adapter folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` in the layout
    ``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained(base_model, directory)``
    loads it on a fresh copy of the base model with the same ranks.

    Args:
        root: the module the adapters were injected into (``adapter_root``).
        directory: output folder (created).
        adapter_name: which adapter to write.

    Returns:
        ``directory``.

    Raises:
        ValueError: no adapter named ``adapter_name`` was injected into ``root``.
    """
    config = getattr(root, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"no PEFT adapter {adapter_name!r} was injected into {type(root).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(root, adapter_name=adapter_name)
    # PeftModel stores its weights under the names it sees: base_model.model.<module>.
    state = {f"base_model.model.{key}": value.detach().cpu().contiguous() for key, value in state.items()}
    # Written aside and renamed: an interrupted export never leaves a truncated weights file.
    write_bytes_atomic(directory / "adapter_model.safetensors", safetensors.torch.save(state, metadata={"format": "pt"}))
    config.save_pretrained(str(directory))
    return directory
