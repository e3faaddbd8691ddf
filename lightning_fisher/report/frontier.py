"""The quality frontier of a comparison: LoRA parameters against validation loss, one line per family, as a PNG.

``lightning-fisher compare --plot FILE`` draws it from a
:class:`~lightning_fisher.compare.results.CompareResult`: every arm is a point at the adapter
parameters counted in its runs (log x) and its mean ``val_loss`` with the sample std over
seeds as an error bar (at the learning rate the arm chose, with ``--lrs``); the arms of one
family (``flat`` with its twins ``flat@F``, ``fisher`` with ``fisher@F``, ``fisher-CRITERION``)
are joined by a line. Where a fisher line lies below the flat line at the same parameters, the
map spends that budget better than flat LoRA.

matplotlib is imported only inside :func:`plot_frontier`; :func:`check_frontier_destination`
lets a caller refuse a missing matplotlib or an unwritable file before anything is trained.
The figure is drawn on matplotlib's Agg canvas and written with
:func:`lightning_fisher.data.atomic_io.atomic_writer`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from lightning_fisher.data.atomic_io import atomic_writer
from lightning_fisher.compare.results import MONITOR, CompareResult
from lightning_fisher.errors import CompareError
from lightning_fisher.report.plot import PLOT_INSTALL_HINT

__all__ = ["check_frontier_destination", "plot_frontier"]

_MARKERS = ("o", "s", "^", "D", "v", "P")


def check_frontier_destination(path: Union[str, os.PathLike], *, option: str = "plot") -> Path:
    """Refuse, before any training, a frontier plot that could not be written.

    Args:
        path: the ``.png`` file :func:`plot_frontier` is to write (missing folders will be created).
        option: the option name the messages start with (the CLI passes ``--plot``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        CompareError: the name does not end in ``.png``, names a folder, matplotlib is not
            installed (the message says ``pip install 'lightning-fisher[plot]'``), or the folder
            cannot be written to (or created).
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise CompareError(f"{option}: {target}: the frontier is written as a PNG image; give a file name ending in .png")
    try:
        import matplotlib  # noqa: F401  (the optional dependency itself)
    except ImportError:
        raise CompareError(f"{option}: {PLOT_INSTALL_HINT}, or leave out {option}") from None
    if target.is_dir():
        raise CompareError(f"{option}: {target} is a folder; give a file name ending in .png")
    folder = target.parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CompareError(f"{option}: cannot write {target}: {existing} is a file, not a folder; choose another place")
    if existing == folder:
        # A real file, not os.access: the check then also holds for root and for read-only mounts.
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise CompareError(f"{option}: cannot write {target} ({error}); choose a folder you can write to") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise CompareError(f"{option}: cannot create the folder {folder}: {existing} is not writable; "
                           "choose a folder you can write to")
    return target


def plot_frontier(
    result: CompareResult,
    path: Union[str, os.PathLike],
    *,
    dpi: int = 120,
    figsize: tuple[float, float] = (6.4, 4.4),
) -> Path:
    """Write a PNG of the comparison's frontier: LoRA parameters (log x) against ``val_loss``.

    One line per family (see :meth:`CompareResult.frontier`), each point labelled with its
    arm's name and drawn with the sample std over seeds as an error bar; arms without a finite
    result are left out and named under the plot.

    Args:
        result: the comparison, with its runs.
        path: the ``.png`` file to write; missing parent folders are created. It is written
            through a temporary file in the same folder, so an existing file is replaced whole
            or not at all.
        dpi: pixels per inch.
        figsize: ``(width, height)`` in inches.

    Returns:
        The file written.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: ``path`` does not end in ``.png``, or ``dpi``/``figsize`` is not positive.
        CompareError: the result holds no run to draw.
    """
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target}: plot_frontier writes PNG images; give a file name ending in .png")
    if dpi <= 0 or min(figsize) <= 0:
        raise ValueError(f"dpi and figsize must be positive, got dpi={dpi!r}, figsize={figsize!r}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator
    except ImportError as error:
        raise ImportError(PLOT_INSTALL_HINT) from error

    frontier = result.frontier()
    if not frontier:
        raise CompareError("plot: no arm has a finished run with a finite val_loss; nothing to draw")
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for index, (family, points) in enumerate(frontier.items()):
        flat = family == "flat"
        axes.errorbar(
            [point.parameters for point in points],
            [point.mean for point in points],
            yerr=[point.std or 0.0 for point in points],
            label=family,
            marker=_MARKERS[index % len(_MARKERS)],
            markersize=5,
            capsize=3,
            linewidth=1.6,
            color="0.25" if flat else None,
            linestyle="--" if flat else "-",
        )
        for point in points:
            axes.annotate(point.arm, (point.parameters, point.mean), textcoords="offset points", xytext=(4, 4),
                          fontsize=7, color="0.3")
    axes.set_xscale("log")
    # Ticks at the flat arms' counts (the budgets): fisher arms sit next to their twins anyway.
    ticks = sorted({point.parameters for point in frontier.get("flat") or sum(frontier.values(), [])})
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticks(ticks, [f"{tick:,}" for tick in ticks], fontsize=8)
    axes.set_xlabel("LoRA parameters (log scale; ticks at the flat arms)")
    seeds = sorted({point.seeds for points in frontier.values() for point in points})
    spread = "sample std" if seeds[-1] > 1 else "one seed, no error bar"
    axes.set_ylabel(f"{MONITOR} (mean, {spread}; lower is better)")
    at = "each arm at its own best learning rate" if result.lrs else "the config's learning rate"
    axes.set_title(f"{MONITOR} against LoRA parameters, {'/'.join(map(str, seeds))} seed(s), {at}", fontsize=9)
    axes.grid(True, which="both", linewidth=0.4, alpha=0.5)
    axes.legend(fontsize=8)
    drawn = {point.arm for points in frontier.values() for point in points}
    missing = [arm.name for arm in result.arms if arm.name not in drawn]
    if missing:
        figure.supxlabel(f"not drawn (no finite result): {', '.join(missing)}", fontsize=7)

    with atomic_writer(target, make_parents=True) as handle:
        figure.savefig(handle, format="png", dpi=dpi)
    return target
