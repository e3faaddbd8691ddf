"""From a fisher map to a PEFT config: targets, per-module ranks and alphas, and what it overrode.

:func:`lora_config_from_fisher_map` is the public factory. It fills ``target_modules``,
``rank_pattern`` and ``alpha_pattern`` from the map with keys that select exactly one module
each (see :mod:`lightning_fisher.fisher_map.patterns`) and passes every other option through to
:class:`peft.LoraConfig`. Options the map decides (``r``, ``target_modules``, the patterns, and
filters such as ``layers_to_transform`` that would change which modules are adapted) are not
silently replaced: they are reported in a :class:`FisherMapOverrideWarning`.

``lora_alpha`` and ``use_rslora`` are training choices, so yours win over the map's alpha
policy: ``lora_alpha`` is read as the alpha at the map's base rank and spread over modules by
the same policy (alpha/r constant, or alpha constant under rsLoRA; see
:class:`~lightning_fisher.fisher_map.map.AlphaPolicy`).

DoRA is ``use_dora=True``. LoHa and LoKr, whose configs also take per-module
``rank_pattern`` / ``alpha_pattern``, are served by :func:`peft_config_from_fisher_map` with
``adapter="loha"`` / ``"lokr"`` (their alpha option is called ``alpha``; alpha/r is kept
constant, as they scale by alpha/r). After injection,
:func:`~lightning_fisher.peft_factory.verify.verify_adapter_ranks` checks the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import peft

from lightning_fisher.fisher_map.patterns import exact_module_key, exact_target_regex
from lightning_fisher.peft_factory.adapter_root import rebase_names
from lightning_fisher.peft_factory.adapters import MAP_OWNED_OPTIONS, AdapterType, alpha_option, alpha_policy, config_class
from lightning_fisher.peft_factory.locate import MapSource, load_map

__all__ = [
    "FisherMapOverrideWarning",
    "MapApplication",
    "lora_config_from_fisher_map",
    "peft_config_from_fisher_map",
    "plan_from_fisher_map",
]


class FisherMapOverrideWarning(UserWarning):
    """A setting you passed was replaced by what the fisher map prescribes."""


@dataclass(frozen=True)
class MapApplication:
    """What applying a map to a (sub)model means: the config, and what was overridden or left out.

    Attributes:
        config: the PEFT config to inject.
        ranks: ``{module name relative to the adapter root: rank}``.
        alphas: ``{module name relative to the adapter root: alpha}``.
        excluded: candidates under the root that get no adapter (relative names).
        outside_root: adapted modules of the map that lie outside ``adapter_root`` (full names).
        overridden: ``{option: the value you gave}`` for options the map replaced.
    """

    config: Any
    ranks: dict[str, int]
    alphas: dict[str, float]
    excluded: list[str]
    outside_root: list[str] = field(default_factory=list)
    overridden: dict[str, Any] = field(default_factory=dict)


def plan_from_fisher_map(
    fisher_map: MapSource,
    *,
    adapter: AdapterType = "lora",
    adapter_root: Optional[str] = None,
    **options: Any,
) -> MapApplication:
    """Build the PEFT config for a map and report what it overrode; warns about nothing.

    Args:
        fisher_map: a :class:`FisherMap`, or the path of a map file or of its folder.
        adapter: ``"lora"`` (with ``use_dora=True`` for DoRA), ``"loha"`` or ``"lokr"``.
        adapter_root: the submodule PEFT will inject into, as a dotted name relative to the
            analysed model (e.g. ``"model"`` when the map was made on a LightningModule whose
            network is ``self.model``). Names are rebased onto it; map modules outside it are
            left out and listed in ``outside_root``.
        **options: any other option of the PEFT config class.

    Raises:
        ValueError: unknown ``adapter``, or no adapted module lies under ``adapter_root``.
    """
    config_type = config_class(adapter)
    if options.get("init_lora_weights") == "eva":
        raise ValueError(
            "init_lora_weights='eva': PEFT's EVA initialisation redistributes ranks itself, under the names of "
            "its PeftModel, so the map's per-module ranks would not apply; use EVA or a fisher map, not both"
        )
    fmap = load_map(fisher_map)
    overridden = {key: options.pop(key) for key in MAP_OWNED_OPTIONS if key in options}

    ranks_by_relative, outside = rebase_names(fmap.ranks, adapter_root)
    if not ranks_by_relative:
        raise ValueError(
            f"adapter_root={adapter_root!r}: none of the map's {len(fmap.ranks)} adapted modules lies under it "
            f"(e.g. {list(fmap.ranks)[:2]}); use the dotted name of the submodule that holds them"
        )
    excluded_by_relative, _ = rebase_names(fmap.excluded, adapter_root)

    policy = alpha_policy(fmap, adapter, options)
    options.pop(alpha_option(adapter), None)
    if adapter == "lora":
        options["use_rslora"] = policy.use_rslora
    ranks = {relative: fmap.ranks[full] for relative, full in ranks_by_relative.items()}
    alphas = {relative: policy.alpha_for(r, fmap.budget.rank) for relative, r in ranks.items()}

    config = config_type(
        r=fmap.budget.rank,
        target_modules=exact_target_regex(ranks),
        rank_pattern={exact_module_key(name): r for name, r in ranks.items()},
        alpha_pattern={exact_module_key(name): a for name, a in alphas.items()},
        **{alpha_option(adapter): policy.alpha_for(fmap.budget.rank, fmap.budget.rank)},
        **options,
    )
    return MapApplication(
        config=config,
        ranks=ranks,
        alphas=alphas,
        excluded=list(excluded_by_relative),
        outside_root=[name for name in outside if name in fmap.ranks],
        overridden=overridden,
    )


def peft_config_from_fisher_map(
    fisher_map: MapSource,
    *,
    adapter: AdapterType = "lora",
    adapter_root: Optional[str] = None,
    **options: Any,
):
    """PEFT config (LoRA / DoRA, LoHa or LoKr) that applies the map's targets and ranks.

    Same arguments as :func:`plan_from_fisher_map`. Options the map replaced are reported in a
    :class:`FisherMapOverrideWarning`.
    """
    plan = plan_from_fisher_map(fisher_map, adapter=adapter, adapter_root=adapter_root, **options)
    if plan.overridden:
        warnings.warn(
            "the fisher map decides which modules are adapted and at what rank, so these settings were "
            f"replaced: {', '.join(f'{k}={v!r}' for k, v in plan.overridden.items())}. Pass "
            "ignore_fisher_map / use a plain LoraConfig to train with them instead",
            FisherMapOverrideWarning,
            stacklevel=2,
        )
    return plan.config


def lora_config_from_fisher_map(
    fisher_map: MapSource, *, adapter_root: Optional[str] = None, **lora_kwargs: Any
) -> peft.LoraConfig:
    """A :class:`peft.LoraConfig` with ``target_modules``, ``rank_pattern`` and ``alpha_pattern`` from the map.

    Args:
        fisher_map: a :class:`FisherMap`, or the path of ``fisher_map.json`` or of its folder.
        adapter_root: dotted name of the submodule PEFT will inject into, relative to the
            analysed model; ``None`` injects into the analysed model itself.
        **lora_kwargs: any other :class:`peft.LoraConfig` option (``lora_dropout``,
            ``use_dora``, ``modules_to_save``, ``lora_alpha``, ``use_rslora``, ...).

    Example:
        >>> config = lora_config_from_fisher_map("data/train", lora_dropout=0.05)  # doctest: +SKIP
        >>> model = peft.get_peft_model(model, config)  # doctest: +SKIP
    """
    return peft_config_from_fisher_map(fisher_map, adapter="lora", adapter_root=adapter_root, **lora_kwargs)
