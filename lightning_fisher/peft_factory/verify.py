"""After injection: does every module have exactly the rank the map (or a checkpoint) says?"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from torch import nn

from lightning_fisher.errors import AdapterRankMismatchError
from lightning_fisher.peft_factory.adapter_root import rebase_names
from lightning_fisher.peft_factory.injected import adapter_ranks
from lightning_fisher.peft_factory.locate import MapSource, load_map

__all__ = ["changed_modules", "verify_adapter_ranks"]


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
        adapter_root: as in :func:`~lightning_fisher.lora_config_from_fisher_map`, when
            ``model`` is a submodule of the analysed model.

    Returns:
        The verified ``{module name: rank}``.

    Raises:
        AdapterRankMismatchError: listing every module with a missing adapter, a wrong rank,
            or an adapter it should not have (excluded or not a candidate).
    """
    fmap = load_map(fisher_map)
    expected_full, _ = rebase_names(fmap.ranks, adapter_root)
    expected = {relative: fmap.ranks[full] for relative, full in expected_full.items()}
    excluded = set(rebase_names(fmap.excluded, adapter_root)[0])
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


def changed_modules(before: Mapping[str, int], after: Mapping[str, int]) -> list[str]:
    """Modules whose adapter was added, removed or changed rank between two ``{module: rank}`` maps.

    Args:
        before: e.g. the ranks a checkpoint was written with.
        after: e.g. the ranks injected now.

    Returns:
        Added and removed modules first, then those with another rank; each group sorted.
    """
    return sorted(set(before) ^ set(after)) + sorted(n for n in set(before) & set(after) if before[n] != after[n])
