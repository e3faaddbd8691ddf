"""lightning_fisher: Fisher-guided LoRA placement and ranks for PyTorch Lightning and PEFT.

The core (map, allocation, collector, the analysis session, PEFT factory) is plain PyTorch, and
so is ``analyze`` given a model that is not a LightningModule. The Lightning adapters
(``FisherAnalysisModule``, ``FisherStability``, ``AdaptiveLoRA``, ``TensorDirectoryDataModule``)
and the names that need PEFT (the config factories, ``verify_adapter_ranks``, ``save_adapter``)
or ``transformers`` (``FisherMapCallback``, for the Hugging Face ``Trainer``) are imported on
first use, so ``import lightning_fisher`` in a plain PyTorch loop loads neither Lightning nor PEFT.
"""

from __future__ import annotations

import importlib
import os as _os
import sys as _sys
from typing import Any

# The console script imports this package, and torch with it, before its main() runs: Ctrl-C in
# those seconds would print a long traceback through torch's import. In that process only,
# Ctrl-C prints one line instead until main() starts (lightning_fisher.cli.interrupts).
if _sys.argv and _os.path.basename(_sys.argv[0]).removesuffix(".exe") == "lightning-fisher":
    from lightning_fisher.cli.interrupts import quiet_interrupt_while_starting

    quiet_interrupt_while_starting()

from lightning_fisher import _compat

_compat.install()  # the modules' old paths (lightning_fisher.map_codec, ...) keep importing

from lightning_fisher._version import __version__
from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.allocation.trace_rule import allocate_ranks
from lightning_fisher.analysis.accumulator import FisherAccumulator
from lightning_fisher.analysis.options import AnalysisOptions
from lightning_fisher.analysis.candidates import select_candidates
from lightning_fisher.analysis.collector import FisherCollector
from lightning_fisher.errors import (
    AdapterRankMismatchError,
    CandidateSelectionError,
    DatasetFolderError,
    FisherAnalysisError,
    FisherMapDecodeError,
    FisherMapError,
    FisherMapNotFoundError,
    FisherMapSchemaError,
    FisherMapVersionError,
    FisherMapWriteError,
    FragileModelError,
    LightningFisherError,
    ModelMismatchError,
    SettingsError,
)
from lightning_fisher.analysis.stability import (
    StabilityRule,
    StabilityTracker,
    StopReason,
    spectrum_split_half_correlation,
    split_half_correlation,
)
from lightning_fisher.analysis.timesteps import TimestepFocus, UniformTimestepSampler
from lightning_fisher.data.tensor_folder import TensorFolderDataset, write_sample_folder
from lightning_fisher.fisher_map.map import FisherMap

# Imported on first use: the Lightning adapters (so a plain PyTorch loop does not load
# Lightning) and the names that need PEFT (so reading or showing a map does not load PEFT).
_LAZY = {
    "AdaptiveLoRA": "lightning_fisher.training.adaptive_lora",
    "FisherMapOverrideWarning": "lightning_fisher.peft_factory.plan",
    "lora_config_from_fisher_map": "lightning_fisher.peft_factory.plan",
    "peft_config_from_fisher_map": "lightning_fisher.peft_factory.plan",
    "verify_adapter_ranks": "lightning_fisher.peft_factory.verify",
    "save_adapter": "lightning_fisher.peft_factory.export",
    "FisherAnalysisModule": "lightning_fisher.training.analysis_module",
    "FisherStability": "lightning_fisher.training.stability_callback",
    "FisherMapCallback": "lightning_fisher.integrations.hf_trainer",
    "TensorDirectoryDataModule": "lightning_fisher.training.datamodule",
    "analyze": "lightning_fisher.analysis.entry",
}

__all__ = [
    "AdapterRankMismatchError",
    "AdaptiveLoRA",
    "AllocationSettings",
    "AnalysisOptions",
    "CandidateSelectionError",
    "DatasetFolderError",
    "FisherAccumulator",
    "FisherAnalysisError",
    "FisherAnalysisModule",
    "FisherCollector",
    "FisherMap",
    "FisherMapDecodeError",
    "FisherMapCallback",
    "FisherMapError",
    "FisherMapNotFoundError",
    "FisherMapOverrideWarning",
    "FisherMapSchemaError",
    "FisherMapVersionError",
    "FisherMapWriteError",
    "FisherStability",
    "FragileModelError",
    "LightningFisherError",
    "ModelMismatchError",
    "SettingsError",
    "StabilityRule",
    "StabilityTracker",
    "StopReason",
    "TensorDirectoryDataModule",
    "TensorFolderDataset",
    "TimestepFocus",
    "UniformTimestepSampler",
    "__version__",
    "allocate_ranks",
    "analyze",
    "lora_config_from_fisher_map",
    "peft_config_from_fisher_map",
    "save_adapter",
    "select_candidates",
    "spectrum_split_half_correlation",
    "split_half_correlation",
    "verify_adapter_ranks",
    "write_sample_folder",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_fisher' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
