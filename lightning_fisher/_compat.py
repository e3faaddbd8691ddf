"""The package's old module paths, kept importable after the modules moved into concept folders.

``import lightning_fisher.map_codec`` (and ``from lightning_fisher.criteria.trace import ...``)
keep working: a finder on ``sys.meta_path`` answers each old name with the module now at its new
place: the same module object, so state, ``isinstance`` and monkeypatching are shared. Old
names appear in users' scripts, pickled objects and earlier maps' provenance; new code uses the
new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Optional, Sequence

__all__ = ["MOVED", "install"]

#: ``{old module: new module}`` under ``lightning_fisher`` (a moved package takes its submodules along).
MOVED = {
    "candidates": "analysis.candidates",
    "module_names": "analysis.module_names",
    "fingerprint": "analysis.fingerprint",
    "per_sample_norms": "analysis.per_sample_norms",
    "collector": "analysis.collector",
    "accumulator": "analysis.accumulator",
    "spectrum": "analysis.spectrum",
    "stability": "analysis.stability",
    "timesteps": "analysis.timesteps",
    "analysis_session": "analysis.session",
    "plain_analysis": "analysis.plain_loop",
    "processes": "analysis.processes",
    "analysis_files": "analysis.files",
    "analysis_entry": "analysis.entry",
    "allocation_settings": "allocation.settings",
    "spectrum_allocation": "allocation.spectrum_rule",
    "criteria": "allocation.criteria",
    "map_records": "fisher_map.records",
    "map_codec": "fisher_map.codec",
    "map_summary": "fisher_map.summary",
    "map_backup": "fisher_map.backup",
    "patterns": "fisher_map.patterns",
    "compare_plan": "compare.plan",
    "compare_results": "compare.results",
    "tensor_folder": "data.tensor_folder",
    "atomic_io": "data.atomic_io",
    "natural_sort": "data.natural_sort",
}
# ``lightning_fisher.allocation`` and ``lightning_fisher.fisher_map`` were modules and are now
# packages of the same name that import the old modules' public names.


def new_name(fullname: str) -> Optional[str]:
    """The module's current name for an old one (``lightning_fisher.map_codec`` ->
    ``lightning_fisher.fisher_map.codec``), ``None`` for a name that did not move."""
    prefix = "lightning_fisher."
    if not fullname.startswith(prefix):
        return None
    head, dot, rest = fullname[len(prefix):].partition(".")
    if head not in MOVED:
        return None
    return prefix + MOVED[head] + dot + rest


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None):
        if new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        # the module at its new place; the import system keeps its own __name__ and __spec__
        return importlib.import_module(new_name(spec.name))

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module ran when it was imported under its new name."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (called by ``lightning_fisher/__init__``)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
