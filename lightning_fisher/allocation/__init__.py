"""Allocating: from what the analysis measured to which modules get an adapter, at what rank.

* ``settings``: :class:`AllocationSettings`, every allocation option's default, flag, help and check;
* ``criteria``: the allocation criteria by name, one module each (``trace``, ``spectrum``);
* ``trace_rule``: trace scores -> ranks (median and budget modes), the rule this package's
  names ``allocate_ranks``, ``flat_lora_parameters`` and ``lora_parameters`` come from;
* ``spectrum_rule``: gradient spectra -> ranks by gain per parameter.

Pure functions over dictionaries; no model, no Lightning.
"""

from lightning_fisher.allocation.settings import ALLOCATION_MODES, AllocationSettings
from lightning_fisher.allocation.trace_rule import allocate_ranks, flat_lora_parameters, lora_parameters

__all__ = ["ALLOCATION_MODES", "AllocationSettings", "allocate_ranks", "flat_lora_parameters", "lora_parameters"]
