"""Diffusion time in a scheduler's integer steps: the conversion rule, the focus in steps, the draw."""

import types

import pytest
import torch
from torch import nn

from lightning_fisher import UniformTimestepSampler
from lightning_fisher.analysis.scheduler_steps import (
    draw_scheduler_steps,
    focus_step_range,
    num_train_timesteps,
    to_scheduler_steps,
)
from lightning_fisher.analysis.timesteps import timestep_focus_applied


def test_the_fraction_of_the_schedule_is_the_fraction_of_its_steps():
    t = torch.tensor([0.0, 0.0009, 0.001, 0.3999, 0.4, 0.5, 0.9999, 1.0])
    assert to_scheduler_steps(t, 1000).tolist() == [0, 0, 1, 399, 400, 500, 999, 999]
    assert to_scheduler_steps(t, 1000).dtype == torch.long
    assert to_scheduler_steps(torch.tensor([0.0, 0.5, 1.0]), 4).tolist() == [0, 2, 3]


def test_uniform_t_gives_every_step_the_same_chance():
    torch.manual_seed(0)
    steps = to_scheduler_steps(UniformTimestepSampler()(40_000), 10)
    counts = torch.bincount(steps, minlength=10)
    assert counts.min() > 3_700 and counts.max() < 4_300  # 4000 each, within a few standard deviations


def test_focus_presets_in_steps():
    assert focus_step_range("texture", 1000) == (0, 399)
    assert focus_step_range("structure", 1000) == (600, 999)
    assert focus_step_range("0.25,0.5", 1000) == (250, 499)
    assert focus_step_range("0.25,0.5", 10) == (2, 4)
    assert focus_step_range("balanced", 1000) is None


@pytest.mark.parametrize("focus", ["texture", "structure", "0.2,0.3"])
def test_a_focused_sampler_draws_steps_in_the_focus_range(focus):
    model = nn.Linear(2, 2)
    model.timestep_sampler = UniformTimestepSampler()
    lo, hi = focus_step_range(focus, 1000)
    torch.manual_seed(0)
    with timestep_focus_applied(model, focus):
        steps = draw_scheduler_steps(model, 1000, 20_000)
    assert steps.min() >= lo and steps.max() <= hi
    assert steps.min() <= lo + 5 and steps.max() >= hi - 5  # the whole range, not a corner of it


def test_without_a_sampler_every_step_can_be_drawn():
    torch.manual_seed(0)
    steps = draw_scheduler_steps(nn.Linear(2, 2), 1000, 20_000)
    assert steps.min() < 10 and steps.max() > 989


def test_scheduler_config_or_attribute_or_number():
    assert num_train_timesteps(types.SimpleNamespace(config=types.SimpleNamespace(num_train_timesteps=50))) == 50
    assert num_train_timesteps(types.SimpleNamespace(num_train_timesteps=20)) == 20
    assert num_train_timesteps(7) == 7


@pytest.mark.parametrize(
    "scheduler, error, words",
    [
        (object(), TypeError, "no config.num_train_timesteps"),
        (True, TypeError, "bool"),
        (0, ValueError, "positive integer"),
        (types.SimpleNamespace(num_train_timesteps=2.5), ValueError, "positive integer"),
    ],
)
def test_what_is_not_a_scheduler_is_named(scheduler, error, words):
    with pytest.raises(error, match=words):
        num_train_timesteps(scheduler)


def test_times_outside_the_unit_range_or_integer_steps_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\].*got values in \[-0.5, 1\]"):
        to_scheduler_steps(torch.tensor([-0.5, 1.0]), 1000)
    with pytest.raises(ValueError, match="integer scheduler steps need no conversion"):
        to_scheduler_steps(torch.tensor([3, 4]), 1000)


def test_texture_steps_are_the_low_noise_end_of_a_ddpm_schedule():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    model = nn.Linear(2, 2)
    model.timestep_sampler = UniformTimestepSampler()
    x, noise = torch.zeros(4096, 1), torch.randn(4096, 1)
    spread = {}
    for focus in ("texture", "structure"):
        with timestep_focus_applied(model, focus):
            steps = draw_scheduler_steps(model, scheduler, 4096)
        spread[focus] = scheduler.add_noise(x, noise, steps).std()  # the noise's share of the sample
    assert spread["texture"] < 0.75 < 0.95 < spread["structure"]
