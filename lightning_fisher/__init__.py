"""lightning_fisher: Fisher-guided LoRA placement and ranks for PyTorch Lightning and PEFT."""

from lightning_fisher._version import __version__
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
)
from lightning_fisher.timesteps import TimestepFocus, UniformTimestepSampler

__all__ = [
    "AdapterRankMismatchError",
    "CandidateSelectionError",
    "DatasetFolderError",
    "FisherAnalysisError",
    "FisherMapDecodeError",
    "FisherMapError",
    "FisherMapNotFoundError",
    "FisherMapSchemaError",
    "FisherMapVersionError",
    "FisherMapWriteError",
    "FragileModelError",
    "LightningFisherError",
    "ModelMismatchError",
    "TimestepFocus",
    "UniformTimestepSampler",
    "__version__",
]
