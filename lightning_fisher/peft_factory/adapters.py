"""The adapter types a map can be applied with, and the PEFT options that differ between them.

LoRA (and DoRA, ``use_dora=True``), LoHa and LoKr all take per-module ``rank_pattern`` and
``alpha_pattern``. Their alpha option is named differently (``lora_alpha`` for LoRA, ``alpha``
for the others), and only LoRA has rsLoRA; LoHa and LoKr scale by alpha/r, so alpha/r is kept
constant for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import peft

from lightning_fisher.fisher_map.map import AlphaPolicy, FisherMap

__all__ = ["ADAPTER_CONFIGS", "AdapterType", "MAP_OWNED_OPTIONS", "alpha_option", "alpha_policy", "config_class"]

AdapterType = Literal["lora", "loha", "lokr"]

ADAPTER_CONFIGS: dict[str, type] = {
    "lora": peft.LoraConfig,
    "loha": peft.LoHaConfig,
    "lokr": peft.LoKrConfig,
}

#: Options that decide which modules are adapted or at what rank. The map (or, in a comparison,
#: each arm) sets them; values you pass are replaced and reported, never silently used.
MAP_OWNED_OPTIONS = (
    "r",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
)


def config_class(adapter: str) -> type:
    """The PEFT config class of ``adapter`` (``"lora"``, ``"loha"`` or ``"lokr"``).

    Raises:
        ValueError: naming the ``adapter`` option and the accepted values.
    """
    if adapter not in ADAPTER_CONFIGS:
        raise ValueError(f"adapter: must be one of {', '.join(ADAPTER_CONFIGS)}, got {adapter!r}")
    return ADAPTER_CONFIGS[adapter]


def alpha_option(adapter: str) -> str:
    """Name of the alpha option in ``adapter``'s config: ``"lora_alpha"`` for LoRA, else ``"alpha"``."""
    return "lora_alpha" if adapter == "lora" else "alpha"


def alpha_policy(fisher_map: FisherMap, adapter: str, options: Mapping[str, Any]) -> AlphaPolicy:
    """The alpha policy a config built from ``fisher_map`` follows, with your options taken into account.

    Args:
        fisher_map: its :class:`~lightning_fisher.fisher_map.map.AlphaPolicy` is the default.
        adapter: the adapter type; only LoRA can use rsLoRA.
        options: PEFT options you passed. Your alpha option (see :func:`alpha_option`) is read
            as the alpha at the map's base rank; your ``use_rslora`` replaces the map's.
    """
    use_rslora = bool(options.get("use_rslora", fisher_map.alpha.use_rslora)) if adapter == "lora" else False
    base_alpha = options.get(alpha_option(adapter))
    return AlphaPolicy(
        lora_alpha=float(fisher_map.alpha.lora_alpha if base_alpha is None else base_alpha), use_rslora=use_rslora
    )
