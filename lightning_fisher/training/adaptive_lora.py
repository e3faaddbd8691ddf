"""``AdaptiveLoRA``: at fit start, find the fisher map and inject adapters with its ranks.

One callback serves both ways of training: with a map it builds the PEFT config through
:func:`~lightning_fisher.peft_factory.plan_from_fisher_map` (adaptive ranks, excluded modules
untouched); without one, or with ``ignore_fisher_map=True``, it applies flat LoRA from
``lora_kwargs``. Injection happens in ``setup`` because that is the last hook before
Lightning builds the optimizer from the trainable parameters; ``on_fit_start`` is too late.
After injection :func:`~lightning_fisher.verify_adapter_ranks` checks every module's rank.

Where the map comes from, first match wins: ``fisher_map`` (a file, a folder or a
:class:`~lightning_fisher.FisherMap`), ``dataset_dir / fisher_map.json``, the datamodule's
``dataset_dir / fisher_map.json``. A map given explicitly must exist; a map merely looked for
in a dataset folder may be absent (then flat LoRA).
"""

from __future__ import annotations

import os
import statistics
import types
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import peft
import safetensors.torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_fisher.candidates import select_candidates, weight_shape
from lightning_fisher.errors import CandidateSelectionError, FisherMapNotFoundError, LightningFisherError, FragileModelError, ModelMismatchError
from lightning_fisher.fingerprint import model_fingerprint
from lightning_fisher.fisher_map import FisherMap, resolve_map_path
from lightning_fisher.patterns import exact_target_regex
from lightning_fisher.peft_factory import ADAPTER_CONFIGS, MapApplication, adapter_ranks, plan_from_fisher_map, verify_adapter_ranks

__all__ = ["AdaptiveLoRA", "CHECKPOINT_KEY", "save_adapter"]

_ADAPTER_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}

#: Key under which the applied map travels inside Lightning checkpoints.
CHECKPOINT_KEY = "lightning_fisher"


