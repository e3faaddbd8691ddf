"""The stopping rule under the spectrum criterion: each half's spectra, their allocations, their agreement."""

from __future__ import annotations

import pytest
import torch
import lightning.pytorch as pl
from torch import nn

from lightning_fisher import AllocationSettings, analyze
from lightning_fisher.fisher_map.summary import stop_line
from lightning_fisher.analysis.spectrum import ModuleSpectrum, SpectrumAccumulator
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.fisher_map.records import STOPPING_METHODS
from lightning_fisher.analysis.stability import spectrum_split_half_correlation
from tests.test_spectrum import D_IN, D_OUT, WIDTH, accumulate, stream

SETTINGS = AllocationSettings(rank=2, rank_min=1, rank_max=8, mode="median", criterion="spectrum")


def test_an_exact_accumulators_half_sketch_is_the_sketch_methods_state():
    data = list(stream((3.0, 2.0), batches=4))
    exact, sketch = accumulate("exact", data), accumulate("sketch", data)
    torch.testing.assert_close(exact.half_sketch(), sketch.half_sketch())
    # so both give the same half spectra, whatever the method the map uses
    for got, expected in zip(exact.half_spectra(exact.half_sketch(), 4), sketch.half_spectra(sketch.half_sketch(), 4)):
        assert got.sigma_sq == pytest.approx(expected.sigma_sq) and got.floor == pytest.approx(expected.floor)


def test_summed_half_sketches_are_the_half_sketch_of_all_batches():
    # what all_reduce(SUM) of the per-batch stopping state does under DDP
    data = list(stream((3.0, 2.0), batches=6))
    whole, first, second = accumulate("exact", data), accumulate("exact", data[:3]), accumulate("exact", data[3:])
    torch.testing.assert_close(first.half_sketch() + second.half_sketch(), whole.half_sketch())


def test_each_halfs_floor_is_twice_the_wholes_and_its_values_are_its_own():
    acc = accumulate("sketch", stream((4.0, 3.0), batches=8))
    whole = acc.spectrum(4)
    one, two = acc.half_spectra(acc.half_sketch(), 4)
    # equal halves: the noise in a half's mean is twice the whole's (covariance Sigma / n_h)
    assert one.floor == pytest.approx(2 * whole.floor) and two.floor == pytest.approx(2 * whole.floor)
    assert one.samples == two.samples == whole.samples // 2
    # the signal is the same in both halves: their top values bracket the whole's
    assert min(one.sigma_sq[0], two.sigma_sq[0]) < whole.sigma_sq[0] * 1.2
    assert max(one.sigma_sq[0], two.sigma_sq[0]) > whole.sigma_sq[0] * 0.8


def test_no_half_spectra_before_both_halves_hold_a_sample():
    acc = SpectrumAccumulator("layer", D_IN, D_OUT, width=WIDTH)
    a, g = next(stream((1.0,), batch=1))
    acc.update(a, g)
    assert acc.half_spectra(acc.half_sketch(), 4) is None
    with pytest.raises(FisherAnalysisError, match="'layer'.*half sketch"):
        acc.half_spectra(acc.half_sketch()[:-1], 4)


def pair(name, one, two, floor=1.0):
    return ModuleSpectrum(name, tuple(one), floor, 8), ModuleSpectrum(name, tuple(two), floor, 8)


COSTS = {name: 10 for name in "abcd"}


def test_identical_allocations_agree_fully():
    # the values differ a little between halves, the allocations (a: 3, b: 1, c: none, d: 2) not
    halves = {"a": pair("a", [9, 8, 7], [9.5, 8.2, 6.8]), "b": pair("b", [4, 0.5], [4.2, 0.4]),
              "c": pair("c", [0.5], [0.1]), "d": pair("d", [6, 5], [6.2, 4.9])}
    assert spectrum_split_half_correlation(halves, COSTS, SETTINGS) == 1.0


def test_halves_that_adapt_different_modules_disagree():
    halves = {"a": pair("a", [9, 5, 3], [0.5]), "b": pair("b", [0.5], [9, 5, 3]),
              "c": pair("c", [3, 0.5], [0.5]), "d": pair("d", [0.5], [3, 0.5])}
    assert spectrum_split_half_correlation(halves, COSTS, SETTINGS) < 0


