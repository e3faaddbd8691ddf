"""SpectrumAccumulator: exact sums, sketches, the all-reduce-able state and the noise floor, on real tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fisher.allocation.settings import AllocationSettings
from lightning_fisher.errors import FisherAnalysisError
from lightning_fisher.analysis.spectrum import NOISE_MARGIN, SpectrumAccumulator, sketch_width
from lightning_fisher.allocation.spectrum_rule import NO_DIRECTION, allocate_ranks_from_spectra

D_IN, D_OUT = 48, 32
WIDTH = sketch_width(8)  # 18: ranks up to 8 plus the default oversampling


def stream(signal, *, seed=0, batch=16, tokens=4, batches=8, d_in=D_IN, d_out=D_OUT):
    """Batches of a batch-mean loss whose mean weight gradient is ``tokens * U diag(signal) V^T``.

    The output gradient of each token is ``(M a + e) / batch`` with ``a``, ``e`` standard
    normal, so a sample's weight gradient ``sum_t (M a_t + e_t) a_t^T`` has mean ``tokens * M``
    and zero-mean noise; ``signal=()`` is pure noise.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64)).Q[:, : len(signal)]
    v = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)).Q[:, : len(signal)]
    m = u @ torch.diag(torch.tensor(signal, dtype=torch.float64)) @ v.T
    for _ in range(batches):
        a = torch.randn(batch, tokens, d_in, generator=gen, dtype=torch.float64)
        e = torch.randn(batch, tokens, d_out, generator=gen, dtype=torch.float64)
        yield a, (a @ m.T + e) / batch


def accumulate(method, data, *, name="layer", width=WIDTH, **kwargs):
    acc = SpectrumAccumulator(name, D_IN, D_OUT, width=width, method=method, **kwargs)
    for a, g in data:
        acc.update(a, g)
    return acc


def test_exact_sums_are_the_per_sample_gradients_split_by_parity():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(b, 3, D_IN, generator=gen), torch.randn(b, 3, D_OUT, generator=gen)) for b in (5, 2, 4)]
    batches[1][1][0, 1, 2] = math.nan  # sample 5 in the stream is skipped but keeps its slot
    acc = SpectrumAccumulator("layer", D_IN, D_OUT, width=4, method="exact")
    for a, g in batches:
        acc.update(a, g)
    # brute force: G_i = B * g_i^T a_i (batch-mean loss), halves by position in the stream
    per_sample = [
        len(a) * torch.einsum("td,te->ed", a_i.double(), g_i.double()) for a, g in batches for a_i, g_i in zip(a, g)
    ]
    halves = [sum(x for i, x in enumerate(per_sample) if i % 2 == h and i != 5) for h in (0, 1)]
    state = acc.state_tensor()
    assert state.dtype == torch.float64 and state.numel() == 2 * D_OUT * D_IN + 3
    sums = state[: 2 * D_OUT * D_IN].reshape(2, D_OUT, D_IN)
    torch.testing.assert_close(sums, torch.stack(halves), rtol=1e-5, atol=1e-4)
    assert state[-3:].tolist() == [6.0, 4.0, 1.0] and acc.half_counts == (6, 4) and acc.samples_seen == 11


def test_sketch_sums_are_the_exact_sums_times_the_test_matrices():
    exact = accumulate("exact", stream((3.0,)))
    sketch = accumulate("sketch", stream((3.0,)))
    s = exact.state_tensor()[: 2 * D_OUT * D_IN].reshape(2, D_OUT, D_IN)
    k, l = sketch.width, sketch.psi.shape[0]
    state = sketch.state_tensor()
    y = state[: 2 * D_OUT * k].reshape(2, D_OUT, k)
    w = state[2 * D_OUT * k : 2 * D_OUT * k + 2 * l * D_IN].reshape(2, l, D_IN)
    torch.testing.assert_close(y, s @ sketch.omega)
    torch.testing.assert_close(w, sketch.psi @ s)
    assert l == 2 * k + 1 and sketch.omega.shape == (D_IN, k)


def test_test_matrices_are_seeded_by_seed_and_module_name():
    def omega(name, seed):
        return SpectrumAccumulator(name, D_IN, D_OUT, width=4, method="sketch", seed=seed).omega

    assert torch.equal(omega("a", 0), omega("a", 0))  # every process draws the same
    assert not torch.equal(omega("a", 0), omega("b", 0)) and not torch.equal(omega("a", 0), omega("a", 1))


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_summed_states_equal_one_accumulator_over_all_batches(method):
    data = list(stream((3.0, 2.0), batches=6))
    whole = accumulate(method, data)
    first, second = accumulate(method, data[:3]), accumulate(method, data[3:])  # even batches: same halves
    merged = SpectrumAccumulator("layer", D_IN, D_OUT, width=WIDTH, method=method)
    merged.load_state_tensor(first.state_tensor() + second.state_tensor())  # what all_reduce(SUM) does
    torch.testing.assert_close(merged.state_tensor(), whole.state_tensor())
    got, expected = merged.spectrum(4), whole.spectrum(4)
    assert got.sigma_sq == pytest.approx(expected.sigma_sq) and got.floor == pytest.approx(expected.floor)
    with pytest.raises(FisherAnalysisError, match="'layer'"):
        merged.load_state_tensor(whole.state_tensor()[:-1])


