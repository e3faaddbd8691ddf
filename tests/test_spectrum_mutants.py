"""analysis/spectrum.py: the cases benchmarks/mutation.py found untested (values, boundaries, messages).

Kept apart from tests/test_spectrum.py, which is being changed at the same time.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fisher.analysis.spectrum import SpectrumAccumulator, SpectrumSet, sketch_width


def test_sketch_width_is_rank_max_plus_oversampling():
    assert sketch_width(8) == 18
    assert sketch_width(8, oversampling=0) == 8
    assert sketch_width(1, 3) == 4


def batches(seed=0, batch=5, tokens=3, d_in=6, d_out=4, count=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, tokens, d_in, generator=gen, dtype=torch.float64),
             torch.randn(batch, tokens, d_out, generator=gen, dtype=torch.float64)) for _ in range(count)]


def fed(method, data=None, *, d_in=6, d_out=4, width=2, **kwargs):
    acc = SpectrumAccumulator("layer", d_in, d_out, width=width, method=method, **kwargs)
    for a, g in data if data is not None else batches(d_in=d_in, d_out=d_out):
        acc.update(a, g)
    return acc


def test_sizes_of_one_are_accepted_and_zero_is_refused():
    assert SpectrumAccumulator("m", 1, 1, width=1).width == 1
    assert SpectrumAccumulator("m", 2, 3, width=1, loss_reduction="sum").loss_reduction == "sum"
    for d_in, d_out, width in ((0, 2, 2), (2, 0, 2), (2, 2, 0)):
        with pytest.raises(ValueError, match=f"^module 'm': d_in, d_out and width must be positive, got {d_in}, {d_out}, {width}$"):
            SpectrumAccumulator("m", d_in, d_out, width=width)


def test_auto_keeps_exact_sums_up_to_twice_the_sketch_size():
    # width 1: a sketch holds d_out + 3 d_in entries per half; 12 x 4 = 48 = 2 * (12 + 12): still exact
    assert SpectrumAccumulator("m", 4, 12, width=1).method == "exact"
    assert SpectrumAccumulator("m", 4, 13, width=1).method == "sketch"  # 52 > 2 * (13 + 12)


def test_the_finite_mask_and_non_finite_inputs_drop_only_their_samples():
    data = batches(count=1)
    a, g = data[0]
    a = a.clone()
    a[3, 1, 2] = float("nan")  # sample 3: a non-finite input
    acc = SpectrumAccumulator("layer", 6, 4, width=2, method="exact")
    acc.update(a, g, finite=torch.tensor([[1.0], [0.0], [1.0], [1.0], [1.0]]))  # sample 1 masked (any dtype, any shape)
    assert acc.half_counts == (3, 0) and acc.samples_seen == 5
    sums = acc.state_tensor()[: 2 * 4 * 6].reshape(2, 4, 6)
    expected = 5 * sum(torch.einsum("td,te->ed", a[i], g[i]) for i in (0, 2, 4))  # batch-mean loss: times B
    torch.testing.assert_close(sums[0], expected)
    assert not sums[1].any()


def test_sum_reduction_does_not_scale_by_the_batch():
    data = batches(count=1)
    mean, total = fed("exact", data), fed("exact", data, loss_reduction="sum")
    torch.testing.assert_close(mean.state_tensor()[:-3], 5 * total.state_tensor()[:-3])
    a, g = data[0]
    expected = sum(torch.einsum("td,te->ed", a[i], g[i]) for i in (0, 2, 4))
    torch.testing.assert_close(total.state_tensor()[: 4 * 6].reshape(4, 6), expected)


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_state_and_half_sketch_go_where_asked(method):
    acc = fed(method)
    assert acc.state_tensor().device.type == "cpu" and acc.state_tensor("meta").device.type == "meta"
    assert acc.half_sketch().device.type == "cpu" and acc.half_sketch("meta").device.type == "meta"
    spectra = SpectrumSet({"a": nn.Linear(6, 4)}, rank_max=2, method=method)
    assert spectra.state_tensor("meta").device.type == "meta" and spectra.half_sketch("meta").device.type == "meta"


def test_a_float32_state_is_loaded_as_float64():
    acc = fed("exact")
    state = acc.state_tensor()
    other = SpectrumAccumulator("layer", 6, 4, width=2, method="exact")
    other.load_state_tensor(state.float())
    assert other.state_tensor().dtype == torch.float64
    torch.testing.assert_close(other.state_tensor(), state.float().double())


@pytest.mark.parametrize("d_in, d_out", [(6, 4), (3, 5)])
def test_how_many_values_a_spectrum_has(d_in, d_out):
    exact = fed("exact", d_in=d_in, d_out=d_out, width=2)
    sketch = fed("sketch", d_in=d_in, d_out=d_out, width=2)
    smaller = min(d_in, d_out)
    assert len(exact.spectrum(10).sigma_sq) == smaller  # not limited by the sketch width
    assert len(exact.spectrum(1).sigma_sq) == 1
    assert len(sketch.spectrum(10).sigma_sq) == 2  # the width
    assert len(sketch.spectrum(1).sigma_sq) == 1
    assert exact.spectrum(2).name == "layer"
    halves = sketch.half_spectra(sketch.half_sketch(), 10)
    assert [len(h.sigma_sq) for h in halves] == [2, 2]
    assert [len(h.sigma_sq) for h in sketch.half_spectra(sketch.half_sketch(), 1)] == [1, 1]
    wide = fed("sketch", d_in=d_in, d_out=d_out, width=8)
    assert [len(h.sigma_sq) for h in wide.half_spectra(wide.half_sketch(), 10)] == [smaller, smaller]


def test_half_spectra_are_each_halfs_own():
    # every sample twice in a row: both halves hold the same sums, so each half's spectrum is the whole's
    a, g = batches(batch=4, count=1)[0]
    twice = SpectrumAccumulator("layer", 6, 4, width=3, method="sketch")
    twice.update(a.repeat_interleave(2, dim=0), g.repeat_interleave(2, dim=0))
    first, second = twice.half_spectra(twice.half_sketch(), 3)
    whole = twice.spectrum(3)
    assert first.name == second.name == "layer" and first.samples == second.samples == 4
    assert first.sigma_sq == pytest.approx(whole.sigma_sq, rel=1e-9)
    assert second.sigma_sq == pytest.approx(whole.sigma_sq, rel=1e-9)
    # unequal halves: 3 and 2 samples, and each half's floor uses the other's share
    odd = SpectrumAccumulator("layer", 6, 4, width=3, method="sketch")
    odd.update(*batches(batch=5, count=1)[0])
    first, second = odd.half_spectra(odd.half_sketch(), 3)
    assert (first.samples, second.samples) == (3, 2)
    assert first.floor / second.floor == pytest.approx(2 / 3)
    assert first.sigma_sq != second.sigma_sq


def test_edge_and_sketch_frobenius_formulas():
    acc = SpectrumAccumulator("layer", 9, 4, width=2, method="sketch")
    assert acc._edge(2.0) == pytest.approx(2.0 * (2 + 3) ** 2 / 36)
    y, w = torch.full((4, 2), 1.0, dtype=torch.float64), torch.full((5, 9), 2.0, dtype=torch.float64)
    assert acc._sketch_frobenius_sq(y, w) == pytest.approx((8 + 180) / 7)


def test_exact_floor_is_the_larger_of_the_top_difference_and_the_edge():
    acc = fed("exact", batches(count=4))
    n1, n2 = acc.half_counts
    sums = acc.state_tensor()[: 2 * 4 * 6].reshape(2, 4, 6)
    diff = sums[0] / n1 - sums[1] / n2
    top = float(torch.linalg.svdvals(diff)[0]) ** 2
    edge = float(diff.square().sum()) * (2 + 6**0.5) ** 2 / 24
    total = n1 + n2
    assert acc.spectrum(2).floor == pytest.approx(2.0 * n1 * n2 / total**2 * max(top, edge))
    assert acc.spectrum(2, margin=1.0).floor == pytest.approx(n1 * n2 / total**2 * max(top, edge))


def test_a_sketch_of_a_low_rank_matrix_is_exact():
    # rank 2 < width 4: the range is caught whole, the residual is zero, the values are the SVD's
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 1, 7, generator=gen, dtype=torch.float64)
    g = torch.zeros(6, 1, 5, dtype=torch.float64)
    g[:, 0, :2] = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    exact, sketch = fed("exact", [(a, g)], d_in=7, d_out=5, width=4), fed("sketch", [(a, g)], d_in=7, d_out=5, width=4)
    assert sketch.spectrum(2).sigma_sq == pytest.approx(exact.spectrum(2).sigma_sq, rel=1e-9)


class _Conv1D(nn.Module):
    """transformers' Conv1D as recognised by name: ``nf`` outputs, weight ``[in, out]``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.zeros(nx, nf))


