"""A small rectified-flow model on scikit-learn's 8x8 digits, for timestep-focus tests and benchmarks.

The task: a flow-matching model pretrained on digits 0-4 is adapted to digits 5-9. One module
per concern:

* :mod:`~lightning_fisher.examples.digits_flow.data`: the digits, their two halves and
  train/test splits, written as dataset folders (:func:`digits_split`,
  :func:`write_digits_dataset`);
* :mod:`~lightning_fisher.examples.digits_flow.model`: :class:`DigitsFlowMatching`, the
  velocity model as a LightningModule, and its denoising loss;
* :mod:`~lightning_fisher.examples.digits_flow.pretraining`: pretraining on the low half, and
  :func:`prepare_digits_example`, which writes everything the adaptation needs.

The timestep samplers the model draws from are the library's
(:mod:`lightning_fisher.analysis.timesteps`). Every name stays importable from this package
(``lightning_fisher.examples.digits_flow.DigitsFlowMatching`` is the class path the configs
use).
"""

from lightning_fisher.examples.digits_flow.data import DigitsHalf, digits_split, write_digits_dataset
from lightning_fisher.examples.digits_flow.model import (
    CHECKPOINT_NAME,
    DigitsFlowMatching,
    denoising_loss,
    held_out_denoising_loss,
    single_threaded,
)
from lightning_fisher.examples.digits_flow.pretraining import (
    load_pretrained_digits_flow,
    prepare_digits_example,
    pretrain_digits_flow,
)
from lightning_fisher.analysis.timesteps import LogitNormalTimestepSampler

__all__ = [
    "CHECKPOINT_NAME",
    "DigitsFlowMatching",
    "DigitsHalf",
    "LogitNormalTimestepSampler",
    "denoising_loss",
    "digits_split",
    "held_out_denoising_loss",
    "load_pretrained_digits_flow",
    "pretrain_digits_flow",
    "prepare_digits_example",
    "single_threaded",
    "write_digits_dataset",
]