def test_sketch_top_values_match_the_exact_svd():
    # k = 18 for a 32 x 48 gradient of rank 3 plus noise. Measured over seeds 0-9: sigma^2 off
    # by 2 % (median) and 10 % (worst, the third value), the floor by 19 % at worst.
    for seed in range(3):
        exact = accumulate("exact", stream((4.0, 3.0, 2.0), seed=seed)).spectrum(3)
        sketch = accumulate("sketch", stream((4.0, 3.0, 2.0), seed=seed), seed=seed).spectrum(3)
        assert sketch.sigma_sq == pytest.approx(exact.sigma_sq, rel=0.1)
        assert sketch.floor == pytest.approx(exact.floor, rel=0.25)


def test_auto_method_keeps_exact_sums_only_while_they_are_small():
    width = sketch_width(8)  # 18: a sketch of a 32 x 48 module holds 18*32 + 37*48 entries per half
    assert SpectrumAccumulator("small", D_IN, D_OUT, width=width).method == "exact"
    assert SpectrumAccumulator("large", 1024, 1024, width=width).method == "sketch"


def test_exact_update_adds_the_product_in_place():
    # Whole d_out x d_in products (and, with float64 sums, their float64 copies) of a large output
    # layer would more than double a training step's weight-gradient memory: the product goes
    # into the sums in place, so no new tensor near the sums' size is ever made.
    from torch.utils._python_dispatch import TorchDispatchMode

    class NewTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and func._schema.returns[0].alias_info is None:
                self.sizes.append(out.numel())  # new tensors only: not views of the sums, not in-place writes
            return out

    a, g = torch.randn(4, 3, D_IN), torch.randn(4, 3, D_OUT)
    acc = SpectrumAccumulator("layer", D_IN, D_OUT, width=4, method="exact")
    reference = accumulate("exact", [(a.double(), g.double())], width=4)
    acc.update(a, g)  # the first batch may allocate (the sums move to the batch's device)
    with NewTensors() as mode:
        acc.update(a, g)
    assert max(mode.sizes) < D_OUT * D_IN / 4  # only the inputs' half copies and per-sample checks
    state, expected = acc.state_tensor(), reference.state_tensor()
    torch.testing.assert_close(state[:-3], 2 * expected[:-3], rtol=1e-5, atol=1e-4)


