"""The heatmap of a fisher map: log10(score) and LoRA rank per block and kind, as a PNG.

matplotlib is imported only inside :func:`plot_map`, so the rest of the library works without
it. The figure is drawn on matplotlib's Agg canvas and written with
:func:`lightning_fisher.data.atomic_io.atomic_writer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from lightning_fisher.data.atomic_io import atomic_writer
from lightning_fisher.fisher_map.map import FisherMap, ModuleRecord
from lightning_fisher.fisher_map.summary import plot_title
from lightning_fisher.report.grid import ModuleGrid, column_labels, map_matrix, module_grid

__all__ = ["PLOT_INSTALL_HINT", "plot_map"]

PLOT_INSTALL_HINT = "plotting needs matplotlib: pip install 'lightning-fisher[plot]'"


def _auto_figsize(grid: ModuleGrid, labels: Sequence[str]) -> tuple[float, float]:
    rows, columns = len(grid.blocks), len(grid.kinds)
    row_label = 0.075 * max(len(block) for block in grid.blocks)
    column_label = 0.06 * max(len(label) for label in labels)
    panel = max(2.5, 0.45 * columns)
    return (
        min(40.0, round(row_label + 2 * panel + 2.5, 1)),
        min(40.0, round(max(2.0, 0.3 * rows) + column_label + 1.6, 1)),
    )


def plot_map(
    fisher_map: FisherMap,
    path: Union[str, os.PathLike],
    *,
    dpi: int = 120,
    figsize: Optional[tuple[float, float]] = None,
) -> Path:
    """Write a PNG heatmap of a map: log10(score) on the left, LoRA rank on the right.

    Rows are blocks in natural order, columns kinds (see :func:`map_matrix`); a map without
    numbered blocks is one row. Excluded modules are grey and hatched in both panels and
    marked ``x`` in the rank panel; cells with no module are blank. The rank colour scale
    spans ``[rank_min, rank_max]`` of the map's budget. Modules outside the grid are listed
    under it. The figure is drawn on matplotlib's Agg canvas without touching pyplot, so it
    never opens a window nor changes the backend of the calling program.

    Args:
        fisher_map: the map to draw.
        path: the ``.png`` file to write; missing parent folders are created. It is written
            through a temporary file in the same folder, so an existing file is replaced
            whole or not at all.
        dpi: pixels per inch.
        figsize: ``(width, height)`` in inches; by default sized to the grid. The image has
            ``width * dpi`` x ``height * dpi`` pixels.

    Returns:
        The file written.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: ``path`` does not end in ``.png``, or ``dpi``/``figsize`` is not positive.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target}: plot_map writes PNG images; give a file name ending in .png")
    if dpi <= 0 or (figsize is not None and min(figsize) <= 0):
        raise ValueError(f"dpi and figsize must be positive, got dpi={dpi!r}, figsize={figsize!r}")
    try:
        import matplotlib  # noqa: F401  (the optional dependency itself: fail here, with the hint)
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as error:
        raise ImportError(PLOT_INSTALL_HINT) from error

    grid = module_grid(fisher_map)
    blocks, kinds, scores = map_matrix(fisher_map, "score")
    _, _, ranks = map_matrix(fisher_map, "rank")
    labels = column_labels(kinds, abbreviate=False)
    log_scores = np.array(
        [[np.nan if s is None or s <= 0 else np.log10(s) for s in row] for row in scores], dtype=float
    )
    rank_values = np.array([[np.nan if r is None else float(r) for r in row] for row in ranks], dtype=float)
    finite = log_scores[np.isfinite(log_scores)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    budget = fisher_map.budget
    rank_norm = Normalize(vmin=budget.rank_min, vmax=max(budget.rank_max, budget.rank_min + 1))
    panels = [
        ("log10(score)", log_scores, "magma", Normalize(vmin=low, vmax=high)),
        ("LoRA rank (x = excluded)", rank_values, "viridis", rank_norm),
    ]

    spectra = [m for m in fisher_map.modules if m.sigma_sq and m.noise_floor]
    size = figsize or _auto_figsize(grid, labels)
    if spectra and figsize is None:
        longest = max(len(m.sigma_sq) for m in spectra)
        size = (min(60.0, size[0] + 3.0 + 0.12 * longest), min(60.0, max(size[1], 1.5 + 0.16 * len(spectra))))
    figure = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3 if spectra else 2, width_ratios=[1, 1, 1.4] if spectra else None)
    axes[1].sharey(axes[0])
    excluded = [(i, j) for (i, j), module in grid.cells.items() if module.excluded]
    annotate = len(blocks) * len(kinds) <= 400
    for index, (ax, (name, values, cmap_name, norm)) in enumerate(zip(axes[:2], panels)):
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="white")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for i, j in excluded:
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.82", edgecolor="0.45", hatch="///", linewidth=0)
            )
        if index == 1 and annotate:
            for i, j in excluded:
                ax.text(j, i, "x", ha="center", va="center", fontsize=8, color="0.15")
            for (i, j), module in grid.cells.items():
                if not module.excluded:
                    colour = "white" if norm(module.rank) < 0.55 else "black"  # viridis is dark at the low end
                    ax.text(j, i, str(module.rank), ha="center", va="center", fontsize=7, color=colour)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(kinds)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=8)
        ax.tick_params(length=0)
        figure.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    if spectra:
        _spectrum_panel(figure, axes[2], spectra, np, matplotlib)
    figure.suptitle(plot_title(fisher_map), fontsize=10)
    if grid.outside:
        listed = ", ".join(f"{m.name} ({'excluded' if m.excluded else f'rank {m.rank}'})" for m in grid.outside[:6])
        more = f" and {len(grid.outside) - 6} more" if len(grid.outside) > 6 else ""
        figure.supxlabel(f"not in the grid: {listed}{more}", fontsize=8)

    with atomic_writer(target, make_parents=True) as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return target


