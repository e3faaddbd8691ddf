"""Per-sample squared gradient norms of linear and embedding layers, without per-sample gradients.

These are the pure tensor kernels behind :class:`~lightning_fisher.analysis.collector.FisherCollector`;
they take a layer's inputs and output gradients and know nothing about hooks or models.

For sample ``i`` of a batch and a module with weight ``W`` and bias ``b``, the collector records::

    F[m, i] = (||dl_i/dW||^2 + ||dl_i/db||^2) / (numel(W) + numel(b))

where ``l_i`` is sample ``i``'s own loss, i.e. the squared norm of the per-sample gradient per
parameter. The kernels here return the numerator. A linear layer's input ``a`` is
``[B, T, d_in]`` (middle dims flattened into ``T``; 2-D inputs have ``T = 1``) and the gradient
of its output ``g`` is ``[B, T, d_out]``. The weight gradient of sample ``i`` is
``sum_t g_t a_t^T``, and its squared norm is either

* ``ghost``: ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` from the ``[B, T, T]`` Gram matrices of the
  inputs and of the output gradients, or
* ``materialize``: the per-sample ``[d_out, d_in]`` gradient by ``bmm``, squared and summed.

Both Gram matrices are symmetric, so ``ghost`` computes only their upper block triangle: the
tokens are cut into ``n`` blocks of :func:`gram_block_size` tokens, row block ``j`` is multiplied
against the tokens from its own start on, and the products of the off-diagonal blocks count
twice. That is :func:`ghost_fraction` ``= (n + 1) / 2n`` of the full products (0.75 at 128
tokens, 0.56 at 1,024), exactly the same sum, and more accurate in float32 than one reduction
over all ``T^2`` products. ``auto`` picks per layer and batch the cheaper kernel: ghost when
``ghost_fraction(T) T^2 (d_in + d_out) < T d_in d_out``.
The bias gradient is ``sum_t g_t``. An embedding's per-sample gradient sums ``g_t`` over the
positions that share an index (padding index excluded); ``ghost`` uses an index-equality Gram
matrix, ``materialize``/``auto`` sum rows per (sample, index) with ``index_add`` (never a
``[B, vocab, dim]`` tensor). Large temporaries are built a few samples at a time (at most
:data:`CHUNK_ELEMENTS` elements). Norms are computed in :func:`compute_dtype`: float32 for
float16/bfloat16/float32 activations, float64 for float64 ones.
"""

from __future__ import annotations

from typing import Iterator, Literal, Optional

import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "GramBlocks",
    "NormStrategy",
    "compute_dtype",
    "embedding_sq_norms",
    "ghost_fraction",
    "gram_block_size",
    "input_gram",
    "linear_sq_norms",
    "uses_ghost",
]

NormStrategy = Literal["auto", "ghost", "materialize"]

