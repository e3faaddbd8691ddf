"""Reading a fisher map: a plain-text report and a heatmap (``lightning-fisher show``).

One module per concern:

* :mod:`~lightning_fisher.report.grid`: blocks and kinds, the block x kind grid of a map
  (:func:`split_module_name`, :func:`map_matrix`);
* :mod:`~lightning_fisher.report.table`: the text report (:func:`format_map_table`);
* :mod:`~lightning_fisher.report.plot`: the PNG heatmap (:func:`plot_map`);
* :mod:`~lightning_fisher.report.export`: the per-module table as JSON or CSV (:func:`map_json`, :func:`map_csv`).
* :mod:`~lightning_fisher.report.frontier`: the parameters-versus-quality figure of a
  ``lightning-fisher compare`` result (``plot_frontier``); imported from there, not here, so that
  reading a map does not load the comparison code.

The header and title lines come from :mod:`lightning_fisher.fisher_map.summary`. Nothing here imports
Lightning; matplotlib is imported only inside :func:`plot_map`, so text reports work without it.
"""

from lightning_fisher.report.export import map_csv, map_json, module_rows
from lightning_fisher.report.grid import TOP_BLOCK, map_matrix, split_module_name
from lightning_fisher.report.plot import PLOT_INSTALL_HINT, plot_map
from lightning_fisher.report.table import format_map_table

__all__ = [
    "PLOT_INSTALL_HINT",
    "TOP_BLOCK",
    "format_map_table",
    "map_csv",
    "map_json",
    "map_matrix",
    "module_rows",
    "plot_map",
    "split_module_name",
]