def _spectrum_panel(figure, ax, modules: Sequence[ModuleRecord], np, matplotlib) -> None:
    """Why each module got its rank: its squared singular values against its noise floor.

    One row a module, one column a direction ``j``: ``log10(sigma_j^2 / floor)``, red above the
    floor (signal an adapter can follow), blue below; the black tick after column ``rank``
    marks where the module's adapter ends (none for an excluded module).
    """
    from matplotlib.colors import TwoSlopeNorm

    longest = max(len(m.sigma_sq) for m in modules)
    ratios = np.full((len(modules), longest), np.nan)
    for i, module in enumerate(modules):
        values = np.maximum(np.asarray(module.sigma_sq, dtype=float), 1e-300)
        ratios[i, : len(values)] = np.log10(values / module.noise_floor)
    finite = ratios[np.isfinite(ratios)]
    # at most three decades each way: far below the floor is all the same (noise)
    span = min(3.0, max(1.0, float(np.abs(finite).max()))) if finite.size else 1.0
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(ratios), cmap=cmap, norm=TwoSlopeNorm(0.0, -span, span), aspect="auto",
                      interpolation="nearest")
    for i, module in enumerate(modules):
        if module.rank is not None:
            ax.plot([module.rank - 0.5] * 2, [i - 0.5, i + 0.5], color="black", linewidth=1.6)
    ax.set_title("log10(sigma_j^2 / noise floor); | = rank", fontsize=10)
    ax.set_xlabel("direction j of the mean gradient", fontsize=8)
    ax.set_xticks(range(0, longest, max(1, longest // 8)), [str(j + 1) for j in range(0, longest, max(1, longest // 8))],
                  fontsize=7)
    ax.set_yticks(range(len(modules)), [m.name for m in modules], fontsize=6)
    ax.tick_params(length=0)
    figure.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