_Conv1D.__name__ = "Conv1D"


def test_a_set_takes_conv1d_transposed_and_passes_its_settings():
    spectra = SpectrumSet({"c": _Conv1D(5, 3), "l": nn.Linear(3, 5)}, rank_max=2, method="sketch", seed=7,
                          loss_reduction="sum")
    conv, lin = spectra.accumulators["c"], spectra.accumulators["l"]
    assert (conv.d_in, conv.d_out) == (lin.d_in, lin.d_out) == (3, 5)
    assert conv.name == "c" and conv.method == "sketch" and conv.loss_reduction == "sum" and conv.width == 12
    assert torch.equal(conv.omega, SpectrumAccumulator("c", 3, 5, width=12, method="sketch", seed=7).omega)
    with pytest.raises(Exception, match="'e' is an Embedding"):
        SpectrumSet({"e": nn.Embedding(3, 2)}, rank_max=2)


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_a_set_loads_each_accumulators_part_of_the_state(method):
    modules = {"a": nn.Linear(6, 4), "b": nn.Linear(4, 3)}
    gen = torch.Generator().manual_seed(4)
    source = SpectrumSet(modules, rank_max=2, method=method)
    for _ in range(2):
        source.observe("a", torch.randn(3, 2, 6, generator=gen), torch.randn(3, 2, 4, generator=gen))
        source.observe("b", torch.randn(3, 2, 4, generator=gen), torch.randn(3, 2, 3, generator=gen))
    target = SpectrumSet(modules, rank_max=2, method=method)
    target.load_state_tensor(source.state_tensor().reshape(1, -1))
    for name in modules:
        assert torch.equal(target.accumulators[name].state_tensor(), source.accumulators[name].state_tensor())
    assert target.spectra() == source.spectra()
    halved = source.spectra(margin=1.0)
    assert {n: s.floor * 2 for n, s in halved.items()} == pytest.approx({n: s.floor for n, s in source.spectra().items()})
    pairs, pairs_1 = source.half_spectra(source.half_sketch()), source.half_spectra(source.half_sketch(), margin=1.0)
    assert pairs["a"][0].floor == pytest.approx(2 * pairs_1["a"][0].floor)


