"""Timestep focus on a real flow-matching model: what the analysis draws, and that it matters."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import TimestepFocus, UniformTimestepSampler, analyze
from lightning_fisher.analysis.timesteps import (
    LogitNormalTimestepSampler,
    RecordingTimestepSampler,
    TimestepSampler,
    timestep_focus_applied,
)

pytest.importorskip("sklearn")
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


@pytest.fixture(scope="module")
def high_digits():
    from lightning_fisher.examples.digits_flow import digits_split

    half = digits_split("high")
    return DataLoader([{"x": x, "label": y} for x, y in zip(half.train_images, half.train_labels)], batch_size=32)


def focused_map(checkpoint, data, focus):
    from lightning_fisher.examples.digits_flow import load_pretrained_digits_flow, single_threaded

    model = load_pretrained_digits_flow(checkpoint)
    own_sampler = model.timestep_sampler
    with single_threaded():
        fisher_map = analyze(model, data, timestep_focus=focus, rank=8, rank_min=2, rank_max=32, seed=3,
                             convergence_patience=100, max_batches=8, min_batches=0, trainer_kwargs=QUIET)
    assert model.timestep_sampler is own_sampler  # the model's own sampler is back
    return fisher_map


def test_focus_reaches_training_step_and_changes_scores(pretrained_digits_flow, high_digits):
    texture = focused_map(pretrained_digits_flow, high_digits, "texture")
    structure = focused_map(pretrained_digits_flow, high_digits, "structure")
    custom = focused_map(pretrained_digits_flow, high_digits, "0.45,0.55")
    balanced = focused_map(pretrained_digits_flow, high_digits, "balanced")

    for fisher_map, (lo, hi) in ((texture, (0.0, 0.4)), (structure, (0.6, 1.0)), (custom, (0.45, 0.55))):
        focus = fisher_map.analysis.timestep_focus
        assert focus.applied and focus.range == (lo, hi)
        seen_lo, seen_hi = focus.observed_range
        assert lo <= seen_lo < seen_hi <= hi
        assert seen_hi - seen_lo > 0.8 * (hi - lo)  # the whole range was drawn, not one point
    assert custom.analysis.timestep_focus.name == "custom"
    # balanced keeps the model's own sampler: uniform over [0, 1]
    observed = balanced.analysis.timestep_focus.observed_range
    assert balanced.analysis.timestep_focus.range is None and observed[0] < 0.1 and observed[1] > 0.9

    # low-noise and high-noise ends load the network differently
    ratios = [texture.scores[name] / structure.scores[name] for name in texture.scores]
    assert max(ratios) / min(ratios) > 2.0
    assert texture.scores != structure.scores


def test_model_without_timesteps_warns_and_runs_unchanged():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).pow(2).mean()

    data = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8)
    with pytest.warns(UserWarning, match="has no `timestep_sampler` attribute"):
        fisher_map = analyze(Plain(), data, timestep_focus="texture", rank=1, rank_min=1, rank_max=4, trainer_kwargs=QUIET)
    focus = fisher_map.analysis.timestep_focus
    assert focus.name == "texture" and not focus.applied and focus.observed_range is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with timestep_focus_applied(Plain(), "balanced") as recorder:
            assert recorder is None  # balanced on a model without timesteps: nothing to say


@pytest.mark.parametrize(
    "text, name, expected",
    [("balanced", "balanced", None), ("Texture", "texture", (0.0, 0.4)), ("structure", "structure", (0.6, 1.0)),
     ("0.2,0.5", "custom", (0.2, 0.5)), (" 0.6 , 1 ", "structure", (0.6, 1.0))],
)
def test_parse(text, name, expected):
    focus = TimestepFocus.parse(text)
    assert focus.name == name and focus.range == expected


@pytest.mark.parametrize("text", ["sideways", "0.5", "0.5,0.2", "-0.1,0.3", "0.1,1.5", "a,b", "nan,0.5"])
def test_parse_errors_name_the_setting(text):
    with pytest.raises(ValueError, match="timestep_focus"):
        TimestepFocus.parse(text)


def test_recording_sampler_and_restore_on_error():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.timestep_sampler = UniformTimestepSampler()

    model = Model()
    own = model.timestep_sampler
    with pytest.raises(RuntimeError, match="boom"):
        with timestep_focus_applied(model, "structure") as recorder:
            assert isinstance(model.timestep_sampler, RecordingTimestepSampler)
            t = model.timestep_sampler(1000)
            assert recorder.count == 1000 and 0.6 <= recorder.observed_range[0] < recorder.observed_range[1] <= 1.0
            assert torch.all((t >= 0.6) & (t <= 1.0))
            raise RuntimeError("boom")
    assert model.timestep_sampler is own


def test_logit_normal_sampler_follows_the_protocol():
    torch.manual_seed(0)
    sampler = LogitNormalTimestepSampler()
    assert isinstance(sampler, TimestepSampler)
    t = sampler(10_000, "cpu")
    assert t.shape == (10_000,) and 0.0 < float(t.min()) and float(t.max()) < 1.0
    assert float(t.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(((t > 0.25) & (t < 0.75)).float().mean()) > 0.6  # more mass mid-schedule than uniform's 0.5
    shifted = LogitNormalTimestepSampler(mean=1.0, std=0.5)(10_000)
    assert float(shifted.mean()) > 0.65  # sigmoid(1) = 0.73: a positive mean moves t towards noise
    assert repr(LogitNormalTimestepSampler(mean=1.0, std=0.5)) == "LogitNormalTimestepSampler(mean=1, std=0.5)"
    with pytest.raises(ValueError, match="std > 0"):
        LogitNormalTimestepSampler(std=0.0)
