"""``FisherMapCallback``: the fisher map at the start of a Hugging Face ``transformers.Trainer`` run.

The map is applied before the Trainer exists (``peft.get_peft_model(model,
lora_config_from_fisher_map(...))``), so what belongs at train start is a check and a record:

* **check**: every LoRA adapter of the model being trained has the map's rank and no other
  module has one (:func:`~lightning_fisher.verify_adapter_ranks`); a mismatch stops the run
  before its first step with an :class:`~lightning_fisher.AdapterRankMismatchError` naming each
  module. It catches a map and a model that do not belong together (another map file, an
  adapter loaded from elsewhere, ``target_modules`` edited after the map was applied).
* **record**: :attr:`FisherMapCallback.record`, the map's identity and settings and every rank
  (:func:`~lightning_fisher.peft_factory.record.applied_map_record`, the record
  ``AdaptiveLoRA`` logs as a Lightning run's hyperparameters). The callback is a
  ``transformers`` ``ExportableState``, so the Trainer writes the record into every
  checkpoint's ``trainer_state.json`` (``stateful_callbacks.FisherMapCallback``), and restores
  the callback from it when resuming with ``restore_callback_states_from_checkpoint=True``.

The ``report_to`` loggers (W&B, MLflow, TensorBoard, ...) take their hyperparameters from
``args`` and ``model.config`` in their own ``on_train_begin``, which runs before that of any
callback passed to the Trainer; the Trainer gives a callback no way into them. The record is a
plain JSON-ready dict: pass it on where you want it (``wandb.config.update(callback.record)``
once training has begun, or ``json.dump`` next to the adapter).

Outside the examples, this is the one module of the package that imports ``transformers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from lightning_fisher.analysis.processes import info_on_rank_zero
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.peft_factory.injected import count_adapter_parameters
from lightning_fisher.peft_factory.locate import load_map
from lightning_fisher.peft_factory.record import applied_map_record
from lightning_fisher.peft_factory.verify import verify_adapter_ranks

__all__ = ["FisherMapCallback"]


class FisherMapCallback(TrainerCallback, ExportableState):
    """Check the adapters against the fisher map at train start and record the map in the run.

    Args:
        fisher_map: the map applied to the model, as the path of ``fisher_map.json`` or of its
            folder, or a :class:`~lightning_fisher.FisherMap` that has one (a map returned by
            ``analyze(..., output=...)`` or read with ``FisherMap.load``). A path, because the
            Trainer rebuilds the callback from its recorded arguments when it resumes.
        adapter_name: the PEFT adapter to check.
        adapter_root: as in :func:`~lightning_fisher.lora_config_from_fisher_map`, when the
            model trained is a submodule of the analysed model.
        verbose: say at train start, on rank zero, which map the adapters were checked against
            and its summary line (the ``lightning_fisher`` logger, at INFO).

    Attributes:
        record: ``{"fisher_map": {...}}`` once training has begun: the map's path, model
            fingerprint, criterion, base rank and bounds, module counts, every adapter's rank
            and the adapters' trainable parameters; ``None`` before.

    Raises:
        ValueError: ``fisher_map`` is a map held in memory only (save it first).
    """

    def __init__(
        self,
        fisher_map: Union[FisherMap, str, os.PathLike],
        adapter_name: str = "default",
        adapter_root: Optional[str] = None,
        verbose: bool = True,
    ) -> None:
        if isinstance(fisher_map, FisherMap) and fisher_map.path is None:
            raise ValueError(
                "FisherMapCallback: this fisher map has no file; save it first (fisher_map.save(folder), or "
                "analyze(..., output=folder)) and pass the map or its path, so that a resumed run can read it again"
            )
        self.fisher_map = load_map(fisher_map)
        self.adapter_name = adapter_name
        self.adapter_root = adapter_root
        self.verbose = verbose
        self.record: Optional[dict[str, Any]] = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Optional[nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        """Verify every adapter's rank against the map, then fill :attr:`record`.

        Raises:
            AdapterRankMismatchError: a module's adapter is missing, of another rank, or not in
                the map; every such module is named.
            ValueError: the Trainer passed no model.
        """
        if model is None:
            raise ValueError("FisherMapCallback.on_train_begin: the Trainer passed no model to check against the map")
        ranks = verify_adapter_ranks(
            model, self.fisher_map, adapter_name=self.adapter_name, adapter_root=self.adapter_root
        )
        self.record = applied_map_record(self.fisher_map, ranks, count_adapter_parameters(model))
        if self.verbose:
            info_on_rank_zero(f"Adapters match the fisher map {self.fisher_map.path}: {self.fisher_map.summary()}")

    def state(self) -> dict[str, Any]:
        """What the Trainer writes into a checkpoint's ``trainer_state.json`` and resumes from."""
        return {
            "args": {
                "fisher_map": str(Path(self.fisher_map.path).resolve()),
                "adapter_name": self.adapter_name,
                "adapter_root": self.adapter_root,
                "verbose": self.verbose,
            },
            "attributes": {"record": self.record},
        }
