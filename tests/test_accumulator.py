"""FisherAccumulator: running statistics, halves, and the all-reduce-able state tensor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_fisher.analysis.accumulator import FisherAccumulator
from lightning_fisher.errors import FisherAnalysisError

NAMES = ("a", "b", "c")


def batches(seed: int = 0, sizes: tuple[int, ...] = (4, 3, 5, 1, 6)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([[1.0], [10.0], [1e-3]], dtype=torch.float64)  # modules of very different size
    return [torch.rand(len(NAMES), n, generator=gen, dtype=torch.float64) * scale for n in sizes]


def test_scores_and_stderr_match_numpy() -> None:
    data = batches()
    acc = FisherAccumulator(NAMES)
    for values in data:
        acc.update(values)
    allv = torch.cat(data, dim=1).numpy()
    n = allv.shape[1]
    assert acc.num_samples == n and acc.num_skipped == 0 and acc.num_batches == len(data)
    scores, stderr = acc.scores(), acc.stderr()
    np.testing.assert_allclose([scores[k] for k in NAMES], allv.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose([stderr[k] for k in NAMES], allv.std(axis=1, ddof=1) / math.sqrt(n), rtol=1e-9)


def test_halves_follow_running_sample_parity_including_skipped() -> None:
    values = torch.arange(1.0, 8.0, dtype=torch.float64).repeat(len(NAMES), 1)  # samples 1..7
    acc = FisherAccumulator(NAMES)
    acc.update(values[:, :3])                                      # indices 0,1,2
    acc.update(values[:, 3:], finite=torch.tensor([True, False, True, True]))  # 3,4(skipped),5,6
    # even indices 0,2,6 -> values 1,3,7 ; odd 1,3,5 -> values 2,4,6; index 4 (value 5) skipped
    assert acc.half_counts().tolist() == [3.0, 3.0]
    halves = acc.half_scores()
    assert halves.shape == (2, len(NAMES))
    assert halves[0].tolist() == [11 / 3] * 3 and halves[1].tolist() == [4.0] * 3
    assert acc.num_skipped == 1 and acc.samples_seen == 7


def test_non_finite_values_are_never_added() -> None:
    acc = FisherAccumulator(NAMES)
    values = torch.tensor([[1.0, math.nan, 3.0], [1.0, 2.0, math.inf], [1.0, 2.0, 3.0]], dtype=torch.float64)
    acc.update(values)  # no mask given: the accumulator checks finiteness itself
    assert acc.num_samples == 1 and acc.num_skipped == 2
    assert acc.scores() == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert math.isnan(acc.stderr()["a"])  # n < 2: spread unknown
    assert torch.isnan(acc.half_scores()[1]).all()  # the odd half is empty


def test_zero_samples_raises_clear_error() -> None:
    acc = FisherAccumulator(NAMES)
    acc.update(torch.full((3, 4), math.nan))
    acc.update(torch.ones(3, 2), finite=torch.tensor([False, False]))
    with pytest.raises(FisherAnalysisError, match=r"no finite per-sample gradients in 2 batches \(6 samples skipped"):
        acc.scores()
    with pytest.raises(FisherAnalysisError):
        FisherAccumulator(NAMES).stderr()
    one = FisherAccumulator(NAMES)
    one.update(torch.ones(3, 1), finite=torch.tensor([False]))
    with pytest.raises(FisherAnalysisError, match=r"no finite per-sample gradients in 1 batch \(1 sample skipped"):
        one.scores()


def test_state_tensor_round_trip() -> None:
    acc = FisherAccumulator(NAMES)
    for values in batches(1):
        acc.update(values)
    acc.update(torch.full((3, 2), math.nan))
    state = acc.state_tensor()
    assert state.dtype == torch.float64 and state.shape == (4 * len(NAMES) + 4,)
    copy = FisherAccumulator.from_state_tensor(NAMES, state)
    assert copy.scores() == acc.scores() and copy.stderr() == acc.stderr()
    assert (copy.num_samples, copy.num_skipped, copy.num_batches) == (acc.num_samples, acc.num_skipped, acc.num_batches)
    assert torch.equal(copy.half_scores(), acc.half_scores())
    state.zero_()  # the loaded copy owns its data
    assert copy.scores() == acc.scores()
    with pytest.raises(FisherAnalysisError, match="different module names"):
        FisherAccumulator(("a",)).load_state_tensor(acc.state_tensor())


def test_summed_states_equal_one_accumulator_fed_everything() -> None:
    """What DDP does: each rank accumulates its shard, states are all-reduced with SUM."""
    data = batches(2, sizes=(4, 4, 4, 4))
    rank0, rank1, single = FisherAccumulator(NAMES), FisherAccumulator(NAMES), FisherAccumulator(NAMES)
    for i, values in enumerate(data):
        (rank0 if i % 2 == 0 else rank1).update(values)
        single.update(values)
    merged = FisherAccumulator.from_state_tensor(NAMES, rank0.state_tensor() + rank1.state_tensor())
    for key in NAMES:
        assert merged.scores()[key] == pytest.approx(single.scores()[key], rel=1e-12)
        assert merged.stderr()[key] == pytest.approx(single.stderr()[key], rel=1e-12)
    assert merged.num_samples == single.num_samples == 16 and merged.num_batches == 4
    # Even-sized batches keep each rank's parity aligned with the global stream: halves agree too.
    torch.testing.assert_close(merged.half_scores(), single.half_scores(), rtol=1e-12, atol=0)


def test_bad_shapes_are_rejected() -> None:
    acc = FisherAccumulator(NAMES)
    with pytest.raises(FisherAnalysisError, match=r"shape \[3, batch\]"):
        acc.update(torch.ones(2, 4))
    with pytest.raises(FisherAnalysisError, match="finite mask"):
        acc.update(torch.ones(3, 4), finite=torch.ones(3, dtype=torch.bool))


# --- what mutation testing (benchmarks/mutation.py) found untested -----------------------------


def test_float32_values_are_summed_in_float64():
    acc = FisherAccumulator(["a"])
    acc.update(torch.tensor([[1e8, 0.0, 1.0, 0.0]], dtype=torch.float32))  # half 0: 1e8 and 1, lost in float32
    assert acc.half_scores()[0, 0].item() == (1e8 + 1.0) / 2


def test_a_sample_the_mask_allows_is_still_skipped_when_not_finite():
    acc = FisherAccumulator(["a", "b"])
    acc.update(torch.tensor([[math.nan, 2.0, 4.0], [1.0, 1.0, 1.0]]), finite=torch.tensor([True, True, True]))
    assert (acc.num_samples, acc.num_skipped) == (2, 1)
    assert torch.isfinite(acc.half_scores()).all()


def test_one_sample_per_half_is_that_samples_value_and_two_samples_have_a_stderr():
    acc = FisherAccumulator(["a"])
    acc.update(torch.tensor([[3.0, 5.0]]))
    assert acc.half_scores().tolist() == [[3.0], [5.0]]
    assert acc.stderr()["a"] == pytest.approx(1.0)  # sample variance 2 over 2 samples


def test_the_state_tensor_goes_to_the_device_asked_for():
    acc = FisherAccumulator(["a"])
    acc.update(torch.tensor([[3.0, 5.0]]))
    assert acc.state_tensor().device.type == "cpu"
    assert acc.state_tensor(device="meta").device.type == "meta"


def test_a_float32_state_and_an_integer_mask_are_converted():
    acc = FisherAccumulator(["a"])
    acc.load_state_tensor(torch.zeros(8, dtype=torch.float32))  # e.g. reduced by a float32 collective
    acc.update(torch.tensor([[1e8, 0.0, 1.0, 0.0]]), finite=torch.tensor([1, 1, 1, 1]))
    assert acc.half_scores()[0, 0].item() == (1e8 + 1.0) / 2  # still summed in float64
    assert acc.state_tensor().dtype == torch.float64


def test_the_sample_counts_are_float64_whatever_the_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # counts made with the default dtype would stop at 2048
    try:
        acc = FisherAccumulator(["a"])
    finally:
        torch.set_default_dtype(previous)
    acc.update(torch.ones(1, 5002, dtype=torch.float64))
    assert acc.half_counts().tolist() == [2501.0, 2501.0] and acc.num_samples == 5002
    assert acc.half_counts().dtype == torch.float64