def test_float64_sums_from_bfloat16_inputs():
    a, g = next(stream((3.0,)))
    low = accumulate("exact", [(a.bfloat16(), g.bfloat16())])
    high = accumulate("exact", [(a.bfloat16().double(), g.bfloat16().double())])
    assert low.state_tensor().dtype == torch.float64
    torch.testing.assert_close(low.state_tensor(), high.state_tensor(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, low, high", [("exact", 0.8, 1.2), ("sketch", 1.0, 2.0)])
def test_noise_floor_of_pure_noise_is_the_noise_edge(method, low, high):
    # Entries of G's noise are iid with variance tokens / samples, so its top sigma^2 is at the
    # Marchenko-Pastur edge. A sketch's floor sits higher: it reconstructs a flat spectrum
    # noisily (1.45x measured here) and G's own values the same way.
    spectrum = accumulate(method, stream(())).spectrum(4)
    edge = 4 / 128 * (math.sqrt(D_IN) + math.sqrt(D_OUT)) ** 2
    assert low * edge < spectrum.floor / NOISE_MARGIN < high * edge
    assert spectrum.sigma_sq[0] < spectrum.floor and spectrum.samples == 128


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_noise_gets_no_adapter_and_a_rank_2_signal_gets_rank_2(method):
    modules = {"noise": accumulate(method, stream((), seed=3), name="noise"),
               "signal": accumulate(method, stream((4.0, 3.0), seed=4), name="signal")}
    spectra = {name: acc.spectrum(8) for name, acc in modules.items()}
    # the floor finds exactly the signal's two directions, and none of the noise's
    assert {n: sum(v > s.floor for v in s.sigma_sq) for n, s in spectra.items()} == {"noise": 0, "signal": 2}

    def allocate(**settings):
        return allocate_ranks_from_spectra(
            {n: s.sigma_sq for n, s in spectra.items()}, {n: s.floor for n, s in spectra.items()},
            {n: D_IN + D_OUT for n in spectra}, settings=AllocationSettings(rank_min=1, rank_max=8, **settings),
        )

    assert allocate(rank=2, mode="median").ranks == {"signal": 2}
    # budget mode spends what is left on the adapted module's next directions, never on pure noise
    result = allocate(rank=8, mode="budget")
    assert list(result.ranks) == ["signal"] and result.ranks["signal"] >= 2
    assert result.excluded == {"noise": NO_DIRECTION}


def test_errors_name_the_module():
    acc = SpectrumAccumulator("layer.q", D_IN, D_OUT, width=4)
    with pytest.raises(FisherAnalysisError, match="'layer.q'.*both halves"):
        acc.spectrum(2)
    with pytest.raises(FisherAnalysisError, match="'layer.q'"):
        acc.update(torch.zeros(2, D_OUT), torch.zeros(2, D_OUT))
    with pytest.raises(ValueError, match="method"):
        SpectrumAccumulator("layer.q", D_IN, D_OUT, width=4, method="svd")


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_a_set_built_before_the_model_is_materialised_sums_where_the_batches_are(method):
    # Lightning builds the set in setup, before a strategy moves, materialises or shards the
    # model: the weights may still be on the meta device. The sums follow the batches.
    from torch import nn

    from lightning_fisher.analysis.spectrum import SpectrumSet

    with torch.device("meta"):
        meta = nn.Linear(12, 10)
    built_late = SpectrumSet({"layer": meta}, rank_max=2, method=method)
    reference = SpectrumSet({"layer": nn.Linear(12, 10)}, rank_max=2, method=method)
    generator = torch.Generator().manual_seed(3)
    a, g = torch.randn(6, 4, 12, generator=generator), torch.randn(6, 4, 10, generator=generator)
    for spectra in (built_late, reference):
        spectra.observe("layer", a, g)
    assert built_late.state_tensor().device.type == "cpu"
    assert torch.equal(built_late.state_tensor(), reference.state_tensor())


@pytest.mark.parametrize("method", ["exact", "sketch"])
@pytest.mark.parametrize("signal", [(0.25, 0.15), (50.0, 40.0)])
def test_float32_sums_agree_with_float64_sums(method, signal):
    # Weak signal in heavy noise (sigma^2 1.1 and 0.37 against a floor of 0.2-0.34) and strong
    # signal in little noise (where the floor is a difference of two large, nearly equal half
    # means), over 400 batches. Measured: 3e-7 relative on the values above the floor (1e-4 on
    # the noise's values five orders below the top one), 1e-6 on the floor.
    data = list(stream(signal, seed=5, batches=400))
    f64 = accumulate(method, data)
    f32 = accumulate(method, [(a.float(), g.float()) for a, g in data])
    assert f64.dtype == torch.float64 and f32.dtype == torch.float32
    s64, s32 = f64.spectrum(8), f32.spectrum(8)
    assert s32.floor == pytest.approx(s64.floor, rel=1e-5)
    above = [v for v in s64.sigma_sq if v > s64.floor]
    assert len(above) == len(signal) == sum(v > s32.floor for v in s32.sigma_sq)
    assert s32.sigma_sq[: len(above)] == pytest.approx(above, rel=1e-5)
    assert s32.sigma_sq == pytest.approx(s64.sigma_sq, abs=1e-6 * s64.sigma_sq[0])
    for half64, half32 in zip(f64.half_spectra(f64.half_sketch(), 8), f32.half_spectra(f32.half_sketch(), 8)):
        assert half32.floor == pytest.approx(half64.floor, rel=1e-5)
        assert half32.sigma_sq == pytest.approx(half64.sigma_sq, abs=1e-6 * half64.sigma_sq[0])


def test_a_float64_batch_turns_float32_sums_into_float64():
    data = list(stream((3.0,), batches=4))
    acc = accumulate("sketch", [(a.float(), g.float()) for a, g in data[:2]])
    assert acc.dtype == torch.float32 and acc.omega.dtype == torch.float32
    for a, g in data[2:]:
        acc.update(a, g)
    assert acc.dtype == torch.float64 and acc.omega.dtype == torch.float64
    expected = accumulate("sketch", data).state_tensor()
    torch.testing.assert_close(acc.state_tensor(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_samples_with_infinities_are_skipped_and_huge_finite_ones_kept():
    # The finite check sums each sample: +inf and -inf in one sample sum to nan (skipped); finite
    # float32 values near the largest one overflow the sum, and the element check keeps them.
    a, g = torch.ones(4, 2, D_IN), torch.ones(4, 2, D_OUT)
    a[1, 0, 0], a[1, 1, 0] = math.inf, -math.inf
    g[2, 0, 0] = math.inf
    a[3] = 1e38
    g[3] = 1e-38
    acc = SpectrumAccumulator("layer", D_IN, D_OUT, width=4, method="exact")
    acc.update(a, g)
    assert acc.half_counts == (1, 1) and acc.samples_seen == 4  # samples 0 and 3 used, 1 and 2 skipped
    assert bool(torch.isfinite(acc.state_tensor()).all())
