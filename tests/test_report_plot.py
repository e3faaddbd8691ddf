"""The PNG heatmap of a fisher map: its size, content, atomic write and the optional matplotlib."""

import sys

import pytest
from _report_maps import colliding_map, minilm_map  # noqa: F401 (fixtures)
from torch import nn

from lightning_fisher import FisherMap
from lightning_fisher.report import PLOT_INSTALL_HINT, plot_map

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png_of_requested_size(minilm_map, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    target = tmp_path / "plots" / "deep" / "minilm.png"
    written = plot_map(minilm_map, target, dpi=50, figsize=(8.0, 4.0))
    assert written == target
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(target)
    assert pixels.shape[:2] == (200, 400)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1]).tolist()}) > 50  # drawn, not blank
    assert [p.name for p in target.parent.iterdir()] == ["minilm.png"]  # no temporary file left


def test_plot_default_size_scales_with_dpi_and_replaces(colliding_map, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    target = tmp_path / "map.png"
    target.write_bytes(b"old")
    plot_map(colliding_map, target, dpi=40)
    small = image.imread(target).shape[:2]
    plot_map(colliding_map, target, dpi=80)
    large = image.imread(target).shape[:2]
    assert large == pytest.approx((2 * small[0], 2 * small[1]), abs=1)
    assert large[0] > 200  # 12 block rows get room
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]


def test_plot_map_without_blocks(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fisher_map = FisherMap.from_scores({"0": 1.0, "2": 3.0}, model, rank=4, rank_min=1, rank_max=8)
    path = plot_map(fisher_map, tmp_path / "mlp.png", dpi=30, figsize=(6, 3))
    assert image.imread(path).shape[:2] == (90, 180)


def test_plot_without_matplotlib(colliding_map, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as excinfo:
        plot_map(colliding_map, tmp_path / "map.png")
    assert str(excinfo.value) == PLOT_INSTALL_HINT == "plotting needs matplotlib: pip install 'lightning-fisher[plot]'"
    assert list(tmp_path.iterdir()) == []


def test_plot_rejects_other_formats(colliding_map, tmp_path):
    with pytest.raises(ValueError, match=r"map\.svg.*\.png"):
        plot_map(colliding_map, tmp_path / "map.svg")


def test_a_spectrum_map_gets_a_panel_of_singular_values_against_the_floor(tmp_path):
    from matplotlib.image import imread

    from lightning_fisher import AllocationSettings
    from lightning_fisher.analysis.spectrum import ModuleSpectrum

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    names = [f"{i}" for i in range(6)]
    spectra = {n: ModuleSpectrum(n, (9.0, 4.0, 0.5) if int(n) % 2 else (0.5, 0.4, 0.3), 1.0, 64) for n in names}
    settings = AllocationSettings(rank=2, rank_min=1, rank_max=8, mode="budget", criterion="spectrum")
    spectrum_map = FisherMap.from_scores({n: 1.0 for n in names}, model, allocation=settings, spectra=spectra)
    trace_map = FisherMap.from_scores({n: 1.0 for n in names}, model, rank=2, rank_min=1, rank_max=8, mode="budget")
    with_panel = imread(plot_map(spectrum_map, tmp_path / "spectrum.png", dpi=50))
    without = imread(plot_map(trace_map, tmp_path / "trace.png", dpi=50))
    assert with_panel.shape[0] >= without.shape[0]
    assert with_panel.shape[1] > without.shape[1] + 3 * 50  # the third panel: at least 3 inches wider
