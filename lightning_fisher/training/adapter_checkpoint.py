"""The adapters' record in a Lightning checkpoint, and the check that a resumed run injected the same ones.

``AdaptiveLoRA`` writes ``checkpoint["lightning_fisher"] = {"fisher_map": ..., "adapter_ranks":
...}``. On resume it re-injects adapters in ``setup`` from the current map, and the checkpoint's
weights must then fit them. If the map changed since the checkpoint, loading would fail with a
bare tensor size mismatch; :func:`guard_checkpoint_loading` turns that into an error naming the
modules, raised before the weights load.

Why a wrapped module hook and not the callback's own state (``state_dict`` /
``load_state_dict`` under ``state_key``, as ``EarlyStopping`` keeps it): in Lightning 2.6.6,
``trainer.fit(model, ckpt_path=...)`` runs (measured, see
``tests/test_adapter_checkpoint.py``)::

    Callback.setup                      <- adapters injected from the current map
    LightningModule.configure_model
    LightningModule.on_load_checkpoint  <- the last hook before the weights
    LightningModule.load_state_dict     <- the weights (size mismatch here)
    Callback.on_load_checkpoint
    Callback.load_state_dict            <- callback state: after the weights
    LightningModule.configure_optimizers

(``_CheckpointConnector._restore_modules_and_callbacks``: ``restore_model`` before
``restore_callbacks``). Callback state arrives too late both to re-inject from the stored map
and to check before the weights, so the check wraps the module's ``on_load_checkpoint``, on that
one instance, calling the module's own hook afterwards.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Callable, Optional

import lightning.pytorch as pl

from lightning_fisher.errors import ModelMismatchError
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.peft_factory.verify import changed_modules

__all__ = ["CHECKPOINT_KEY", "check_resumed_ranks", "checkpoint_entry", "guard_checkpoint_loading"]

#: Key under which the applied map travels inside Lightning checkpoints.
CHECKPOINT_KEY = "lightning_fisher"

# Marks a wrapped hook, so that a second setup on the same module does not wrap it twice.
_GUARD_MARK = "_lightning_fisher_guard"


def checkpoint_entry(applied_map: Optional[FisherMap], ranks: Mapping[str, int]) -> dict[str, Any]:
    """What goes under :data:`CHECKPOINT_KEY`: the map applied (``None`` for flat) and the injected ranks.

    Args:
        applied_map: the map the adapters came from.
        ranks: ``{module name relative to adapter_root: rank}`` as injected.
    """
    return {"fisher_map": None if applied_map is None else applied_map.to_dict(), "adapter_ranks": dict(ranks)}


def check_resumed_ranks(checkpoint: Mapping[str, Any], current: Mapping[str, int]) -> None:
    """Refuse a checkpoint whose adapters differ from the ones just injected.

    Args:
        checkpoint: the loaded Lightning checkpoint; without a :data:`CHECKPOINT_KEY` entry
            (not written by ``AdaptiveLoRA``) there is nothing to check.
        current: ``{module: rank}`` injected for this run.

    Raises:
        ModelMismatchError: naming up to five of the modules that differ, and where the
            checkpoint keeps its original map.
    """
    stored = checkpoint.get(CHECKPOINT_KEY)
    if stored is None:
        return
    changed = changed_modules(stored["adapter_ranks"], current)
    if changed:
        raise ModelMismatchError(
            f"the checkpoint's adapters differ from the ones the current fisher map gives in "
            f"{len(changed)} module(s), e.g. {changed[:5]}: the map changed since the checkpoint was "
            "written. Resume with the original map (AdaptiveLoRA(fisher_map=...)); the checkpoint "
            f"holds it under checkpoint[{CHECKPOINT_KEY!r}]['fisher_map']"
        )


def guard_checkpoint_loading(pl_module: pl.LightningModule, current_ranks: Callable[[], Mapping[str, int]]) -> None:
    """Run :func:`check_resumed_ranks` in ``pl_module.on_load_checkpoint``, before the weights load.

    Args:
        pl_module: the module adapters were injected into (or above); only this instance's
            hook is wrapped, and its own ``on_load_checkpoint`` still runs after the check.
        current_ranks: returns the ranks injected now, called when a checkpoint loads.
    """
    original = pl_module.on_load_checkpoint
    if getattr(original, _GUARD_MARK, False):
        return

    def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict) -> None:
        check_resumed_ranks(checkpoint, current_ranks())
        original(checkpoint)

    setattr(on_load_checkpoint, _GUARD_MARK, True)
    pl_module.on_load_checkpoint = types.MethodType(on_load_checkpoint, pl_module)  # type: ignore[method-assign]
