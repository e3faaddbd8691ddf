"""From a fisher map to a PEFT config, and a check that injection did what the map says.

:func:`lora_config_from_fisher_map` is the public factory. It fills ``target_modules``,
``rank_pattern`` and ``alpha_pattern`` from the map with keys that select exactly one module
each (see :mod:`lightning_fisher.patterns`) and passes every other option through to
:class:`peft.LoraConfig`. Options the map decides (``r``, ``target_modules``, the patterns, and
filters such as ``layers_to_transform`` that would change which modules are adapted) are not
silently replaced: they are reported in a :class:`FisherMapOverrideWarning`.

``lora_alpha`` and ``use_rslora`` are training choices, so yours win over the map's alpha
policy: ``lora_alpha`` is read as the alpha at the map's base rank and spread over modules by
the same policy (alpha/r constant, or alpha constant under rsLoRA; see
:class:`~lightning_fisher.fisher_map.AlphaPolicy`).

DoRA is ``use_dora=True``. LoHa and LoKr, whose configs also take per-module
``rank_pattern`` / ``alpha_pattern``, are served by :func:`peft_config_from_fisher_map` with
``adapter="loha"`` / ``"lokr"`` (their alpha option is called ``alpha``; alpha/r is kept
constant, as they scale by alpha/r).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import peft
from torch import nn

from lightning_fisher.errors import AdapterRankMismatchError
from lightning_fisher.fisher_map import AlphaPolicy, FisherMap
from lightning_fisher.patterns import exact_module_key, exact_target_regex

__all__ = [
    "ADAPTER_CONFIGS",
    "FisherMapOverrideWarning",
    "MapApplication",
    "adapter_ranks",
    "lora_config_from_fisher_map",
    "peft_config_from_fisher_map",
    "plan_from_fisher_map",
    "verify_adapter_ranks",
]

MapSource = Union[FisherMap, str, os.PathLike]

ADAPTER_CONFIGS: dict[str, type] = {
    "lora": peft.LoraConfig,
    "loha": peft.LoHaConfig,
    "lokr": peft.LoKrConfig,
}

# Options that decide which modules are adapted or at what rank: the map owns them.
_MAP_OWNED = ("r", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "exclude_modules")


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


def _load(source: MapSource) -> FisherMap:
    return source if isinstance(source, FisherMap) else FisherMap.load(source)


def _rebase(names, adapter_root: Optional[str]) -> tuple[dict[str, str], list[str]]:
    """``({relative name: full name}, [full names outside the root])``."""
    if not adapter_root:
        return {name: name for name in names}, []
    prefix = adapter_root.rstrip(".") + "."
    inside = {name[len(prefix):]: name for name in names if name.startswith(prefix)}
    outside = [name for name in names if not name.startswith(prefix)]
    return inside, outside


def plan_from_fisher_map(
    fisher_map: MapSource,
    *,
    adapter: Literal["lora", "loha", "lokr"] = "lora",
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
    if adapter not in ADAPTER_CONFIGS:
        raise ValueError(f"adapter: must be one of {', '.join(ADAPTER_CONFIGS)}, got {adapter!r}")
    if options.get("init_lora_weights") == "eva":
        raise ValueError(
            "init_lora_weights='eva': PEFT's EVA initialisation redistributes ranks itself, under the names of "
            "its PeftModel, so the map's per-module ranks would not apply; use EVA or a fisher map, not both"
        )
    fmap = _load(fisher_map)
    alpha_option = "lora_alpha" if adapter == "lora" else "alpha"
    overridden = {key: options.pop(key) for key in _MAP_OWNED if key in options}

    ranks_by_relative, outside = _rebase(fmap.ranks, adapter_root)
    if not ranks_by_relative:
        raise ValueError(
            f"adapter_root={adapter_root!r}: none of the map's {len(fmap.ranks)} adapted modules lies under it "
            f"(e.g. {list(fmap.ranks)[:2]}); use the dotted name of the submodule that holds them"
        )
    excluded_by_relative, _ = _rebase(fmap.excluded, adapter_root)

    use_rslora = bool(options.get("use_rslora", fmap.alpha.use_rslora)) if adapter == "lora" else False
    if adapter == "lora":
        options["use_rslora"] = use_rslora
    base_alpha = options.pop(alpha_option, None)
    policy = AlphaPolicy(
        lora_alpha=float(fmap.alpha.lora_alpha if base_alpha is None else base_alpha), use_rslora=use_rslora
    )
    ranks = {relative: fmap.ranks[full] for relative, full in ranks_by_relative.items()}
    alphas = {relative: policy.alpha_for(r, fmap.budget.rank) for relative, r in ranks.items()}

    config_class = ADAPTER_CONFIGS[adapter]
    config = config_class(
        r=fmap.budget.rank,
        target_modules=exact_target_regex(ranks),
        rank_pattern={exact_module_key(name): r for name, r in ranks.items()},
        alpha_pattern={exact_module_key(name): a for name, a in alphas.items()},
        **{alpha_option: policy.alpha_for(fmap.budget.rank, fmap.budget.rank)},
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
    adapter: Literal["lora", "loha", "lokr"] = "lora",
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


def _tuned_root(model: nn.Module) -> nn.Module:
    if isinstance(model, peft.PeftModel):
        return model.base_model.model
    if isinstance(model, peft.tuners.tuners_utils.BaseTuner):
        return model.model
    return model


def adapter_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """``{module name: rank}`` of the adapters named ``adapter_name`` injected in ``model``.

    Names are relative to the model PEFT injected into (a ``PeftModel`` is unwrapped). The
    rank is read from the adapter's weights where they show it (LoRA's ``lora_A``), else from
    the layer's ``r``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    ranks = {}
    for name, module in _tuned_root(model).named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(module, "r", {}):
            continue
        rank = int(module.r[adapter_name])
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter_name in lora_a:
            rank = int(lora_a[adapter_name].weight.shape[0])
        embedding_a = getattr(module, "lora_embedding_A", None)
        if embedding_a is not None and adapter_name in embedding_a:
            rank = int(embedding_a[adapter_name].shape[0])
        ranks[name] = rank
    return ranks


