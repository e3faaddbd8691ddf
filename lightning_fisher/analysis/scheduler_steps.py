"""Diffusion time in a noise scheduler's own steps (diffusers' ``DDPMScheduler`` and its kin).

The analysis speaks the :mod:`~lightning_fisher.analysis.timesteps` contract: a sampler draws
``t`` in ``[0, 1]``, ``0`` clean data, ``1`` pure noise, and ``timestep_focus`` narrows that
range (``texture`` is ``[0, 0.4]``, ``structure`` ``[0.6, 1]``). A DDPM-style scheduler counts
time in integer steps instead: ``scheduler.add_noise(x, noise, steps)`` takes ``steps`` in
``[0, num_train_timesteps)``, step ``0`` the least noise, the last step the most. The two meet
through one rule, applied in the loss function between the sampler and the scheduler::

    step = min(floor(t * num_train_timesteps), num_train_timesteps - 1)

so the fraction ``t`` of the schedule is the fraction of its steps: ``t`` uniform on ``[0, 1]``
gives every step the same chance (DDPM's own training distribution), and a focus ``[lo, hi]``
gives the steps ``floor(lo * T)`` to ``ceil(hi * T) - 1`` (:func:`focus_step_range`): for
``T = 1000``, ``texture`` is steps 0-399 and ``structure`` 600-999. The rule is linear in steps,
not in noise level (a DDPM schedule's noise grows unevenly with the step).

A flow-matching scheduler (diffusers' ``FlowMatchEulerDiscreteScheduler``, for SD3 / Flux-style
models) keeps a table of ``num_train_timesteps`` timesteps and their noise levels ``sigma``
(``x_sigma = (1 - sigma) x + sigma noise``), running from the most noise down, and its training
draws a uniform index into that table. :func:`to_flow_matching` reads the same table with the
same rule, counted from the clean end: ``index = T - 1 - step``, so ``t`` uniform is the
scheduler's own uniform training draw, its ``shift`` included, and ``texture`` is the 40 % of
the table with the least noise.

A loss function draws its steps with :func:`draw_scheduler_steps`, which reads the model's
``timestep_sampler`` (the one :func:`~lightning_fisher.analyze` installs and focuses for the
run) and falls back to uniform ``t`` when the model has none (a training loop outside the
analysis). Nothing here imports diffusers: a scheduler is anything with
``config.num_train_timesteps`` (or that number itself).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from lightning_fisher.analysis.timesteps import TIMESTEP_SAMPLER_ATTRIBUTE, TimestepFocus, UniformTimestepSampler

__all__ = [
    "draw_flow_matching", "draw_scheduler_steps", "focus_step_range", "num_train_timesteps", "to_flow_matching",
    "to_scheduler_steps",
]

SchedulerLike = Union[int, Any]


def num_train_timesteps(scheduler: SchedulerLike) -> int:
    """The number of training steps of ``scheduler`` (``scheduler.config.num_train_timesteps``).

    Args:
        scheduler: a diffusers scheduler (or anything with ``config.num_train_timesteps`` or
            ``num_train_timesteps``), or the number itself.

    Raises:
        TypeError: ``scheduler`` has no ``num_train_timesteps``.
        ValueError: the number is not a positive integer.
    """
    if isinstance(scheduler, bool):
        raise TypeError("scheduler: expected a noise scheduler or its num_train_timesteps, got a bool")
    if isinstance(scheduler, int):
        steps = scheduler
    else:
        # The config first: diffusers warns on the scheduler's own attribute (a deprecated alias).
        steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        if steps is None:
            steps = getattr(scheduler, "num_train_timesteps", None)
        if steps is None:
            raise TypeError(
                f"scheduler: {type(scheduler).__name__} has no config.num_train_timesteps; pass a DDPM-style "
                "scheduler (diffusers' DDPMScheduler, DDIMScheduler, ...) or the number of its training steps"
            )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"scheduler: num_train_timesteps must be a positive integer, got {steps!r}")
    return steps


def to_scheduler_steps(t: torch.Tensor, scheduler: SchedulerLike) -> torch.Tensor:
    """The scheduler's integer steps for diffusion time ``t`` in ``[0, 1]`` (the rule in the module docstring).

    Args:
        t: float tensor of times in ``[0, 1]``, ``0`` clean, ``1`` pure noise.
        scheduler: the scheduler, or its ``num_train_timesteps``.

    Returns:
        A ``torch.long`` tensor of the shape of ``t``, values in ``[0, num_train_timesteps)``.

    Raises:
        ValueError: ``t`` is not floating point or leaves ``[0, 1]`` (a sampler that already
            returns scheduler steps needs no conversion).
    """
    steps = num_train_timesteps(scheduler)
    if not torch.is_floating_point(t):
        raise ValueError(
            f"to_scheduler_steps: t must be a float tensor of times in [0, 1], got dtype {t.dtype}; "
            "integer scheduler steps need no conversion"
        )
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise ValueError(
            f"to_scheduler_steps: t must lie in [0, 1], got values in [{float(t.min()):g}, {float(t.max()):g}]; "
            "a timestep_sampler returns the fraction of the schedule (lightning_fisher.analysis.timesteps)"
        )
    return torch.clamp(torch.floor(t * steps), max=steps - 1).long()


def focus_step_range(focus: Union[str, TimestepFocus], scheduler: SchedulerLike) -> Optional[tuple[int, int]]:
    """The first and last scheduler step a ``timestep_focus`` can draw (``None`` for ``balanced``).

    Args:
        focus: a ``timestep_focus`` value (``texture``, ``structure``, ``"LO,HI"``, ...).
        scheduler: the scheduler, or its ``num_train_timesteps``.

    Example:
        >>> focus_step_range("texture", 1000), focus_step_range("structure", 1000)
        ((0, 399), (600, 999))
    """
    focus = TimestepFocus.parse(focus)
    if focus.range is None:
        return None
    steps = num_train_timesteps(scheduler)
    lo, hi = focus.range
    return min(math.floor(lo * steps), steps - 1), max(math.ceil(hi * steps) - 1, 0)


def draw_scheduler_steps(
    model: torch.nn.Module,
    scheduler: SchedulerLike,
    batch_size: int,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """Scheduler steps for one batch, drawn through ``model.timestep_sampler`` (uniform without one).

    The line a diffusers loss function calls instead of ``torch.randint(0, T, ...)``: inside
    :func:`~lightning_fisher.analyze` the model's sampler is the focused one, so the focus
    reaches the scheduler; outside it every step is equally likely, as in DDPM training.

    Args:
        model: the model being trained or analysed.
        scheduler: the noise scheduler (or its ``num_train_timesteps``).
        batch_size: steps to draw.
        device: where to put them.

    Returns:
        A ``torch.long`` tensor ``[batch_size]`` in ``[0, num_train_timesteps)``.
    """
    sampler = getattr(model, TIMESTEP_SAMPLER_ATTRIBUTE, None) or UniformTimestepSampler()
    return to_scheduler_steps(sampler(batch_size, device), scheduler)


def to_flow_matching(t: torch.Tensor, scheduler: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A flow-matching scheduler's ``(timesteps, sigmas)`` for diffusion time ``t`` in ``[0, 1]``.

    ``timesteps`` is what the model is given, ``sigmas`` the noise level to mix with:
    ``noisy = (1 - sigma) * x + sigma * noise``. Both come from the scheduler's training table
    (the rule in the module docstring), so ``sigma`` grows with ``t`` and ``t`` uniform gives the
    scheduler's uniform training draw.

    Args:
        t: float tensor of times in ``[0, 1]``, ``0`` clean, ``1`` pure noise.
        scheduler: a flow-matching scheduler as built for training: ``timesteps`` and ``sigmas``
            of ``num_train_timesteps`` entries each, from the most noise down.

    Returns:
        Two tensors of the shape of ``t``, on the device of the scheduler's ``timesteps``.

    Raises:
        TypeError: ``scheduler`` has no ``timesteps`` / ``sigmas`` tables.
        ValueError: the tables are not the training ones (``set_timesteps`` for inference changed
            them) or do not run from the most noise down; ``t`` as in :func:`to_scheduler_steps`.
    """
    steps = num_train_timesteps(scheduler)
    timesteps, sigmas = getattr(scheduler, "timesteps", None), getattr(scheduler, "sigmas", None)
    if not isinstance(timesteps, torch.Tensor) or not isinstance(sigmas, torch.Tensor):
        raise TypeError(
            f"scheduler: {type(scheduler).__name__} has no timesteps and sigmas tables; pass a flow-matching scheduler "
            "(diffusers' FlowMatchEulerDiscreteScheduler), or use to_scheduler_steps for a DDPM-style one"
        )
    if len(timesteps) != steps:
        raise ValueError(
            f"scheduler: its table has {len(timesteps)} timesteps, not num_train_timesteps = {steps}: set_timesteps() "
            "set it up for inference; give a copy of the scheduler as built for training"
        )
    if len(sigmas) < steps:
        raise ValueError(f"scheduler: its table has {steps} timesteps but only {len(sigmas)} sigmas")
    if steps > 1 and not bool(sigmas[0] > sigmas[steps - 1]):
        raise ValueError("scheduler: its sigmas must run from the most noise down, as a flow-matching training table does")
    index = steps - 1 - to_scheduler_steps(t, steps)
    # each table indexed on its own device (diffusers keeps the sigmas on the CPU when the timesteps move)
    return timesteps[index.to(timesteps.device)], sigmas[index.to(sigmas.device)].to(timesteps.device)


def draw_flow_matching(
    model: torch.nn.Module, scheduler: Any, batch_size: int, device: Union[torch.device, str, None] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`to_flow_matching` of one batch's times from ``model.timestep_sampler`` (uniform without one).

    The flow-matching counterpart of :func:`draw_scheduler_steps`: the focus of an analysis
    reaches the scheduler, and outside it the draw is the scheduler's own uniform one.

    Returns:
        ``(timesteps, sigmas)``, each ``[batch_size]``, on ``device`` (default: the device of ``timesteps``).
    """
    sampler = getattr(model, TIMESTEP_SAMPLER_ATTRIBUTE, None) or UniformTimestepSampler()
    timesteps, sigmas = to_flow_matching(sampler(batch_size, None), scheduler)
    return (timesteps, sigmas) if device is None else (timesteps.to(device), sigmas.to(device))
