"""``AdaptiveLoRA``: at fit start, find the fisher map and inject adapters with its ranks.

One callback serves both ways of training: with a map it builds the PEFT config through
:func:`~lightning_fisher.peft_factory.plan_from_fisher_map` (adaptive ranks, excluded modules
untouched); without one, or with ``ignore_fisher_map=True``, it applies flat LoRA
(:func:`~lightning_fisher.peft_factory.flat_config`). Injection happens in ``setup`` because
that is the last hook before Lightning builds the optimizer from the trainable parameters;
``on_fit_start`` is too late. After injection :func:`~lightning_fisher.verify_adapter_ranks`
checks every module's rank; when injection or that check fails, the model is put back as it was
(:func:`~lightning_fisher.peft_factory.injection_undone_on_error`) before the error propagates.
A base quantized with bitsandbytes gets PEFT's bnb LoRA layers even when quantized by hand
(:mod:`lightning_fisher.peft_factory.quantized`).

The learning-rate check at fit start is relative: with Adam-style optimizers an adapter's step
in weight space is about its scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) times
the learning rate, so a map that gives some module a larger scaling than flat LoRA's at the
map's base rank takes larger steps there at the same learning rate. The warning names that
module and the learning rate that keeps the largest step equal to flat LoRA's. The default
alpha policy (alpha/r constant) never raises a scaling, so it never warns; rsLoRA, or your own
alphas, can. An absolute ceiling (``lr_warning_threshold``) is checked as well when you set
one, and by default for models marked fragile.

Where the map comes from is :func:`~lightning_fisher.peft_factory.find_fisher_map`'s rule:
``fisher_map`` (a file, a folder or a :class:`~lightning_fisher.FisherMap`), else
``dataset_dir / fisher_map.json``, else the datamodule's ``dataset_dir / fisher_map.json``. A
map given explicitly must exist; a map merely looked for in a dataset folder may be absent
(then flat LoRA).

Resuming re-injects in ``setup`` and checks the checkpoint's adapters against the injected ones
before its weights load; :mod:`lightning_fisher.training.adapter_checkpoint` explains why that
check sits on the module's ``on_load_checkpoint`` and not in this callback's own state.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import peft
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_fisher.errors import FragileModelError, LightningFisherError
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.fisher_map.summary import fit_summary
from lightning_fisher.peft_factory.record import applied_map_record
from lightning_fisher.peft_factory import (
    MapApplication,
    adapter_parameters,
    candidates_not_in,
    adapter_state_dict,
    adapter_ranks,
    check_model,
    config_class,
    count_adapter_parameters,
    find_fisher_map,
    flat_config,
    flat_lora_on,
    injection_undone_on_error,
    learning_rate_warnings,
    plan_from_fisher_map,
    quantization_declared,
    root_module,
    save_adapter,
    verify_adapter_ranks,
)
from lightning_fisher.training.adapter_checkpoint import CHECKPOINT_KEY, checkpoint_entry, guard_checkpoint_loading
from lightning_fisher.wording import plural

__all__ = ["AdaptiveLoRA", "CHECKPOINT_KEY", "FRAGILE_LR_CEILING", "flag_spelling", "python_spelling", "save_adapter"]

_ADAPTER_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}

#: The learning-rate ceiling for a model marked fragile, when ``lr_warning_threshold`` is not
#: given (Side-Step's advice for distilled / few-step models).
FRAGILE_LR_CEILING = 1e-4


_ADAPTED_LINE = re.compile(r"^(  modules adapted: \d+ / )(\d+)( candidates)")


def with_unmapped_candidates(summary: str, unmapped: list[str]) -> str:
    """The fit summary counting the model's candidates the map does not mention, and naming them.

    The summary counts the map's candidates; a model with more (a map edited by hand, or made
    with other include / exclude patterns) trains those without an adapter, which must not
    read as "every candidate adapted".
    """
    if not unmapped:
        return summary
    listed = ", ".join(unmapped[:4]) + (", ..." if len(unmapped) > 4 else "")
    note = (
        f"  not in the fisher map, so no adapter: {plural(len(unmapped), 'candidate module')} of this model "
        f"({listed}); analyse this model again to score them"
    )
    lines = summary.splitlines()
    for index, line in enumerate(lines):
        counted = _ADAPTED_LINE.match(line)
        if counted:
            total = int(counted.group(2)) + len(unmapped)
            lines[index] = f"{counted.group(1)}{total}{counted.group(3)} on the model" + line[counted.end():]
            lines.insert(index + 1, note)
            break
    else:
        lines.append(note)
    return "\n".join(lines)


def python_spelling(name: str, value: Any = None) -> str:
    """``strict=False`` (``strict`` with no value): how a script sets an option of :class:`AdaptiveLoRA`, for messages."""
    return name if value is None else f"{name}={value!r}"


def flag_spelling(name: str, value: Any = None) -> str:
    """``--adaptive_lora.strict false``: how the command line (or, as a key, a config file) sets it."""
    flag = f"--adaptive_lora.{name}"
    if value is None:
        return flag
    return f"{flag} {str(value).lower() if isinstance(value, bool) else value}"


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
            candidate module under ``adapter_root`` and ``r`` to
            :data:`~lightning_fisher.peft_factory.FLAT_RANK` (8).
        strict: a map made for a different model is an error; ``False`` makes it a warning.
        lr_warning_threshold: with a map, also warn when the adapters' learning rate exceeds
            this absolute ceiling. Default ``None``: no ceiling, except
            :data:`FRAGILE_LR_CEILING` for a model marked ``fragile``. The relative check (see
            the module docstring) runs either way.
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
        lr_warning_threshold: Optional[float] = None,
        fragile: bool = False,
        allow_fragile: bool = False,
        adapter_name: str = "default",
        export_dir: Union[str, os.PathLike, None] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        config_class(adapter)  # an unknown adapter fails here, not at fit start
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
        self._flat: Optional[tuple[int, int]] = None  # (candidates, parameters) of flat LoRA on this model
        self._unmapped: list[str] = []  # candidates of this model the map does not mention
        #: How messages spell setting one of these options: ``strict=False`` in Python; the
        #: command line sets :func:`flag_spelling` (``--adaptive_lora.strict false``).
        self.spell_option: Callable[[str, Any], str] = python_spelling

    # ------------------------------------------------------------------ finding the map
    def find_map(self, trainer: Optional[pl.Trainer] = None) -> Optional[FisherMap]:
        """The map to apply, or ``None`` for flat LoRA (see the module docstring for the order).

        Args:
            trainer: its datamodule's ``dataset_dir`` is looked in last.
        """
        if self.ignore_fisher_map:
            return None
        return self._locate_map(trainer)

    def _locate_map(self, trainer: Optional[pl.Trainer]) -> Optional[FisherMap]:
        return find_fisher_map(self.fisher_map, self.dataset_dir, getattr(trainer, "datamodule", None))

    # ------------------------------------------------------------------ injection
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = root_module(pl_module, self.adapter_root)
        if adapter_ranks(root, self.adapter_name):
            return  # already injected (e.g. test after fit in the same process)
        fisher_map = self.find_map(trainer)
        if fisher_map is not None:
            warning = check_model(
                fisher_map, pl_module, strict=self.strict, strict_option=self.spell_option("strict", False)
            )
            if warning is not None:
                rank_zero_warn(warning)
            self._check_fragile()
            self.plan = plan_from_fisher_map(
                fisher_map, adapter=self.adapter, adapter_root=self.adapter_root, **self.lora_kwargs
            )
            self.config = self.plan.config
            # Before injection wraps the modules: flat LoRA on the candidates of the model trained
            # (the map's own count comes from the analysed model, whose shapes may differ).
            self._flat = flat_lora_on(root, [*self.plan.ranks, *self.plan.excluded], fisher_map.budget.rank)
            self._unmapped = candidates_not_in(root, [*self.plan.ranks, *self.plan.excluded])
        else:
            # Flat instead of an existing map: like with like, at its base rank and alpha.
            replaced = self._find_ignored_map(trainer) if self.ignore_fisher_map else None
            self.config = flat_config(root, adapter=self.adapter, like=replaced, **self.lora_kwargs)
        with injection_undone_on_error(root, self.adapter_name):
            with quantization_declared(root):  # bitsandbytes layers get PEFT's bnb LoRA layers
                peft.inject_adapter_in_model(self.config, root, adapter_name=self.adapter_name)
            if fisher_map is not None:
                verify_adapter_ranks(root, fisher_map, adapter_name=self.adapter_name, adapter_root=self.adapter_root)
        self.applied_map = fisher_map
        guard_checkpoint_loading(pl_module, lambda: adapter_ranks(root, self.adapter_name))
        self.summary = self._describe(root, fisher_map)
        if self.verbose:
            rank_zero_info(self.summary)
        self._log_applied_map(trainer, root, fisher_map)

    def _log_applied_map(self, trainer: pl.Trainer, root: nn.Module, fisher_map: Optional[FisherMap]) -> None:
        # The run folder should say which map shaped the adapters (or that none did).
        record = applied_map_record(
            fisher_map,
            adapter_ranks(root, self.adapter_name),
            count_adapter_parameters(root),
            None if self._flat is None else self._flat[1],
            ignored=self.ignore_fisher_map,
        )
        for logger in trainer.loggers:
            logger.log_hyperparams(record)

    def _find_ignored_map(self, trainer: pl.Trainer) -> Optional[FisherMap]:
        try:
            return self._locate_map(trainer)
        except LightningFisherError:
            return None  # an unreadable map that is ignored anyway must not stop flat training

    def _check_fragile(self) -> None:
        if self.fragile and not self.allow_fragile:
            raise FragileModelError(
                "this model is marked fragile (distilled / few-step models such as 'turbo' variants): adaptive "
                "ranks adapt strongly and can destabilise it (loss spikes, noise outputs). Prefer the base "
                f"model, or opt in with {self.spell_option('allow_fragile', True)} and a lower learning rate; to "
                f"train flat ranks instead, pass {self.spell_option('ignore_fisher_map', True)}"
            )

    # ------------------------------------------------------------------ reporting
    def _describe(self, root: nn.Module, fisher_map: Optional[FisherMap]) -> str:
        summary = fit_summary(
            fisher_map,
            self.plan,
            ranks=adapter_ranks(root, self.adapter_name),
            trainable_parameters=count_adapter_parameters(root),
            adapter_root=self.adapter_root,
            adapter_label=_ADAPTER_NAMES[self.adapter],
            map_ignored=self.ignore_fisher_map,
            flat=self._flat,
        )
        return summary if fisher_map is None else with_unmapped_candidates(summary, self._unmapped)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied_map is None or self.plan is None:
            return
        # Only the groups that train adapters (a head may rightly use a larger rate). A
        # scheduler's warm-up lowers "lr" at the start; "initial_lr" is the rate it ramps to.
        adapter_ids = {id(p) for p in adapter_parameters(root_module(pl_module, self.adapter_root))}
        rates = [
            max(group.get("initial_lr", 0.0), group.get("lr", 0.0))
            for optimizer in trainer.optimizers
            for group in optimizer.param_groups
            if any(id(p) in adapter_ids for p in group["params"])
        ]
        if not rates:
            return
        for warning in learning_rate_warnings(
            max(rates), self.plan, self.config, self.adapter, self.applied_map.budget.rank, self._lr_ceiling()
        ):
            rank_zero_warn(warning)

    def _lr_ceiling(self) -> tuple[Optional[float], str]:
        if self.lr_warning_threshold is not None:
            return self.lr_warning_threshold, "lr_warning_threshold"
        if self.fragile:
            option = self.spell_option("lr_warning_threshold", None)
            return FRAGILE_LR_CEILING, f"the ceiling for models marked fragile; set {option} to change it"
        return None, ""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        ranks = adapter_ranks(root_module(pl_module, self.adapter_root), self.adapter_name)
        checkpoint[CHECKPOINT_KEY] = checkpoint_entry(self.applied_map, ranks)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_dir is None:
            return
        root = root_module(pl_module, self.adapter_root)
        # Every process: gathering sharded (FSDP2) adapter weights is a collective.
        state = adapter_state_dict(root, adapter_name=self.adapter_name)
        if trainer.is_global_zero:
            path = save_adapter(root, self.export_dir, adapter_name=self.adapter_name, state=state)
            rank_zero_info(f"adapter written to {path}")