def verify_adapter_ranks(
    model: nn.Module,
    fisher_map: MapSource,
    *,
    adapter_name: str = "default",
    adapter_root: Optional[str] = None,
) -> dict[str, int]:
    """Check that every adapter has exactly the map's rank and nothing else got one.

    Args:
        model: the model after injection (a ``PeftModel``, or a module injected in place).
        fisher_map: the map, or its path.
        adapter_name: the PEFT adapter to check.
        adapter_root: as in :func:`lora_config_from_fisher_map`, when ``model`` is a submodule
            of the analysed model.

    Returns:
        The verified ``{module name: rank}``.

    Raises:
        AdapterRankMismatchError: listing every module with a missing adapter, a wrong rank,
            or an adapter it should not have (excluded or not a candidate).
    """
    fmap = _load(fisher_map)
    expected_full, _ = _rebase(fmap.ranks, adapter_root)
    expected = {relative: fmap.ranks[full] for relative, full in expected_full.items()}
    excluded = set(_rebase(fmap.excluded, adapter_root)[0])
    actual = adapter_ranks(model, adapter_name)

    problems = []
    for name, rank in expected.items():
        if name not in actual:
            problems.append(f"{name}: no adapter, map says rank {rank}")
        elif actual[name] != rank:
            problems.append(f"{name}: adapter rank {actual[name]}, map says {rank}")
    for name, rank in actual.items():
        if name in expected:
            continue
        why = "excluded by the map" if name in excluded else "not a module the map adapts"
        problems.append(f"{name}: has a rank-{rank} adapter but is {why}")
    if problems:
        source = f" ({fmap.path})" if fmap.path else ""
        raise AdapterRankMismatchError(
            f"adapters do not match the fisher map{source} in {len(problems)} module(s):\n  "
            + "\n  ".join(problems)
        )
    return actual