def test_module_seed_is_the_first_eight_sha256_bytes_little_endian_less_the_top_bit():
    import hashlib

    from lightning_fisher.analysis.spectrum import _module_seed

    for seed, name in ((0, "a"), (3, "layers.1.q")):
        digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
        assert _module_seed(seed, name) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    values = [_module_seed(s, n) for s in range(20) for n in ("a", "b")]
    assert all(0 <= v < 2**63 for v in values) and any(v >= 2**62 for v in values)


def test_float32_inputs_are_multiplied_in_float32():
    # the product in the inputs' precision, then added to the float64 sums (float64 only for float64 inputs)
    gen = torch.Generator().manual_seed(5)
    a, g = torch.randn(2, 3, 6, generator=gen), torch.randn(2, 3, 4, generator=gen)
    acc = SpectrumAccumulator("layer", 6, 4, width=2, method="exact")
    acc.update(a, g)
    sums = acc.state_tensor()[: 2 * 4 * 6].reshape(2, 4, 6)
    for h in (0, 1):
        assert torch.equal(sums[h], 2 * (g[h].T @ a[h]).double())


def test_a_wide_sketch_of_a_narrow_input_has_d_in_values():
    wide = fed("sketch", d_in=3, d_out=5, width=8)
    assert len(wide.spectrum(10).sigma_sq) == 3


def test_the_default_seed_is_zero():
    assert torch.equal(SpectrumAccumulator("a", 6, 4, width=2, method="sketch").omega,
                       SpectrumAccumulator("a", 6, 4, width=2, method="sketch", seed=0).omega)
    spectra = SpectrumSet({"a": nn.Linear(6, 4)}, rank_max=2, method="sketch")
    assert torch.equal(spectra.accumulators["a"].omega, SpectrumAccumulator("a", 6, 4, width=12, method="sketch").omega)


def test_a_float32_half_sketch_is_read_in_float64():
    acc = fed("sketch")
    low = acc.half_sketch().float()
    assert acc.half_spectra(low, 2) == acc.half_spectra(low.double(), 2)


def test_a_loaded_float32_state_keeps_adding_in_float64():
    data = batches(count=2)
    source = fed("exact", data[:1])
    low, high = (SpectrumAccumulator("layer", 6, 4, width=2, method="exact") for _ in range(2))
    low.load_state_tensor(source.state_tensor().float())
    high.load_state_tensor(source.state_tensor().float().double())
    for acc in (low, high):
        acc.update(*data[1])
    assert torch.equal(low.state_tensor(), high.state_tensor())


# ---------------------------------------------------------------- issue 23: float32 sums, batched checks, Q-free path
from lightning_fisher.analysis import spectrum as spectrum_module  # noqa: E402
from lightning_fisher.analysis.spectrum import _module_seed  # noqa: E402