class AdaptiveLoRA(Callback):
    """Inject LoRA adapters with the fisher map's ranks at fit start (flat LoRA without a map).

    Args:
        fisher_map: the map to apply: a ``fisher_map.json`` path, its folder, or a
            :class:`~lightning_fisher.FisherMap`. Default: look in ``dataset_dir``, then in the
            datamodule's ``dataset_dir``.
        dataset_dir: folder to look for ``fisher_map.json`` in.
        ignore_fisher_map: train flat LoRA from ``lora_kwargs`` even when a map exists.
        adapter_root: dotted name of the submodule to inject into (e.g. ``"model"``), relative
            to the LightningModule; map names are rebased onto it. Default: the LightningModule.
        adapter: ``"lora"`` (DoRA with ``lora_kwargs={"use_dora": True}``), ``"loha"`` or ``"lokr"``.
        lora_kwargs: options of the PEFT config. With a map, ``r`` and ``target_modules`` are
            decided by the map (and reported if you set them); ``lora_alpha`` is the alpha at
            the map's base rank. Without a map, ``target_modules`` defaults to every
            ``nn.Linear`` under ``adapter_root`` and ``r`` to 8.
        strict: a map made for a different model is an error; ``False`` makes it a warning.
        lr_warning_threshold: with a map, warn when an optimizer's learning rate exceeds this.
        fragile: mark the model as fragile (distilled / few-step "turbo" models); applying a
            map to it then needs ``allow_fragile=True``.
        allow_fragile: explicit opt-in for applying a map to a fragile model.
        adapter_name: PEFT adapter name.
        export_dir: if set, the trained adapter is written there at the end of fit as a
            standard PEFT adapter folder (see :func:`save_adapter`).
        verbose: print the summary on rank zero.
    """

    def __init__(
        self,
        fisher_map: Union[str, os.PathLike, FisherMap, None] = None,
        dataset_dir: Union[str, os.PathLike, None] = None,
        ignore_fisher_map: bool = False,
        adapter_root: Optional[str] = None,
        adapter: Literal["lora", "loha", "lokr"] = "lora",
        lora_kwargs: Optional[dict[str, Any]] = None,
        strict: bool = True,
        lr_warning_threshold: float = 1e-4,
        fragile: bool = False,
        allow_fragile: bool = False,
        adapter_name: str = "default",
        export_dir: Union[str, os.PathLike, None] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if adapter not in ADAPTER_CONFIGS:
            raise ValueError(f"adapter: must be one of {', '.join(ADAPTER_CONFIGS)}, got {adapter!r}")
        self.fisher_map = fisher_map
        self.dataset_dir = dataset_dir
        self.ignore_fisher_map = ignore_fisher_map
        self.adapter_root = adapter_root
        self.adapter = adapter
        self.lora_kwargs = dict(lora_kwargs or {})
        self.strict = strict
        self.lr_warning_threshold = lr_warning_threshold
        self.fragile = fragile
        self.allow_fragile = allow_fragile
        self.adapter_name = adapter_name
        self.export_dir = export_dir
        self.verbose = verbose
        #: The map applied (``None`` for flat LoRA), the plan, and the PEFT config, after setup.
        self.applied_map: Optional[FisherMap] = None
        self.plan: Optional[MapApplication] = None
        self.config: Any = None
        self.summary: Optional[str] = None

    # ------------------------------------------------------------------ finding the map
    def find_map(self, trainer: Optional[pl.Trainer] = None) -> Optional[FisherMap]:
        """The map to apply, or ``None`` for flat LoRA (see the class docstring for the order)."""
        if self.ignore_fisher_map:
            return None
        if isinstance(self.fisher_map, FisherMap):
            return self.fisher_map
        if self.fisher_map is not None:
            return FisherMap.load(self.fisher_map)
        folder = self.dataset_dir
        if folder is None and trainer is not None:
            folder = getattr(trainer.datamodule, "dataset_dir", None)
        if folder is None:
            return None
        try:
            return FisherMap.load(resolve_map_path(folder))
        except FisherMapNotFoundError:
            return None

    # ------------------------------------------------------------------ injection
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = pl_module if not self.adapter_root else pl_module.get_submodule(self.adapter_root)
        if adapter_ranks(root, self.adapter_name):
            return  # already injected (e.g. test after fit in the same process)
        fisher_map = self.find_map(trainer)
        flat_rank, flat_alpha = 8, None
        if fisher_map is None and self.ignore_fisher_map:
            # Flat training instead of an existing map: compare like with like, at its base
            # rank and with its alpha policy (the same scaling as the map's modules).
            ignored = self._find_ignored_map(trainer)
            if ignored is not None:
                flat_rank = ignored.budget.rank
                flat_alpha = ignored.alpha.alpha_for(flat_rank, flat_rank)
        if fisher_map is not None:
            self._check_model(fisher_map, pl_module)
            self._check_fragile(fisher_map)
            self.plan = plan_from_fisher_map(
                fisher_map, adapter=self.adapter, adapter_root=self.adapter_root, **self.lora_kwargs
            )
            self.config = self.plan.config
        else:
            self.config = self._flat_config(root, flat_rank, flat_alpha)
        peft.inject_adapter_in_model(self.config, root, adapter_name=self.adapter_name)
        if fisher_map is not None:
            verify_adapter_ranks(root, fisher_map, adapter_name=self.adapter_name, adapter_root=self.adapter_root)
        self.applied_map = fisher_map
        self._guard_checkpoint_loading(pl_module)
        self.summary = self._describe(root, fisher_map)
        if self.verbose:
            rank_zero_info(self.summary)

    def _find_ignored_map(self, trainer: pl.Trainer) -> Optional[FisherMap]:
        self.ignore_fisher_map = False
        try:
            return self.find_map(trainer)
        except LightningFisherError:
            return None
        finally:
            self.ignore_fisher_map = True

    def _flat_config(self, root: nn.Module, default_rank: int, default_alpha: Optional[float]):
        options = dict(self.lora_kwargs)
        if "target_modules" not in options:
            options["target_modules"] = exact_target_regex(select_candidates(root))
        options.setdefault("r", default_rank)
        # The library's alpha policy also without a map: alpha = 2r, i.e. scaling 2 (PEFT's own
        # default, alpha 8, would scale rank 64 by 1/8).
        alpha_option = "lora_alpha" if self.adapter == "lora" else "alpha"
        options.setdefault(alpha_option, default_alpha if default_alpha is not None else 2.0 * options["r"])
        return ADAPTER_CONFIGS[self.adapter](**options)

    def _check_model(self, fisher_map: FisherMap, pl_module: pl.LightningModule) -> None:
        if fisher_map.model.fingerprint == model_fingerprint(pl_module):
            return
        modules = dict(pl_module.named_modules())
        lines = []
        for record in fisher_map.modules:
            module = modules.get(record.name)
            if module is None:
                lines.append(f"missing in model: {record.name}")
                continue
            try:
                shape = tuple(weight_shape(module))
            except CandidateSelectionError:
                shape = None
            if shape != tuple(record.shape):
                lines.append(f"shape differs: {record.name} map {list(record.shape)} vs model {list(shape or ())}")
        if not lines:
            lines.append(
                f"every candidate module matches, but other parameters differ (map made on a "
                f"{fisher_map.model.class_name} with {fisher_map.model.num_parameters:,} parameters, this "
                f"{type(pl_module).__name__} has {sum(p.numel() for p in pl_module.parameters()):,})"
            )
        where = f" {fisher_map.path}" if fisher_map.path else ""
        message = (
            f"fisher map{where} was made for another model ({len(lines)} difference(s)):\n  "
            + "\n  ".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else "")
            + "\nRe-run the analysis for this model, or pass strict=False to apply it anyway."
        )
        if self.strict:
            raise ModelMismatchError(message)
        rank_zero_warn(message)
        missing = [line for line in lines if line.startswith("missing in model")]
        if missing:
            raise ModelMismatchError(message.split("\nRe-run")[0] + "\nModules the map adapts are missing; cannot apply it.")

    def _check_fragile(self, fisher_map: FisherMap) -> None:
        if self.fragile and not self.allow_fragile:
            raise FragileModelError(
                "this model is marked fragile (distilled / few-step models such as 'turbo' variants): adaptive "
                "ranks adapt strongly and can destabilise it (loss spikes, noise outputs). Prefer the base "
                "model, or opt in with allow_fragile=True and a lower learning rate; to train flat ranks "
                "instead, pass ignore_fisher_map=True"
            )

    # ------------------------------------------------------------------ reporting
    def _describe(self, root: nn.Module, fisher_map: Optional[FisherMap]) -> str:
        trainable = _adapter_parameters(root)
        ranks = adapter_ranks(root, self.adapter_name)
        values = sorted(ranks.values())
        if fisher_map is None:
            return (
                f"Flat {_ADAPTER_NAMES[self.adapter]}: {len(ranks)} modules at rank {values[0] if values else '-'}, "
                f"{trainable:,} trainable adapter parameters"
                + (" (fisher map ignored: ignore_fisher_map=True)" if self.ignore_fisher_map else "")
            )
        assert self.plan is not None
        budget = fisher_map.budget
        candidates = len(self.plan.ranks) + len(self.plan.excluded)
        lines = [
            f"Fisher map detected: {fisher_map.path or '(in memory)'}",
            f"  modules adapted: {len(ranks)} / {candidates} candidates"
            + (f" ({len(self.plan.excluded)} excluded: {', '.join(self.plan.excluded[:4])}"
               + (", ..." if len(self.plan.excluded) > 4 else "") + ")" if self.plan.excluded else ""),
            f"  ranks: {values[0]}-{values[-1]}, median {statistics.median(values):g} "
            f"(map: rank {budget.rank}, min {budget.rank_min}, max {budget.rank_max}, mode {budget.mode})",
            f"  trainable adapter parameters: {trainable:,} = {trainable / max(1, budget.flat_lora_parameters):.2f}x "
            f"flat rank {budget.rank} on all {len(fisher_map.modules)} candidates ({budget.flat_lora_parameters:,})",
        ]
        if fisher_map.analysis is not None:
            a = fisher_map.analysis
            focus = a.timestep_focus.name + (f" {list(a.timestep_focus.range)}" if a.timestep_focus.range else "")
            lines.append(
                f"  analysis: {a.samples} samples in {a.batches} batches, {a.stop_reason}; timestep focus {focus}"
            )
        if self.plan.outside_root:
            lines.append(f"  outside adapter_root {self.adapter_root!r}, not adapted: {', '.join(self.plan.outside_root)}")
        if self.plan.overridden:
            lines.append(
                "  settings replaced by the map: " + ", ".join(f"{k}={v!r}" for k, v in self.plan.overridden.items())
            )
        return "\n".join(lines)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied_map is None:
            return
        # Only the groups that train adapters (a head may rightly use a larger rate). A
        # scheduler's warm-up lowers "lr" at the start; "initial_lr" is the rate it ramps to.
        adapter_ids = {id(p) for p in _adapter_parameter_list(_root(pl_module, self.adapter_root))}
        rates = [
            max(group.get("initial_lr", 0.0), group.get("lr", 0.0))
            for optimizer in trainer.optimizers
            for group in optimizer.param_groups
            if any(id(p) in adapter_ids for p in group["params"])
        ]
        high = [lr for lr in rates if lr > self.lr_warning_threshold]
        if high:
            rank_zero_warn(
                f"a fisher map concentrates adapter capacity where the data pulls hardest, so it adapts faster "
                f"and can overfit sooner than flat ranks: learning rate {max(high):g} is above "
                f"{self.lr_warning_threshold:g}; consider about {max(high) / 2:g} and watch validation closely"
            )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "fisher_map": None if self.applied_map is None else self.applied_map.to_dict(),
            "adapter_ranks": adapter_ranks(_root(pl_module, self.adapter_root), self.adapter_name),
        }

    def _guard_checkpoint_loading(self, pl_module: pl.LightningModule) -> None:
        """Check a resumed checkpoint's adapters against the ones just injected, before weights load.

        Lightning loads model weights right after the module's ``on_load_checkpoint`` and before
        any callback hook runs, so the check wraps that one hook of this module instance. A
        mismatch (the map file changed since the checkpoint) becomes an error naming the
        modules instead of a bare tensor size mismatch.
        """
        original = pl_module.on_load_checkpoint
        if getattr(original, "_lightning_fisher_guard", False):
            return
        callback = self

        def on_load_checkpoint(module: pl.LightningModule, checkpoint: dict) -> None:
            stored = checkpoint.get(CHECKPOINT_KEY)
            if stored is not None:
                current = adapter_ranks(_root(module, callback.adapter_root), callback.adapter_name)
                saved = stored["adapter_ranks"]
                if saved != current:
                    changed = sorted(set(saved) ^ set(current)) + sorted(
                        n for n in set(saved) & set(current) if saved[n] != current[n]
                    )
                    raise ModelMismatchError(
                        f"the checkpoint's adapters differ from the ones the current fisher map gives in "
                        f"{len(changed)} module(s), e.g. {changed[:5]}: the map changed since the checkpoint was "
                        "written. Resume with the original map (AdaptiveLoRA(fisher_map=...)); the checkpoint "
                        f"holds it under checkpoint[{CHECKPOINT_KEY!r}]['fisher_map']"
                    )
            original(checkpoint)

        on_load_checkpoint._lightning_fisher_guard = True  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = types.MethodType(on_load_checkpoint, pl_module)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ export
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is not None and trainer.is_global_zero:
            path = save_adapter(_root(pl_module, self.adapter_root), self.export_dir, adapter_name=self.adapter_name)
            rank_zero_info(f"adapter written to {path}")