#: Elements of the largest temporary (Gram matrices or per-sample gradients) computed at once;
#: larger batches are processed in chunks of samples so memory stays bounded (~128 MB float32).
CHUNK_ELEMENTS = 1 << 25


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype norms are computed in: float64 if any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _sample_chunks(batch: int, per_sample: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def gram_block_size(tokens: int) -> int:
    """Tokens per block of the ghost kernel's block-triangular Gram products.

    Blocks of 64 tokens up to 256 tokens and of 128 beyond: large enough for efficient matrix
    products, small enough that the skipped lower triangle is most of the half it could be
    (measured on 2 CPU cores: 0.6-0.75 of the full products' time from 128 to 1,024 tokens).
    """
    return 64 if tokens <= 256 else 128


def _row_blocks(tokens: int) -> list[tuple[int, int]]:
    size = gram_block_size(tokens)
    return [(start, min(tokens, start + size)) for start in range(0, tokens, size)]


def ghost_fraction(tokens: int) -> float:
    """The share of the full ``T x T`` Gram products the block-triangular ghost kernel computes."""
    n = len(_row_blocks(tokens))
    return (n + 1) / (2 * n)


#: The upper block triangle of ``[B, T, T]`` Gram matrices: for row block ``j`` (tokens
#: ``start_j:stop_j``), the ``[B, stop_j - start_j, T - start_j]`` products against tokens ``start_j:``.
GramBlocks = tuple[torch.Tensor, ...]


def input_gram(a: torch.Tensor) -> GramBlocks:
    """The upper block triangle of the Gram matrices ``a_t . a_s`` of each sample's tokens.

    The ghost norm's input half, shared by layers that read the same input (an attention
    block's query, key and value).
    """
    return tuple(_upper_block(a, start, stop) for start, stop in _row_blocks(a.shape[1]))


def _upper_block(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Row block ``start:stop`` of ``x x^T`` per sample, against the tokens from ``start`` on."""
    return torch.bmm(x[:, start:stop], x[:, start:].transpose(1, 2))


def _ghost_sq(a: torch.Tensor, g: torch.Tensor, bias: bool, gram: Optional[GramBlocks] = None) -> torch.Tensor:
    # The bias acts like a constant input feature 1, so with a bias the Gram matrix of the
    # inputs gains +1 everywhere: sum_{t,s} (a_t.a_s + 1)(g_t.g_s) covers weight and bias.
    t = a.shape[1]
    blocks = _row_blocks(t)
    out = []
    for c in _sample_chunks(a.shape[0], t * t):
        total = torch.zeros(a[c].shape[0], dtype=a.dtype, device=a.device)
        for j, (start, stop) in enumerate(blocks):
            aa = _upper_block(a[c], start, stop) if gram is None else gram[j][c]
            if bias:
                aa = aa + 1.0
            products = aa * _upper_block(g[c], start, stop)
            width = stop - start  # the diagonal block counts once, the blocks right of it twice
            total += products[:, :, :width].sum(dim=(1, 2)) + 2.0 * products[:, :, width:].sum(dim=(1, 2))
        out.append(total)
    return torch.cat(out) if len(out) > 1 else out[0]


def _materialized_weight_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    out = []
    for c in _sample_chunks(a.shape[0], a.shape[2] * g.shape[2]):
        per_sample = torch.bmm(g[c].transpose(1, 2), a[c])
        # Square and sum rather than vector_norm over two dims: measurably more accurate in float32.
        out.append(per_sample.square().sum(dim=(1, 2)))
    return torch.cat(out)


def uses_ghost(strategy: NormStrategy, tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a linear layer's norm is computed from Gram matrices (else per-sample gradients).

    ``auto`` compares the costs: ``ghost_fraction(T) B T^2 (d_in + d_out)`` for the
    block-triangular Gram products against ``B T d_in d_out`` for materialised per-sample gradients.
    """
    if tokens <= 1:
        return False
    return strategy == "ghost" or (
        strategy == "auto" and ghost_fraction(tokens) * tokens * (d_in + d_out) < d_in * d_out
    )


def linear_sq_norms(
    a: torch.Tensor,
    g: torch.Tensor,
    *,
    bias: bool,
    strategy: NormStrategy = "auto",
    gram: Optional[GramBlocks] = None,
) -> torch.Tensor:
    """Per-sample squared norm of a linear layer's weight (+ bias) gradient.

    Args:
        a: ``[B, T, d_in]`` inputs (already in the compute dtype).
        g: ``[B, T, d_out]`` gradients of the outputs.
        bias: whether to add the bias gradient's squared norm.
        strategy: ``ghost``, ``materialize`` or ``auto`` (cheaper of the two for these sizes).
        gram: ``input_gram(a)`` when already known (layers that share an input, such as an
            attention block's query, key and value, share it too).

    Returns:
        ``[B]`` squared norms (unscaled, unnormalised).
    """
    t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if uses_ghost(strategy, t, d_in, d_out):
        return _ghost_sq(a, g, bias, gram)
    if t == 1:
        sq = a.square().sum(dim=(1, 2)) * g.square().sum(dim=(1, 2))
    else:
        sq = _materialized_weight_sq(a, g)
    if bias:
        sq = sq + g.sum(dim=1).square().sum(dim=1)
    return sq


def embedding_sq_norms(
    idx: torch.Tensor,
    g: torch.Tensor,
    *,
    num_embeddings: int,
    padding_idx: Optional[int],
    strategy: NormStrategy = "auto",
) -> torch.Tensor:
    """Per-sample squared norm of an embedding's weight gradient.

    Args:
        idx: ``[B, T]`` integer indices.
        g: ``[B, T, dim]`` gradients of the looked-up rows (compute dtype).
        num_embeddings: vocabulary size.
        padding_idx: index whose row receives no gradient, or ``None``.
        strategy: ``ghost`` (index-equality Gram matrix) or ``materialize``/``auto`` (sum rows
            per sample and index with ``index_add``; cheaper, never vocabulary-sized).

    Returns:
        ``[B]`` squared norms.
    """
    batch, t = idx.shape
    valid = torch.ones_like(idx, dtype=torch.bool) if padding_idx is None else idx != padding_idx
    if strategy == "ghost":
        out = []
        for c in _sample_chunks(batch, t * t):
            same = (idx[c].unsqueeze(2) == idx[c].unsqueeze(1)) & valid[c].unsqueeze(2)
            gg = torch.bmm(g[c], g[c].transpose(1, 2))
            out.append((gg * same).sum(dim=(1, 2)))
        return torch.cat(out)
    sample = torch.arange(batch, device=idx.device).unsqueeze(1).expand(batch, t)
    keys = (sample * num_embeddings + idx)[valid]
    rows = g[valid]
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique.numel(), g.shape[2], dtype=g.dtype, device=g.device)
    summed.index_add_(0, inverse, rows)
    sq = torch.zeros(batch, dtype=g.dtype, device=g.device)
    sq.index_add_(0, torch.div(unique, num_embeddings, rounding_mode="floor"), summed.square().sum(dim=1))
    return sq