def built_under_default_dtype(dtype, *args, **kwargs):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return SpectrumAccumulator(*args, **kwargs)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_sums_and_counts_do_not_follow_the_default_dtype(method):
    acc = built_under_default_dtype(torch.float16, "layer", 1, 1, width=1, method=method)
    assert acc.dtype == torch.float32
    assert acc.half_sketch().dtype == torch.float32  # the sketch's W too (and the counts)
    # 2501 samples a half: not a float16 number (its neighbours are 2500 and 2502)
    acc.update(torch.ones(5002, 1, 1), torch.ones(5002, 1, 1))
    assert acc.half_counts == (2501, 2501) and acc.samples_seen == 5002


def test_test_matrices_are_float64_draws_rounded_to_float32():
    # 16 entries or more each: below that, CPU randn draws in float64 whatever the dtype
    acc = SpectrumAccumulator("layer", 9, 4, width=2, method="sketch", seed=3)
    gen = torch.Generator().manual_seed(_module_seed(3, "layer"))
    omega = torch.randn(9, 2, generator=gen, dtype=torch.float64).float()
    psi = torch.randn(5, 4, generator=gen, dtype=torch.float64).float()
    assert torch.equal(acc.omega, omega) and torch.equal(acc.psi, psi)


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_the_device_given_holds_the_sums_and_test_matrices(method):
    acc = SpectrumAccumulator("layer", 6, 4, width=2, method=method, device="meta")
    assert acc.omega.device.type == "meta" and acc.psi.device.type == "meta"
    assert acc.state_tensor().device.type == "meta"
    assert acc.half_sketch().device.type == "meta"


def test_a_skipped_count_past_float32_precision_is_kept():
    acc = fed("exact")
    state = acc.state_tensor()
    state[-1] = 2.0**24 + 1
    acc.load_state_tensor(state)
    assert float(acc.state_tensor()[-1]) == 2.0**24 + 1