def _root(pl_module: nn.Module, adapter_root: Optional[str]) -> nn.Module:
    return pl_module if not adapter_root else pl_module.get_submodule(adapter_root)


def _adapter_parameter_list(root: nn.Module) -> list[nn.Parameter]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        p
        for module in root.modules()
        if isinstance(module, BaseTunerLayer)
        for layer_name in module.adapter_layer_names
        for p in getattr(module, layer_name).parameters()
    ]


def _adapter_parameters(root: nn.Module) -> int:
    return sum(p.numel() for p in _adapter_parameter_list(root))


def save_adapter(root: nn.Module, directory: Union[str, os.PathLike], *, adapter_name: str = "default") -> Path:
    """Write the adapters injected in ``root`` as a standard PEFT adapter folder.

    The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` in the layout
    ``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained(base_model, directory)``
    loads it on a fresh copy of the base model with the same ranks.

    Args:
        root: the module the adapters were injected into (``adapter_root``).
        directory: output folder (created).
        adapter_name: which adapter to write.
    """
    config = getattr(root, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(f"no PEFT adapter {adapter_name!r} was injected into {type(root).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(root, adapter_name=adapter_name)
    # PeftModel stores its weights under the names it sees: base_model.model.<module>.
    state = {f"base_model.model.{key}": value.detach().cpu().contiguous() for key, value in state.items()}
    temporary = directory / ".adapter_model.safetensors.tmp"
    safetensors.torch.save_file(state, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, directory / "adapter_model.safetensors")
    config.save_pretrained(str(directory))
    return directory
