"""``adapter_root``: the submodule PEFT injects into, and map names rebased onto it.

A map names modules relative to the analysed model (often a LightningModule whose network is
``self.model``); PEFT sees names relative to the module it injects into. ``adapter_root`` is
the dotted name of that module, and every map name under it loses the ``"<adapter_root>."``
prefix. This module imports no PEFT.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from torch import nn

__all__ = ["rebase_names", "root_module"]


def rebase_names(names: Iterable[str], adapter_root: Optional[str]) -> tuple[dict[str, str], list[str]]:
    """Split full module names into those under ``adapter_root`` and the rest.

    Args:
        names: module names relative to the analysed model.
        adapter_root: dotted name of the injection root; ``None`` or ``""`` is the model itself.

    Returns:
        ``({name relative to the root: full name}, [full names outside the root])``, both in
        the order of ``names``.
    """
    names = list(names)
    if not adapter_root:
        return {name: name for name in names}, []
    prefix = adapter_root.rstrip(".") + "."
    inside = {name[len(prefix):]: name for name in names if name.startswith(prefix)}
    outside = [name for name in names if not name.startswith(prefix)]
    return inside, outside


def root_module(model: nn.Module, adapter_root: Optional[str]) -> nn.Module:
    """The submodule ``adapter_root`` names in ``model`` (``model`` itself for ``None`` or ``""``)."""
    return model if not adapter_root else model.get_submodule(adapter_root)
