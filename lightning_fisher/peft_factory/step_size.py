"""How large an adapter's steps are, and the learning-rate check :class:`~lightning_fisher.AdaptiveLoRA` runs.

PEFT multiplies an adapter's output by its scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA (LoHa and LoKr: ``alpha / r``). With Adam-style optimizers every adapter weight moves by
about the learning rate per step whatever its gradient's size, so the change of a module's
output per step is about its scaling times the learning rate. Flat LoRA at the map's base rank
has one scaling everywhere; a map whose largest scaling is ``k`` times that takes steps up to
``k`` times larger at the same learning rate, and the learning rate divided by ``k`` keeps its
largest step at flat LoRA's.

Under the default alpha policy (alpha/r constant) every module has flat LoRA's scaling, so the
check is silent; under rsLoRA (alpha constant) the smallest ranks have the largest scaling.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from lightning_fisher.peft_factory.adapters import alpha_option
from lightning_fisher.peft_factory.plan import MapApplication

__all__ = ["adapter_scaling", "learning_rate_warnings"]


def adapter_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of an adapter: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def learning_rate_warnings(
    learning_rate: float,
    application: MapApplication,
    config: Any,
    adapter: str,
    base_rank: int,
    ceiling: tuple[Optional[float], str] = (None, ""),
) -> list[str]:
    """The warnings for training a map's adapters at ``learning_rate``; empty when there is none.

    Args:
        learning_rate: the largest learning rate of the optimizer groups that train adapters.
        application: the applied map's ranks and alphas (``plan_from_fisher_map``).
        config: the PEFT config injected (its base alpha and ``use_rslora``).
        adapter: ``"lora"``, ``"loha"`` or ``"lokr"``.
        base_rank: the map's base rank, where flat LoRA is compared.
        ceiling: an absolute limit on the learning rate and why it applies (``(None, "")``: none).
    """
    warnings = []
    use_rslora = adapter == "lora" and bool(getattr(config, "use_rslora", False))
    flat = adapter_scaling(float(getattr(config, alpha_option(adapter))), base_rank, use_rslora)
    scalings = {name: adapter_scaling(application.alphas[name], r, use_rslora) for name, r in application.ranks.items()}
    name = max(scalings, key=scalings.__getitem__)
    ratio = scalings[name] / flat
    if ratio > 1 + 1e-9:
        warnings.append(
            f"the fisher map raises the largest adapter scaling to {ratio:.2f}x flat LoRA's at rank {base_rank} "
            f"({name}: rank {application.ranks[name]}, alpha {application.alphas[name]:g}, scaling "
            f"{scalings[name]:.3g} vs {flat:.3g}), so at learning rate {learning_rate:g} its largest step is "
            f"{ratio:.2f}x flat LoRA's; for the same largest step use about {learning_rate / ratio:.2g} and watch "
            "validation closely"
        )
    limit, why = ceiling
    if limit is not None and learning_rate > limit:
        warnings.append(
            f"adapter learning rate {learning_rate:g} is above {limit:g} ({why}): a fisher map concentrates "
            "adapter capacity where the data pulls hardest, so it adapts faster and can overfit sooner than flat "
            f"ranks; consider at most {limit:g} and watch validation closely"
        )
    return warnings
