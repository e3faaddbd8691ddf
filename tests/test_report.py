"""The report package (``lightning-fisher show``): its public names and what it imports.

Each concern has its own test file: test_report_grid.py, test_report_table.py,
test_report_plot.py, test_report_export.py; the header and title text is tested in test_map_summary.py.
"""

import ast
import importlib
import inspect
import sys

from lightning_fisher import report

REPORT_MODULES = ["lightning_fisher.report", "lightning_fisher.report.export", "lightning_fisher.report.grid",
                  "lightning_fisher.report.plot", "lightning_fisher.report.table"]
#: What the report may import from the library at module level: the map and stdlib-only helpers.
LIBRARY_IMPORTS = {
    "lightning_fisher.data.atomic_io",
    "lightning_fisher.fisher_map.map",
    "lightning_fisher.fisher_map.summary",
    "lightning_fisher.data.natural_sort",
    *REPORT_MODULES,
}
STDLIB_ONLY_HELPERS = ["lightning_fisher.data.atomic_io", "lightning_fisher.fisher_map.summary", "lightning_fisher.data.natural_sort",
                       "lightning_fisher.wording"]


def _module_level_imports(tree: ast.Module) -> set[str]:
    return {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }


def _not_stdlib(names: set[str]) -> set[str]:
    return {name for name in names if name.split(".")[0] not in sys.stdlib_module_names}


def test_public_names():
    assert set(report.__all__) == {
        "PLOT_INSTALL_HINT", "TOP_BLOCK", "format_map_table", "map_csv", "map_json", "map_matrix", "module_rows",
        "plot_map", "split_module_name",
    }
    for name in report.__all__:
        assert getattr(report, name) is not None, name


def test_report_is_core():
    """Imports only the standard library, the map and stdlib-only helpers: no Lightning, no matplotlib.

    ``lightning_fisher.fisher_map.map`` itself is checked not to load Lightning in test_package.
    """
    for name in REPORT_MODULES:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        assert _not_stdlib(_module_level_imports(tree)) <= LIBRARY_IMPORTS, name
    for name in STDLIB_ONLY_HELPERS:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        # the standard library, and these helpers among themselves
        assert _not_stdlib(_module_level_imports(tree)) <= set(STDLIB_ONLY_HELPERS), name
    plot_tree = ast.parse(inspect.getsource(importlib.import_module("lightning_fisher.report.plot")))
    plot_imports = {
        node.names[0].name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(next(n for n in plot_tree.body if getattr(n, "name", None) == "plot_map"))
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    assert "matplotlib" in plot_imports