def test_nothing_above_the_floor_in_either_half_is_no_verdict_yet():
    halves = {name: pair(name, [0.5, 0.1], [0.9]) for name in "abc"}
    assert spectrum_split_half_correlation(halves, COSTS, SETTINGS) is None
    assert spectrum_split_half_correlation(None, COSTS, SETTINGS) is None


def test_one_half_uniform_and_the_other_not_is_no_agreement():
    halves = {"a": pair("a", [9, 5], [9, 5]), "b": pair("b", [9, 5], [0.5]), "c": pair("c", [9, 5], [9, 5])}
    assert spectrum_split_half_correlation(halves, COSTS, SETTINGS) == 0.0


def test_a_module_set_from_noise_and_signal_settles():
    modules = {
        "strong": accumulate("exact", stream((6.0, 5.0, 4.0), seed=1, batches=12), name="strong"),
        "weak": accumulate("exact", stream((3.0,), seed=2, batches=12), name="weak"),
        "noise": accumulate("exact", stream((), seed=3, batches=12), name="noise"),
        "noise2": accumulate("exact", stream((), seed=4, batches=12), name="noise2"),
    }
    halves = {name: acc.half_spectra(acc.half_sketch(), 8) for name, acc in modules.items()}
    costs = {name: D_IN + D_OUT for name in modules}
    assert spectrum_split_half_correlation(halves, costs, SETTINGS) > 0.9


class LowRankTask(pl.LightningModule):
    """Regression whose targets depend on the inputs through a rank-4 map, plus noise."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = nn.Linear(16, 16)
        self.third = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.head(torch.tanh(self.third(torch.tanh(self.second(torch.tanh(self.first(x)))))))
        return nn.functional.mse_loss(out, y)


def test_analyze_with_the_spectrum_criterion_stops_on_its_own_allocation(tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=gen)
    y = torch.randn(512, 4, generator=gen) + 3 * x[:, :4]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    fisher_map = analyze(
        LowRankTask(), data, output=tmp_path, allocation=SETTINGS, convergence_patience=3, min_batches=3,
        max_batches=32, trainer_kwargs=dict(enable_progress_bar=False, logger=False),
    )
    analysis = fisher_map.analysis
    assert analysis.stability.method == STOPPING_METHODS["spectrum"]
    assert analysis.stop_reason == "converged" and analysis.batches < 32
    # the rule's last verdicts were the halves' allocations agreeing
    assert all(c is not None and c >= 0.9 for c in analysis.stability.history[-3:])
    assert "of the halves' spectrum ranks" in stop_line(fisher_map)


def test_an_exact_accumulators_sketch_follows_later_batches_and_a_loaded_state():
    data = list(stream((3.0, 2.0), batches=6))
    acc = accumulate("exact", data[:2])
    acc.half_sketch()  # from here on the sketch is updated per batch
    for a, g in data[2:]:
        acc.update(a, g)
    torch.testing.assert_close(acc.half_sketch(), accumulate("sketch", data).half_sketch())
    other = accumulate("exact", data[:4])
    acc.load_state_tensor(other.state_tensor())
    torch.testing.assert_close(acc.half_sketch(), other.half_sketch())


def _stop_batch(correlations, check_every, rule, monkeypatch):
    """The batch at which the spectrum criterion's check, run through a real SpectrumSet, stops the rule."""
    import lightning_fisher.allocation.criteria.spectrum as criterion_module
    from lightning_fisher.allocation.criteria import criterion_named
    from lightning_fisher.analysis.spectrum import SpectrumSet
    from lightning_fisher.analysis.stability import StabilityTracker

    statistics = SpectrumSet({"layer": nn.Linear(D_IN, D_OUT)}, rank_max=8, check_every=check_every)
    checked = []
    # the correlation the halves would give after batch len(checked): scripted
    monkeypatch.setattr(criterion_module, "spectrum_split_half_correlation",
                        lambda *args: checked.append(None) or correlations[tracker.batches])
    tracker = StabilityTracker(rule)
    while tracker.reason is None:
        tracker.update(criterion_named("spectrum").split_half_correlation(None, statistics, SETTINGS, lambda t: t))
    return tracker.batches, len(checked)