def test_a_float32_state_with_large_counts_keeps_counting_in_float64():
    acc = fed("exact", [(a.float(), g.float()) for a, g in batches()])
    state = acc.state_tensor().float()
    state[-3:-1] = 2.0**24  # exact in float32; 2**24 + 1 is not
    acc.load_state_tensor(state)
    assert acc.dtype == torch.float32 and acc.half_sketch().dtype == torch.float32
    acc.update(torch.ones(2, 1, 6), torch.ones(2, 1, 4))
    assert acc.half_counts == (2**24 + 1, 2**24 + 1)


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_a_loaded_state_is_copied_not_shared(method):
    acc = fed(method)  # float64 sums: the state's dtype
    state = acc.state_tensor()
    expected = state.clone()
    other = fed(method, batches(seed=1))
    other.load_state_tensor(state)
    state.zero_()
    torch.testing.assert_close(other.state_tensor(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_a_float32_half_sketch_stays_float32(method):
    acc = fed(method, [(a.float(), g.float()) for a, g in batches()])
    sketch = acc.half_sketch()
    assert sketch.dtype == torch.float32
    assert sketch[-2:].tolist() == list(acc.half_counts)


def low_rank_halves(d_in=6, d_out=8, rank=3, batch=6):
    gen = torch.Generator().manual_seed(5)
    basis = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    a = (torch.randn(batch, 1, rank, generator=gen, dtype=torch.float64) @ basis)
    g = torch.randn(batch, 1, d_out, generator=gen, dtype=torch.float64)
    return a, g


def test_half_spectra_of_a_low_rank_sketch_are_each_halfs_exact_values():
    # d_out 8 >= width 3 and rank 3: Y is well conditioned, so the Q-free reconstruction runs
    a, g = low_rank_halves()
    acc = SpectrumAccumulator("layer", 6, 8, width=3, method="exact")
    acc.update(a, g)
    halves = acc.half_spectra(acc.half_sketch(), 3)
    for h in (0, 1):
        s = 6 * sum(g[i, 0][:, None] * a[i, 0][None, :] for i in range(h, 6, 2)) / 3
        expected = torch.linalg.svdvals(s)[:3].square()
        torch.testing.assert_close(torch.tensor(halves[h].sigma_sq, dtype=torch.float64), expected, rtol=1e-6, atol=1e-9)
        assert halves[h].samples == 3


@pytest.mark.parametrize("method", ["exact", "sketch"])
def test_one_at_a_time_reconstruction_gives_the_batched_values(monkeypatch, method):
    acc = fed(method, d_in=7, d_out=5, width=2)
    batched = acc.half_spectra(acc.half_sketch(), 2)
    monkeypatch.setattr(spectrum_module, "BATCHED_CHECK_ELEMENTS", 0)
    single = acc.half_spectra(acc.half_sketch(), 2)
    for one, other in zip(batched, single):
        torch.testing.assert_close(torch.tensor(one.sigma_sq), torch.tensor(other.sigma_sq), rtol=1e-9, atol=1e-12)
        assert one.floor == pytest.approx(other.floor, rel=1e-9) and one.samples == other.samples


def test_the_batched_reconstruction_includes_its_size_limit(monkeypatch):
    acc = fed("sketch", d_in=7, d_out=5, width=2)
    calls = []
    reconstruct = SpectrumAccumulator._sketch_sigma_sq

    def spy(self, y, w):
        calls.append(y.dim())
        return reconstruct(self, y, w)

    monkeypatch.setattr(SpectrumAccumulator, "_sketch_sigma_sq", spy)
    monkeypatch.setattr(spectrum_module, "BATCHED_CHECK_ELEMENTS", 2 * 5 * 2)  # exactly Y's entries
    acc.half_spectra(acc.half_sketch(), 2)
    assert calls == [3]
    calls.clear()
    monkeypatch.setattr(spectrum_module, "BATCHED_CHECK_ELEMENTS", 2 * 5 * 2 - 1)
    acc.half_spectra(acc.half_sketch(), 2)
    assert calls == [2, 2, 2]


def count_triangular_solves(monkeypatch):
    calls = []
    solve = torch.linalg.solve_triangular

    def spy(*args, **kwargs):
        calls.append(1)
        return solve(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve_triangular", spy)
    return calls


def crafted_sketch(acc, y0, y1, n=(1, 1)):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(2, 2 * acc.width + 1, acc.d_in, generator=gen, dtype=torch.float64)
    return torch.cat([torch.stack([y0, y1]).reshape(-1), w.reshape(-1), torch.tensor(n, dtype=torch.float64)])


def test_the_q_free_path_runs_for_a_square_well_conditioned_y(monkeypatch):
    # d_out == width: R is square (the boundary); three solves per reconstruction (one for Psi Q)
    acc = SpectrumAccumulator("layer", 9, 3, width=3, method="sketch")
    gen = torch.Generator().manual_seed(1)
    y0, y1 = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    calls = count_triangular_solves(monkeypatch)
    acc.half_spectra(crafted_sketch(acc, y0 + 3 * torch.eye(3), y1 - 3 * torch.eye(3)), 3)
    assert len(calls) == 3


def test_the_q_free_path_judges_each_sketch_on_its_own_scale(monkeypatch):
    # halves a hundred million times apart, each well conditioned: every one takes the Q-free path
    acc = SpectrumAccumulator("layer", 9, 6, width=3, method="sketch")
    gen = torch.Generator().manual_seed(2)
    y0, y1 = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
    calls = count_triangular_solves(monkeypatch)
    acc.half_spectra(crafted_sketch(acc, y0, 1e-8 * y1), 3)
    assert len(calls) == 3


def test_a_large_but_ill_conditioned_y_forms_q(monkeypatch):
    # a column within 1e-7 (relative) of another's span: R^-1 unusable however large Y is
    acc = SpectrumAccumulator("layer", 9, 6, width=3, method="sketch")
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y[:, 2] = y[:, 0] + 1e-7 * torch.randn(6, generator=gen, dtype=torch.float64)
    calls = count_triangular_solves(monkeypatch)
    acc.half_spectra(crafted_sketch(acc, 1e6 * y, 2e6 * y), 3)
    assert len(calls) == 2


@pytest.mark.parametrize("check_every", [0, -1, 2.0, "2"])
def test_check_every_must_be_a_positive_int(check_every):
    with pytest.raises(ValueError, match="^check_every: must be a positive integer"):
        SpectrumSet({"fc": nn.Linear(3, 2)}, rank_max=1, check_every=check_every)


def test_the_indexed_halves_are_made_on_the_inputs_device():
    # a mask that drops a sample takes the indexed path; its positions must be made where the
    # mask is, not on the default device (meta here, which would fail to combine with the CPU)
    (a, g), = batches(count=1)
    mask = torch.tensor([True, False, True, True, True])
    expected = SpectrumAccumulator("layer", 6, 4, width=2, method="exact")
    expected.update(a, g, finite=mask)
    acc = SpectrumAccumulator("layer", 6, 4, width=2, method="exact")
    with torch.device("meta"):
        acc.update(a, g, finite=mask)
    assert acc.half_counts == (3, 1) == expected.half_counts
    torch.testing.assert_close(acc.state_tensor(), expected.state_tensor(), rtol=0, atol=0)
