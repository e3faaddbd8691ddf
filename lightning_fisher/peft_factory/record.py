"""What a fit applied, as a record for the run's logger: which map (or flat LoRA) and the ranks.

:class:`~lightning_fisher.AdaptiveLoRA` logs it as hyperparameters at fit start, so a run folder
(``hparams.yaml`` of a ``CSVLogger``, TensorBoard's hparams) says which map shaped its adapters
even when the map was found in the dataset folder and the config says ``fisher_map: null``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from lightning_fisher.fisher_map.map import FisherMap

__all__ = ["applied_map_record"]


def applied_map_record(
    fisher_map: Optional[FisherMap],
    ranks: Mapping[str, int],
    trainable_parameters: int,
    flat_parameters: Optional[int] = None,
    *,
    ignored: bool = False,
) -> dict[str, Any]:
    """``{"fisher_map": {...}}``: the applied map's identity and settings, or flat LoRA's, and every rank.

    Args:
        fisher_map: the map applied, ``None`` for flat LoRA.
        ranks: ``{module name relative to the adapter root: rank}`` of the injected adapters.
        trainable_parameters: their trainable parameters.
        flat_parameters: flat LoRA's parameters at the map's base rank on the model trained.
        ignored: a map was found but ``ignore_fisher_map`` asked for flat LoRA.
    """
    record: dict[str, Any] = {"trainable_adapter_parameters": int(trainable_parameters), "ranks": dict(ranks)}
    if fisher_map is None:
        record["applied"] = "flat LoRA (map ignored)" if ignored else "flat LoRA (no map)"
        return {"fisher_map": record}
    budget = fisher_map.budget
    record.update(
        applied=str(fisher_map.path) if fisher_map.path is not None else "(in memory)",
        model_fingerprint=fisher_map.model.fingerprint,
        created=fisher_map.created,
        criterion=budget.criterion,
        mode=budget.mode,
        rank=budget.rank,
        rank_min=budget.rank_min,
        rank_max=budget.rank_max,
        modules_adapted=len(ranks),
        modules_excluded=len(fisher_map.excluded),
    )
    if flat_parameters:
        record["flat_lora_parameters"] = int(flat_parameters)
        record["parameters_vs_flat"] = round(trainable_parameters / flat_parameters, 4)
    return {"fisher_map": record}