@pytest.mark.parametrize("check_every", [2, 3, 4])
@pytest.mark.parametrize("settles_at", [0, 1, 2, 3, 5, 6, 9])
def test_checking_every_k_batches_stops_at_most_k_minus_1_batches_later(check_every, settles_at, monkeypatch):
    # A ranking that settles at some batch and stays settled: checked every batch, the rule stops
    # `patience` batches later; checked every k, at the first check from there, then carried.
    from lightning_fisher.analysis.stability import StabilityRule

    rule = StabilityRule(patience=3, threshold=0.9, min_batches=3, max_batches=40)
    correlations = [0.5 if b < settles_at else 0.95 for b in range(40)]
    every_batch, checks_every_batch = _stop_batch(correlations, 1, rule, monkeypatch)
    every_k, checks_every_k = _stop_batch(correlations, check_every, rule, monkeypatch)
    assert checks_every_batch == every_batch and checks_every_k == every_k // check_every
    assert every_batch <= every_k <= every_batch + check_every - 1
    # it is the every-batch rule applied to the checked correlations, each held until the next check
    held = [None if b < check_every - 1 else correlations[b - (b + 1) % check_every] for b in range(40)]
    assert every_k == _stop_batch(held, 1, rule, monkeypatch)[0]


def test_a_check_every_k_batches_leaves_the_maps_spectra_as_they_were(tmp_path, monkeypatch):
    import lightning_fisher.analysis.spectrum as spectrum

    def run(check_every, folder):
        monkeypatch.setattr(spectrum, "STOP_CHECK_EVERY", check_every)
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(512, 16, generator=gen)
        y = torch.randn(512, 4, generator=gen) + 3 * x[:, :4]
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        return analyze(
            LowRankTask(), data, output=tmp_path / folder, allocation=SETTINGS, convergence_patience=3,
            min_batches=8, max_batches=8, trainer_kwargs=dict(enable_progress_bar=False, logger=False),
        )

    every, fourth = run(1, "every"), run(4, "fourth")
    assert every.analysis.batches == fourth.analysis.batches == 8
    # the map's spectra are summed every batch whatever the check's period
    assert [m.sigma_sq for m in every.modules] == [m.sigma_sq for m in fourth.modules]
    assert [m.noise_floor for m in every.modules] == [m.noise_floor for m in fourth.modules]
    history = fourth.analysis.stability.history
    assert history[:3] == (None, None, None) and history[3] == history[4] == history[5] == history[6]
    assert history[3] == every.analysis.stability.history[3] and history[7] == every.analysis.stability.history[7]


def test_the_checks_reconstruction_without_q_matches_the_one_with_q():
    # Psi Q = W Omega R^{-1} where Y = Q R is well conditioned; Q itself where it is not (no gradient).
    data = [(a.float(), g.float()) for a, g in stream((4.0, 3.0, 2.0), batches=6)]
    acc = accumulate("sketch", data)
    y = acc.half_sketch()[: 2 * D_OUT * WIDTH].reshape(2, D_OUT, WIDTH)[0].double()
    w = acc.half_sketch()[2 * D_OUT * WIDTH: -2].reshape(2, 2 * WIDTH + 1, D_IN)[0].double()
    with_q = acc.psi.double() @ torch.linalg.qr(y).Q
    torch.testing.assert_close(acc._psi_q(y, w), with_q, rtol=1e-4, atol=1e-4 * float(with_q.abs().max()))
    silent = SpectrumAccumulator("silent", D_IN, D_OUT, width=WIDTH, method="sketch")
    for a, g in data:
        silent.update(a, torch.zeros_like(g))
    one, two = silent.half_spectra(silent.half_sketch(), 4)
    assert one.sigma_sq == two.sigma_sq == (0.0,) * 4 and one.floor == 0.0
