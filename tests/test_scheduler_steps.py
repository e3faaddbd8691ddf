"""Diffusion time in a scheduler's integer steps: the conversion rule, the focus in steps, the draw."""

import types

import pytest
import torch
from torch import nn

from lightning_fisher import UniformTimestepSampler
from lightning_fisher.analysis.scheduler_steps import (
    draw_flow_matching,
    draw_scheduler_steps,
    focus_step_range,
    num_train_timesteps,
    to_flow_matching,
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


# ----------------------------------------------------------------------- flow-matching schedulers


def flow_scheduler(shift=3.0):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def test_each_time_reads_the_training_table_from_its_clean_end():
    scheduler = flow_scheduler()
    # diffusers' flow-matching training draws u uniform and reads index floor(u * T) of the table, which
    # runs from the most noise down; the time (T - 1 - k + 0.5) / T reads the same entry k.
    k = torch.arange(1000)
    timesteps, sigmas = to_flow_matching((999 - k + 0.5) / 1000, scheduler)
    assert torch.equal(timesteps, scheduler.timesteps) and torch.equal(sigmas, scheduler.sigmas[:1000])
    ends_t, ends_sigma = to_flow_matching(torch.tensor([0.0, 1.0]), scheduler)
    assert ends_sigma.tolist() == [scheduler.sigmas[999].item(), 1.0] and ends_t[1].item() == 1000.0


def test_the_sigmas_are_the_ones_the_scheduler_mixes_with():
    scheduler = flow_scheduler()
    t = torch.rand(64, generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = to_flow_matching(t, scheduler)
    mixed = scheduler.scale_noise(torch.zeros(64, 1), timesteps, torch.ones(64, 1))  # = sigma where x = 0, noise = 1
    assert torch.allclose(mixed.reshape(-1), sigmas)
    order = torch.argsort(t)
    assert bool((sigmas[order].diff() >= 0).all())  # more time, more noise


@pytest.mark.parametrize("focus, lo, hi", [("texture", 600, 999), ("structure", 0, 399)])
def test_a_focused_sampler_draws_the_flow_tables_focus_range(focus, lo, hi):
    scheduler = flow_scheduler()
    model = nn.Linear(2, 2)
    model.timestep_sampler = UniformTimestepSampler()
    torch.manual_seed(0)
    with timestep_focus_applied(model, focus):
        timesteps, sigmas = draw_flow_matching(model, scheduler, 20_000, "cpu")
    table = scheduler.sigmas
    assert sigmas.min() >= table[hi] and sigmas.max() <= table[lo]  # the table's entries lo..hi, no others
    assert sigmas.min() <= table[hi - 5] and sigmas.max() >= table[lo + 5]  # the whole range
    assert timesteps.shape == (20_000,) and sigmas.device.type == "cpu"
    # texture: the least noise (below 0.67 with shift 3); structure: the most
    assert (sigmas.max() < 0.67) if focus == "texture" else (sigmas.min() > 0.81)


def test_without_a_sampler_the_whole_flow_table_can_be_drawn():
    torch.manual_seed(0)
    scheduler = flow_scheduler()
    _, sigmas = draw_flow_matching(nn.Linear(2, 2), scheduler, 20_000)
    assert sigmas.max() == 1.0 and sigmas.min() <= scheduler.sigmas[990]


def test_an_inference_table_or_a_ddpm_scheduler_is_refused():
    scheduler = flow_scheduler()
    scheduler.set_timesteps(28)
    with pytest.raises(ValueError, match=r"has 28 timesteps, not num_train_timesteps = 1000: set_timesteps\(\)"):
        to_flow_matching(torch.tensor([0.5]), scheduler)
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(TypeError, match="DDPMScheduler has no timesteps and sigmas tables; .* use to_scheduler_steps"):
        to_flow_matching(torch.tensor([0.5]), diffusers.DDPMScheduler(num_train_timesteps=1000))
    rising = types.SimpleNamespace(num_train_timesteps=3, timesteps=torch.tensor([1.0, 2.0, 3.0]),
                                   sigmas=torch.tensor([0.1, 0.5, 1.0]))
    with pytest.raises(ValueError, match="must run from the most noise down"):
        to_flow_matching(torch.tensor([0.5]), rising)


def test_an_analysis_focus_reaches_a_flow_matching_loss():
    from lightning_fisher import analyze

    scheduler = flow_scheduler()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    drawn = []

    def loss_fn(m, x):  # a flow-matching loss: velocity of the straight path from x to noise
        noise = torch.randn_like(x[:, :2])
        timesteps, sigmas = draw_flow_matching(m, scheduler, len(x))
        drawn.append(sigmas)
        noisy = (1 - sigmas[:, None]) * x[:, :2] + sigmas[:, None] * noise
        velocity = m(torch.cat([noisy, timesteps[:, None] / 1000], dim=1))
        return torch.nn.functional.mse_loss(velocity, noise - x[:, :2])

    batches = [torch.randn(16, 3) for _ in range(6)]
    fisher_map = analyze(model, batches, loss_fn, timestep_sampler=UniformTimestepSampler(), timestep_focus="texture",
                         rank=2, rank_min=1, rank_max=4, max_batches=6, min_batches=6)
    sigmas = torch.cat(drawn)
    assert fisher_map.analysis.timestep_focus.focus.describe().startswith("texture")
    assert len(sigmas) >= 96 and sigmas.max() < 0.67  # the least-noise 40 % of the table, and only those


# --- what mutation testing (benchmarks/mutation.py) found untested ---


def table(sigmas, timesteps=None, device="cpu"):
    """A flow-matching training table of ``len(sigmas)`` entries (timesteps = 1000 * sigma unless given)."""
    sigmas = torch.tensor(sigmas)
    timesteps = 1000 * sigmas if timesteps is None else torch.tensor(timesteps)
    return types.SimpleNamespace(num_train_timesteps=len(timesteps), timesteps=timesteps.to(device), sigmas=sigmas)


def test_one_step_is_a_schedule():
    assert num_train_timesteps(1) == 1
    assert num_train_timesteps(types.SimpleNamespace(num_train_timesteps=1)) == 1
    assert to_scheduler_steps(torch.tensor([0.0, 0.5, 1.0]), 1).tolist() == [0, 0, 0]
    assert focus_step_range("texture", 1) == (0, 0)


def test_times_above_one_are_refused():
    with pytest.raises(ValueError) as error:
        to_scheduler_steps(torch.tensor([0.5, 1.5]), 1000)
    assert str(error.value) == (
        "to_scheduler_steps: t must lie in [0, 1], got values in [0.5, 1.5]; "
        "a timestep_sampler returns the fraction of the schedule (lightning_fisher.analysis.timesteps)"
    )


def test_focus_step_range_at_its_ends():
    assert focus_step_range("0,0.1", 10) == (0, 0)  # hi * T = 1: the first step only
    assert focus_step_range("0,0.05", 10) == (0, 0)
    assert focus_step_range("0.95,1", 10) == (9, 9)
    assert focus_step_range((1 - 2**-53, 1.0), 5) == (4, 4)  # the largest lo below 1: the last step


def test_draw_scheduler_steps_gives_the_sampler_the_device():
    seen = []

    def sampler(batch_size, device):
        seen.append(device)
        return torch.full((batch_size,), 0.5)

    model = nn.Linear(2, 2)
    model.timestep_sampler = sampler
    assert draw_scheduler_steps(model, 10, 3, "cpu").tolist() == [5, 5, 5]
    assert draw_scheduler_steps(model, 10, 2).tolist() == [5, 5]
    assert seen == ["cpu", None]


def test_flow_tables_at_the_edges_of_the_most_noise_first_check():
    t = torch.tensor([0.0, 1.0])
    timesteps, sigmas = to_flow_matching(t, table([0.7]))  # one entry: nothing to order
    assert timesteps.tolist() == pytest.approx([700.0, 700.0]) and sigmas.tolist() == pytest.approx([0.7, 0.7])
    timesteps, sigmas = to_flow_matching(t, table([1.0, 0.5]))  # two entries, most noise first
    assert timesteps.tolist() == [500.0, 1000.0] and sigmas.tolist() == [0.5, 1.0]
    # only the first and last entries are compared
    _, sigmas = to_flow_matching(torch.tensor([0.0, 0.5, 1.0]), table([0.8, 0.9, 0.1]))
    assert sigmas.tolist() == pytest.approx([0.1, 0.9, 0.8])
    for flat in ([0.5, 0.5], [0.5, 0.6], [0.5, 0.9, 0.5]):
        with pytest.raises(ValueError) as error:
            to_flow_matching(t, table(flat))
        assert str(error.value) == "scheduler: its sigmas must run from the most noise down, as a flow-matching training table does"


def test_flow_tables_missing_or_too_short_are_refused():
    with pytest.raises(TypeError) as error:
        to_flow_matching(torch.tensor([0.5]), types.SimpleNamespace(num_train_timesteps=3))
    assert str(error.value) == (
        "scheduler: SimpleNamespace has no timesteps and sigmas tables; pass a flow-matching scheduler "
        "(diffusers' FlowMatchEulerDiscreteScheduler), or use to_scheduler_steps for a DDPM-style one"
    )
    short_sigmas = types.SimpleNamespace(num_train_timesteps=3, timesteps=torch.tensor([3.0, 2.0, 1.0]),
                                         sigmas=torch.tensor([1.0, 0.5]))
    long_timesteps = types.SimpleNamespace(num_train_timesteps=3, timesteps=torch.tensor([4.0, 3.0, 2.0, 1.0]),
                                           sigmas=torch.tensor([1.0, 0.7, 0.5, 0.2]))
    with pytest.raises(ValueError) as error:
        to_flow_matching(torch.tensor([0.5]), long_timesteps)
    assert str(error.value) == (
        "scheduler: its table has 4 timesteps, not num_train_timesteps = 3: set_timesteps() "
        "set it up for inference; give a copy of the scheduler as built for training"
    )
    with pytest.raises(ValueError) as error:
        to_flow_matching(torch.tensor([0.5]), short_sigmas)
    assert str(error.value) == "scheduler: its table has 3 timesteps but only 2 sigmas"


def test_flow_results_are_on_the_timesteps_device():
    # sigmas on the CPU, timesteps on "meta" (the second device a CPU-only machine has, and one that
    # lets a CPU tensor be indexed from it): the sigmas drawn follow the timesteps' device
    timesteps, sigmas = to_flow_matching(torch.tensor([0.0, 1.0]), table([1.0, 0.5], device="meta"))
    assert timesteps.device.type == "meta" and sigmas.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second real device")
def test_flow_times_on_an_accelerator_read_tables_on_the_cpu():
    timesteps, sigmas = to_flow_matching(torch.tensor([0.0, 1.0], device="cuda"), table([1.0, 0.5]))
    assert timesteps.device.type == "cpu" and sigmas.device.type == "cpu"
    assert timesteps.tolist() == [500.0, 1000.0] and sigmas.tolist() == [0.5, 1.0]


def test_draw_flow_matching_puts_its_results_on_the_device_asked_for():
    scheduler = table([1.0, 0.5])
    seen = []

    def sampler(batch_size, device):
        seen.append(device)
        return torch.tensor([0.0, 1.0, 0.2])[:batch_size]

    model = nn.Linear(2, 2)
    model.timestep_sampler = sampler
    timesteps, sigmas = draw_flow_matching(model, scheduler, 3, "meta")
    assert timesteps.device.type == "meta" and sigmas.device.type == "meta" and timesteps.shape == (3,)
    timesteps, sigmas = draw_flow_matching(model, scheduler, 3)
    assert timesteps.tolist() == [500.0, 1000.0, 500.0] and sigmas.tolist() == [0.5, 1.0, 0.5]
    assert timesteps.device.type == "cpu" and sigmas.device.type == "cpu"
    meta_tables = table([1.0, 0.5], device="meta")
    timesteps, sigmas = draw_flow_matching(model, meta_tables, 3)  # default: the tables' device
    assert timesteps.device.type == "meta" and sigmas.device.type == "meta"
    assert seen == [None, None, None]  # the times are drawn where to_flow_matching reads them
