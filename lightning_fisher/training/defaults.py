"""The ``Trainer`` an analysis runs under: one home for its arguments.

Used by :func:`lightning_fisher.training.analyze.analyze_with_trainer` (the Trainer path of
:func:`lightning_fisher.analyze`) and by ``lightning-fisher analyze``
(:mod:`lightning_fisher.cli.lightning_clis`, which imports this module before parsing, so it
must not import the analysis module itself).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["TRAINER_DEFAULTS"]

#: The ``Trainer`` arguments of an analysis run, where they differ from Lightning's: one epoch,
#: no logger (``lightning-fisher analyze`` turns Lightning's default one on), one logged row a
#: batch when a logger is given, and nothing that validates or checkpoints, for a run that
#: trains nothing. ``trainer_kwargs`` override them.
TRAINER_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    max_epochs=1,
    logger=False,
    log_every_n_steps=1,
    enable_checkpointing=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
))
