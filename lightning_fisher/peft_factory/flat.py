"""Flat LoRA: one rank on every candidate module, the baseline a map is measured against.

Flat LoRA follows the library's alpha policy too: alpha = 2r, i.e. scaling 2 at any rank
(PEFT's own default, alpha 8, would scale rank 64 by 1/8). When flat LoRA replaces an existing
map (``ignore_fisher_map``), it takes that map's base rank and alpha, so the two compare like
with like.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from torch import nn

from lightning_fisher.allocation.trace_rule import flat_lora_parameters
from lightning_fisher.analysis.candidates import is_supported, rank_cost, select_candidates
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.analysis.module_names import named_modules
from lightning_fisher.fisher_map.patterns import exact_target_regex
from lightning_fisher.peft_factory.adapters import AdapterType, alpha_option, config_class

__all__ = ["FLAT_RANK", "candidates_not_in", "flat_config", "flat_lora_on"]

#: Flat LoRA's rank when neither your options nor a replaced map give one.
FLAT_RANK = 8


def flat_config(root: nn.Module, *, adapter: AdapterType = "lora", like: Optional[FisherMap] = None, **options: Any):
    """PEFT config of flat adapters on ``root``, with your options taking precedence.

    Args:
        root: the module to inject into; its candidate modules (every supported layer, see
            :func:`~lightning_fisher.select_candidates`) are the default ``target_modules``.
        adapter: ``"lora"``, ``"loha"`` or ``"lokr"``.
        like: a map this flat config stands in for: its base rank and its alpha at that rank
            become the defaults.
        **options: any option of the PEFT config class; ``r`` defaults to ``like``'s base rank
            or :data:`FLAT_RANK`, the alpha option to ``like``'s alpha or ``2 * r``.
    """
    config_type = config_class(adapter)
    if "target_modules" not in options:
        options["target_modules"] = exact_target_regex(select_candidates(root))
    base_rank = like.budget.rank if like is not None else FLAT_RANK
    options.setdefault("r", base_rank)
    default_alpha = like.alpha.alpha_for(base_rank, base_rank) if like is not None else 2.0 * options["r"]
    options.setdefault(alpha_option(adapter), default_alpha)
    return config_type(**options)


def flat_lora_on(root: nn.Module, names: Iterable[str], rank: int) -> tuple[int, int]:
    """``(modules, parameters)`` of flat LoRA at ``rank`` on the modules ``names`` of ``root``, as they are now.

    Counted on the model about to be trained, before injection wraps its modules: a map
    applied with ``strict=False`` may have recorded other shapes. Names that are missing or no
    longer a supported layer are not counted.

    Args:
        root: the module adapters go into.
        names: module names relative to ``root`` (e.g. the map's candidates under it).
        rank: flat LoRA's rank.
    """
    modules = dict(named_modules(root))
    costs = {name: rank_cost(modules[name]) for name in names if name in modules and is_supported(modules[name])}
    return len(costs), flat_lora_parameters(rank, costs)


def candidates_not_in(root: nn.Module, names: Iterable[str]) -> list[str]:
    """Candidate modules of ``root`` that ``names`` (a map's modules under it) do not mention, in model order.

    Candidates of the kinds the map holds (``nn.Linear``, ``nn.Embedding``, ...), counted on the
    model about to be trained, before injection: a map edited by hand, or made with other
    ``include`` / ``exclude`` patterns, leaves such modules without an adapter.

    Args:
        root: the module adapters go into.
        names: module names relative to ``root``.
    """
    mentioned = set(names)
    modules = dict(named_modules(root))
    kinds = tuple({type(modules[name]) for name in mentioned if name in modules and is_supported(modules[name])})
    if not kinds:
        return []
    return [name for name in select_candidates(root, module_types=kinds) if name not in mentioned]
