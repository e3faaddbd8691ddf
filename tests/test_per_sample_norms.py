"""Per-sample squared-norm kernels against per-sample gradients formed explicitly."""

from __future__ import annotations

import pytest
import torch

from lightning_fisher.analysis.per_sample_norms import (
    compute_dtype,
    embedding_sq_norms,
    ghost_fraction,
    gram_block_size,
    input_gram,
    linear_sq_norms,
    uses_ghost,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    a = torch.randn(2, 9, 8, dtype=torch.float64)
    g = torch.randn(2, 9, 7, dtype=torch.float64)
    exact = linear_sq_norms(a, g, bias=True, strategy="materialize")
    collector_like = linear_sq_norms(a.to(dtype).float(), g.to(dtype).float(), bias=True, strategy="ghost")
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 rounding of the inputs themselves
    assert rel_err(collector_like.double(), exact) < tol


@pytest.mark.parametrize("chunk_elements", [1 << 25, 40])  # 40: one or two samples per chunk
def test_kernels_agree(chunk_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_fisher.analysis.per_sample_norms.CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(1)
    a = torch.randn(3, 6, 5, dtype=torch.float64)
    g = torch.randn(3, 6, 4, dtype=torch.float64)
    ghost = linear_sq_norms(a, g, bias=False, strategy="ghost")
    full = torch.einsum("bto,bti->boi", g, a).square().sum(dim=(1, 2))
    assert rel_err(ghost, full) < 1e-12
    assert rel_err(linear_sq_norms(a, g, bias=False, strategy="materialize"), full) < 1e-12
    idx = torch.tensor([[1, 2, 1, 0, 3, 1], [0, 0, 4, 4, 2, 5]])
    ge = torch.randn(2, 6, 4, dtype=torch.float64)
    dense = torch.zeros(2, 7, 4, dtype=torch.float64)
    for b in range(2):
        for t in range(6):
            if idx[b, t] != 0:
                dense[b, idx[b, t]] += ge[b, t]
    expected = dense.square().sum(dim=(1, 2))
    for strategy in ("ghost", "materialize"):
        got = embedding_sq_norms(idx, ge, num_embeddings=7, padding_idx=0, strategy=strategy)
        assert rel_err(got, expected) < 1e-12


def test_auto_picks_cheaper_kernel_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.per_sample_norms as kernels

    used = []
    for kernel in ("_ghost_sq", "_materialized_weight_sq"):
        original = getattr(kernels, kernel)
        monkeypatch.setattr(kernels, kernel,
                            lambda a, g, *rest, _k=kernel, _f=original: used.append((_k, a.shape[1])) or _f(a, g, *rest))
    # Up to 64 tokens the Gram matrices are one block (fraction 1):
    # d_in * d_out / (d_in + d_out) = 64 * 64 / 128 = 32: ghost below 32 tokens, materialize above.
    for t in (8, 40):
        used.clear()
        linear_sq_norms(torch.randn(2, t, 64), torch.randn(2, t, 64), bias=True, strategy="auto")
        assert used == [("_ghost_sq" if t < 32 else "_materialized_weight_sq", t)]




@pytest.mark.parametrize("strategy", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_bias_adds_the_squared_norm_of_the_summed_output_gradient(strategy: str, tokens: int) -> None:
    torch.manual_seed(2)
    a = torch.randn(4, tokens, 5, dtype=torch.float64)
    g = torch.randn(4, tokens, 3, dtype=torch.float64)
    weight = torch.einsum("bto,bti->boi", g, a).square().sum(dim=(1, 2))
    bias = g.sum(dim=1).square().sum(dim=1)
    assert rel_err(linear_sq_norms(a, g, bias=True, strategy=strategy), weight + bias) < 1e-12
    assert rel_err(linear_sq_norms(a, g, bias=False, strategy=strategy), weight) < 1e-12


def test_uses_ghost_only_with_several_tokens_and_when_cheaper() -> None:
    assert not uses_ghost("ghost", 1, 64, 64)  # one token: the outer product is exact and cheaper
    assert uses_ghost("ghost", 100, 64, 64)
    assert not uses_ghost("materialize", 2, 64, 64)
    assert uses_ghost("auto", 31, 64, 64) and not uses_ghost("auto", 32, 64, 64)


def test_compute_dtype_is_float64_only_for_float64_inputs() -> None:
    half, single, double = torch.zeros(1).bfloat16(), torch.zeros(1), torch.zeros(1).double()
    assert compute_dtype(half) == compute_dtype(half, single) == torch.float32
    assert compute_dtype(half, double) == torch.float64


@pytest.mark.parametrize("tokens", [2, 63, 64, 65, 128, 200, 256, 257, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_block_triangular_ghost_equals_the_full_sum_across_block_edges(tokens: int, bias: bool) -> None:
    torch.manual_seed(tokens)
    a = torch.randn(3, tokens, 5, dtype=torch.float64)
    g = torch.randn(3, tokens, 4, dtype=torch.float64)
    aa = torch.bmm(a, a.transpose(1, 2)) + (1.0 if bias else 0.0)
    full = torch.einsum("bij,bij->b", aa, torch.bmm(g, g.transpose(1, 2)))
    assert rel_err(linear_sq_norms(a, g, bias=bias, strategy="ghost"), full) < 1e-12
    shared = linear_sq_norms(a, g, bias=bias, strategy="ghost", gram=input_gram(a))
    assert rel_err(shared, full) < 1e-12


@pytest.mark.parametrize("chunk_elements", [1 << 25, 40])
def test_shared_input_gram_is_sliced_by_sample_chunk(chunk_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_fisher.analysis.per_sample_norms.CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(3)
    a = torch.randn(5, 150, 6, dtype=torch.float64)
    g = torch.randn(5, 150, 3, dtype=torch.float64)
    full = torch.einsum("bto,bti->boi", g, a).square().sum(dim=(1, 2))
    assert rel_err(linear_sq_norms(a, g, bias=False, strategy="ghost", gram=input_gram(a)), full) < 1e-12


def test_input_gram_keeps_only_the_upper_block_triangle() -> None:
    a = torch.randn(2, 300, 4)
    blocks = input_gram(a)
    size = gram_block_size(300)
    assert size == 128 and [tuple(b.shape) for b in blocks] == [(2, 128, 300), (2, 128, 172), (2, 44, 44)]
    assert ghost_fraction(300) == pytest.approx(4 / 6)
    assert ghost_fraction(64) == 1.0 and ghost_fraction(128) == 0.75 and ghost_fraction(1024) == 9 / 16


def test_block_triangular_ghost_is_accurate_in_float32_at_long_sequences() -> None:
    torch.manual_seed(4)
    a = torch.randn(2, 1024, 32, dtype=torch.float64)
    g = torch.randn(2, 1024, 48, dtype=torch.float64)
    exact = linear_sq_norms(a, g, bias=True, strategy="materialize")
    assert rel_err(linear_sq_norms(a.float(), g.float(), bias=True, strategy="ghost").double(), exact) < 2e-6


def test_auto_counts_the_block_triangular_saving() -> None:
    # 512 tokens, 768 -> 768: the full Gram products (512 * 1536 = 786k multiply-adds per token) would
    # lose to materialising (768 * 768 = 590k); 5/8 of them (491k) win.
    assert 512 * (768 + 768) > 768 * 768 > ghost_fraction(512) * 512 * (768 + 768)
    assert uses_ghost("auto", 512, 768, 768)
    assert not uses_ghost("auto", 1024, 1024, 1024)  # 9/16 * 1024 * 2048 = 1.18M > 1.05M
    assert uses_ghost("auto", 1024, 1024, 4096)  # 9/16 * 1024 * 5120 = 2.95M < 4.19M


def test_sample_chunks_hold_at_most_chunk_elements_and_at_least_one_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.per_sample_norms as kernels

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 4)

    def steps(batch, per_sample):
        return [(c.start, c.stop) for c in kernels._sample_chunks(batch, per_sample)]

    assert steps(5, 1) == [(0, 4), (4, 5)]  # four one-element samples fit a chunk
    assert steps(3, 4) == [(0, 1), (1, 2), (2, 3)]
    assert steps(3, 50) == [(0, 1), (1, 2), (2, 3)]  # larger than a chunk: still one sample each
    assert steps(5, 0) == [(0, 4), (4, 5)]


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_kernels_chunk_by_the_size_of_their_temporaries(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.per_sample_norms as kernels

    asked = []
    original = kernels._sample_chunks
    monkeypatch.setattr(kernels, "_sample_chunks", lambda b, n: asked.append((b, n)) or original(b, n))
    torch.manual_seed(5)
    linear_sq_norms(torch.randn(2, 5, 3), torch.randn(2, 5, 4), bias=False, strategy=strategy)
    embedding_sq_norms(torch.randint(0, 4, (2, 5)), torch.randn(2, 5, 3), num_embeddings=4, padding_idx=None,
                       strategy=strategy)
    # ghost: [T, T] Gram matrices per sample (linear and embedding); materialize: a [d_out, d_in] gradient
    assert asked == ([(2, 25), (2, 25)] if strategy == "ghost" else [(2, 12)])


def test_block_size_changes_after_256_tokens() -> None:
    assert [gram_block_size(t) for t in (1, 64, 255, 256, 257, 1024)] == [64, 64, 64, 64, 128, 128]
    assert [len(input_gram(torch.zeros(1, t, 1))) for t in (64, 65, 256, 257)] == [1, 2, 4, 3]


def test_a_given_gram_is_used_not_recomputed() -> None:
    torch.manual_seed(6)
    a = torch.randn(2, 5, 3, dtype=torch.float64)
    g = torch.randn(2, 5, 4, dtype=torch.float64)
    plain = linear_sq_norms(a, g, bias=False, strategy="ghost")
    scaled = linear_sq_norms(a, g, bias=False, strategy="ghost", gram=input_gram(2 * a))  # the Gram of 2a: 4x
    assert rel_err(scaled, 4 * plain) < 1e-12


@pytest.mark.parametrize("batch", [2, 3])
def test_ghost_in_exactly_two_or_three_chunks_returns_every_sample(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_fisher.analysis.per_sample_norms.CHUNK_ELEMENTS", 40)  # 6 tokens: one sample a chunk
    torch.manual_seed(7)
    a = torch.randn(batch, 6, 3, dtype=torch.float64)
    g = torch.randn(batch, 6, 2, dtype=torch.float64)
    got = linear_sq_norms(a, g, bias=True, strategy="ghost")
    assert got.shape == (batch,)
    assert rel_err(got, linear_sq_norms(a, g, bias=True, strategy="materialize")) < 1e-12


def test_two_tokens_use_ghost_when_asked_and_materialize_exactly() -> None:
    assert uses_ghost("ghost", 2, 64, 64)
    torch.manual_seed(8)
    a = torch.randn(3, 2, 5, dtype=torch.float64)
    g = torch.randn(3, 2, 4, dtype=torch.float64)
    full = torch.einsum("bto,bti->boi", g, a).square().sum(dim=(1, 2))
    for strategy in ("ghost", "materialize", "auto"):
        assert rel_err(linear_sq_norms(a, g, bias=False, strategy=strategy), full) < 1e-12


def test_default_strategy_is_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_fisher.analysis.per_sample_norms as kernels

    used = []
    original = kernels._ghost_sq
    monkeypatch.setattr(kernels, "_ghost_sq", lambda *args: used.append("ghost") or original(*args))
    linear_sq_norms(torch.randn(2, 8, 64), torch.randn(2, 8, 64), bias=True)  # 8 tokens, 64 -> 64: ghost is cheaper
    assert used == ["ghost"]


@pytest.mark.parametrize("strategy", ["ghost", "materialize", "auto"])
def test_embedding_without_padding_index_counts_every_position(strategy: str) -> None:
    torch.manual_seed(9)
    idx = torch.tensor([[1, 0, 1, 3], [0, 0, 2, 2]])
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    dense = torch.zeros(2, 4, 3, dtype=torch.float64)
    for b in range(2):
        for t in range(4):
            dense[b, idx[b, t]] += g[b, t]  # index 0 too
    got = embedding_sq_norms(idx, g, num_embeddings=4, padding_idx=None, strategy=strategy)
    assert rel_err(got, dense.square().sum(dim=(1, 2))) < 1e-12


@pytest.mark.parametrize("strategy", ["ghost", "materialize", "auto"])
def test_embedding_kernel_is_the_one_asked_for(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # ghost: the index-equality Gram matrix; otherwise rows summed per (sample, index), found with torch.unique
    calls = []
    original = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    embedding_sq_norms(torch.tensor([[1, 2]]), torch.randn(1, 2, 3), num_embeddings=3, padding_idx=None,
                       strategy=strategy)
    assert bool(calls) == (strategy != "ghost")


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_results_stay_on_the_inputs_device_whatever_the_default_device(strategy: str) -> None:
    torch.manual_seed(10)
    a, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    idx, ge = torch.tensor([[1, 0, 1, 3, 2], [0, 0, 2, 2, 1]]), torch.randn(2, 5, 3)
    expected_linear = linear_sq_norms(a, g, bias=True, strategy=strategy)
    expected_embedding = embedding_sq_norms(idx, ge, num_embeddings=4, padding_idx=0, strategy=strategy)
    with torch.device("meta"):  # temporaries made without a device would land there
        linear = linear_sq_norms(a, g, bias=True, strategy=strategy)
        embedding = embedding_sq_norms(idx, ge, num_embeddings=4, padding_idx=0, strategy=strategy)
    assert linear.device.type == embedding.device.type == "cpu"
    assert torch.equal(linear, expected_linear) and torch.equal(embedding, expected_embedding)
