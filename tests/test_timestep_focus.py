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


# --- what mutation testing (benchmarks/mutation.py) found untested ---


@pytest.mark.parametrize("value", [(0.2, 0.5), [0.2, 0.5]])
def test_parse_a_pair(value):
    assert TimestepFocus.parse(value) == TimestepFocus("custom", (0.2, 0.5))
    assert TimestepFocus.parse(tuple(x for x in (0.6, 1.0))) == TimestepFocus("structure", (0.6, 1.0))


def test_parse_errors_quote_the_value_as_given():
    with pytest.raises(ValueError) as error:
        TimestepFocus.parse((0.5, 0.2))
    assert str(error.value) == "timestep_focus='(0.5, 0.2)': need 0 <= LO < HI <= 1, got LO=0.5, HI=0.2"
    with pytest.raises(ValueError) as error:
        TimestepFocus.parse(["a", "b"])
    assert str(error.value) == "timestep_focus=\"['a', 'b']\": a custom range is two numbers 'LO,HI', e.g. '0.2,0.5'"
    with pytest.raises(ValueError) as error:
        TimestepFocus.parse(" 0.5,0.2")  # quoted as written, not as lower-cased and stripped
    assert str(error.value) == "timestep_focus=' 0.5,0.2': need 0 <= LO < HI <= 1, got LO=0.5, HI=0.2"
    with pytest.raises(ValueError) as error:
        TimestepFocus.parse("A,B")
    assert str(error.value) == "timestep_focus='A,B': a custom range is two numbers 'LO,HI', e.g. '0.2,0.5'"


def test_custom_range_bounds():
    assert TimestepFocus.parse("0,0.3") == TimestepFocus("custom", (0.0, 0.3))
    assert TimestepFocus.parse("0.5,1") == TimestepFocus("custom", (0.5, 1.0))
    with pytest.raises(ValueError) as error:
        TimestepFocus.parse("0.3,0.3")
    assert str(error.value) == "timestep_focus='0.3,0.3': need 0 <= LO < HI <= 1, got LO=0.3, HI=0.3"


def test_str_and_describe():
    custom = TimestepFocus.parse("0.2,0.5")
    assert str(custom) == "0.2,0.5"
    assert custom.describe() == "0.2,0.5 (t in [0.2, 0.5])"
    assert str(TimestepFocus.parse("0,1")) == "0,1"  # the whole range is a custom one, not balanced
    assert str(TimestepFocus.parse("texture")) == "texture"
    assert TimestepFocus.parse("texture").describe() == "texture (t in [0, 0.4])"
    assert TimestepFocus.parse("structure").describe() == "structure (t in [0.6, 1])"
    assert TimestepFocus.parse("balanced").describe() == "balanced"


def test_uniform_sampler_bounds():
    assert repr(UniformTimestepSampler(0.5, 1.0)) == "UniformTimestepSampler(lo=0.5, hi=1)"
    assert repr(UniformTimestepSampler(0.0, 0.25)) == "UniformTimestepSampler(lo=0, hi=0.25)"
    for lo, hi in [(0.5, 0.5), (0.5, 1.5), (-0.1, 0.5), (0.6, 0.4)]:
        with pytest.raises(ValueError) as error:
            UniformTimestepSampler(lo, hi)
        assert str(error.value) == f"UniformTimestepSampler needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}"


def test_samplers_draw_on_the_device_asked_for():
    for sampler in (UniformTimestepSampler(0.2, 0.5), LogitNormalTimestepSampler()):
        t = sampler(3, "meta")  # a device other than the default one, on a machine without accelerators
        assert t.device.type == "meta" and t.shape == (3,)
        assert sampler(3).device == torch.empty(0).device


def test_logit_normal_sampler_draws_mean_plus_std_times_the_global_normal():
    torch.manual_seed(1)
    t = LogitNormalTimestepSampler(mean=1.0, std=0.5)(8)
    torch.manual_seed(1)
    assert torch.allclose(t, torch.sigmoid(1.0 + 0.5 * torch.randn(8)))
    torch.manual_seed(2)
    t = LogitNormalTimestepSampler(mean=0.0, std=1.0)(8)
    torch.manual_seed(2)
    assert torch.allclose(t, torch.sigmoid(torch.randn(8)))


def test_recording_sampler_counts_over_calls_and_passes_the_device_on():
    seen = []

    def sampler(batch_size, device):
        seen.append(device)
        return torch.linspace(0.1, 0.3, batch_size)

    recorder = RecordingTimestepSampler(sampler)
    assert recorder.observed_range is None and recorder.count == 0
    recorder(0, "cpu")
    assert recorder.observed_range is None and recorder.count == 0  # an empty draw records nothing
    recorder(3, "cpu")
    recorder(3)
    assert recorder.count == 6
    assert recorder.observed_range == pytest.approx((0.1, 0.3))
    assert seen == ["cpu", "cpu", None]
