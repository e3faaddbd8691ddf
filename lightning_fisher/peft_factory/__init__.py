"""Applying a fisher map with PEFT: from the map file to injected, verified, exported adapters.

One concept per module:

- :mod:`~.locate`: where the map is (explicit path, else the dataset folder, else the
  datamodule's ``dataset_dir``) and reading it. No PEFT.
- :mod:`~.adapter_root`: the submodule PEFT injects into, and map names rebased onto it. No PEFT.
- :mod:`~.model_check`: is this the model the map was made for? No PEFT.
- :mod:`~.adapters`: the adapter types (LoRA / DoRA, LoHa, LoKr), their alpha option, the
  alpha policy, and the options the map owns.
- :mod:`~.plan`: the map's PEFT config (:func:`lora_config_from_fisher_map`,
  :func:`peft_config_from_fisher_map`, :func:`plan_from_fisher_map`).
- :mod:`~.flat`: the flat LoRA config a map is compared with (default rank :data:`FLAT_RANK`).
- :mod:`~.injected`: ranks and parameters of the adapters in a model.
- :mod:`~.verify`: every module has the rank the map (or a checkpoint) says.
- :mod:`~.rollback`: a failed injection or verification leaves the model as it was.
- :mod:`~.quantized`: PEFT's bitsandbytes LoRA layers for a base quantized by hand.
- :mod:`~.step_size`: adapter scaling, and the learning-rate check of a map's adapters.
- :mod:`~.export`: a standard PEFT adapter folder (:func:`save_adapter`), sharded weights gathered.

Names are loaded on first use, so reading a map (:func:`find_fisher_map`) does not import PEFT.
None of these modules imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "MapSource": "locate",
    "find_fisher_map": "locate",
    "fisher_map_path": "locate",
    "load_map": "locate",
    "rebase_names": "adapter_root",
    "root_module": "adapter_root",
    "check_model": "model_check",
    "model_differences": "model_check",
    "ADAPTER_CONFIGS": "adapters",
    "AdapterType": "adapters",
    "MAP_OWNED_OPTIONS": "adapters",
    "alpha_option": "adapters",
    "alpha_policy": "adapters",
    "config_class": "adapters",
    "FisherMapOverrideWarning": "plan",
    "MapApplication": "plan",
    "lora_config_from_fisher_map": "plan",
    "peft_config_from_fisher_map": "plan",
    "plan_from_fisher_map": "plan",
    "FLAT_RANK": "flat",
    "flat_config": "flat",
    "flat_lora_on": "flat",
    "candidates_not_in": "flat",
    "adapter_parameters": "injected",
    "adapter_ranks": "injected",
    "count_adapter_parameters": "injected",
    "changed_modules": "verify",
    "verify_adapter_ranks": "verify",
    "injection_undone_on_error": "rollback",
    "quantization_declared": "quantized",
    "quantization_flags": "quantized",
    "adapter_scaling": "step_size",
    "learning_rate_warnings": "step_size",
    "adapter_state_dict": "export",
    "save_adapter": "export",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
