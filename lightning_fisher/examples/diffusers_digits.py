"""A diffusers UNet on handwritten digits: analyse, apply the map with ``add_adapter``, save and load the LoRA.

The whole program, as a diffusers user writes it, on a model small enough for a CPU:

1. a random-initialised ``UNet2DConditionModel`` (two blocks, cross-attention on the digit's
   one-hot label) is "pretrained" for a few steps on digits 0-4 with DDPM's noise-prediction
   loss, ``mse(unet(add_noise(x, noise, step), step, label).sample, noise)``, and a
   ``DDPMScheduler``;
2. :func:`~lightning_fisher.analyze` measures it on digits 5-9 with the same loss and a
   ``timestep_focus``: the loss draws its steps through
   :func:`~lightning_fisher.analysis.scheduler_steps.draw_scheduler_steps`, which turns the
   focused ``t`` in ``[0, 1]`` into the scheduler's steps (``texture``: steps 0-399 of 1000);
3. ``unet.add_adapter(lora_config_from_fisher_map(...))`` (diffusers' ``PeftAdapterMixin``)
   injects the map's ranks and alphas, and a few AdamW steps fine-tune the adapters;
4. ``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes the LoRA as a pipeline does
   (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``, the
   ``LoraConfig`` in the file's metadata), and ``lora_state_dict`` + ``load_lora_into_unet``
   load it into a fresh copy of the base model, where every module's rank and alpha are
   checked against the map.

What diffusers' loader needs: keys ``unet.`` + the module's name in the UNet (the name the map
uses, since the UNet itself was analysed) + ``.lora_A.weight`` / ``.lora_B.weight``. Without
the metadata it infers each rank from ``lora_B``'s shape (ranks survive) but sets every alpha
to its rank (scale 1; diffusers 0.42), dropping the map's alphas; with the metadata (written here, and by
``unet.save_lora_adapter``) it rebuilds the map's ``LoraConfig`` exactly.

Data: scikit-learn's 8x8 digits (:mod:`lightning_fisher.examples.digits_flow.data`), upsampled
to 16x16, in ``[-1, 1]``.

Usage::

    python -m lightning_fisher.examples.diffusers_digits OUT_DIR [--focus texture] [--steps 12]

writes ``OUT_DIR/fisher_map.json``, ``OUT_DIR/base/`` (the pretrained UNet, ``save_pretrained``),
``OUT_DIR/lora/pytorch_lora_weights.safetensors`` and ``OUT_DIR/record.json`` (what was checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = [
    "ADAPTER_NAME",
    "NoisePredictionLoss",
    "digit_batches",
    "held_out_loss",
    "lora_layout",
    "main",
    "make_scheduler",
    "make_unet",
    "pretrain_analyse_adapt_reload",
    "run",
    "train_steps",
]

IMAGE_SIZE = 16
NUM_TRAIN_TIMESTEPS = 1000
ADAPTER_NAME = "digits"


def make_unet() -> nn.Module:
    """A tiny random-initialised ``UNet2DConditionModel`` (about 250k parameters; seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=10,  # the condition is the digit's one-hot label, one token
        attention_head_dim=8,
        norm_num_groups=8,
    )


def make_scheduler() -> Any:
    """DDPM's noise schedule with 1000 training steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)


def digit_batches(half: str, split: str = "train", batch_size: int = 16, samples: Optional[int] = None) -> list:
    """Batches ``(images [B, 1, 16, 16] in [-1, 1], labels one-hot [B, 1, 10])`` of one half of the digits.

    Args:
        half: ``"low"`` (digits 0-4) or ``"high"`` (digits 5-9).
        split: ``"train"`` or ``"test"``.
        batch_size: samples per batch.
        samples: keep the first this many (``None``: all).
    """
    from lightning_fisher.examples.digits_flow.data import digits_split

    images, labels = digits_split(half).split(split)
    if samples is not None:
        images, labels = images[:samples], labels[:samples]
    images = nn.functional.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    condition = nn.functional.one_hot(labels, 10).float().unsqueeze(1)
    return [(images[i : i + batch_size], condition[i : i + batch_size]) for i in range(0, len(labels), batch_size)]


class NoisePredictionLoss:
    """DDPM's loss, the batch's mean: the same function pretrains, analyses and fine-tunes.

    The steps come from :func:`~lightning_fisher.analysis.scheduler_steps.draw_scheduler_steps`
    (the model's focused ``timestep_sampler`` inside ``analyze``, uniform outside); the first
    and last step drawn since :meth:`reset` are kept in ``drawn``.

    Args:
        scheduler: the noise scheduler (``add_noise``, ``config.num_train_timesteps``).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.drawn: Optional[tuple[int, int]] = None

    def reset(self) -> None:
        """Forget the steps drawn so far."""
        self.drawn = None

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        from lightning_fisher.analysis.scheduler_steps import draw_scheduler_steps

        images, condition = batch
        noise = torch.randn_like(images)
        steps = draw_scheduler_steps(model, self.scheduler, images.shape[0], images.device)
        low, high = int(steps.min()), int(steps.max())
        if self.drawn is not None:
            low, high = min(low, self.drawn[0]), max(high, self.drawn[1])
        self.drawn = (low, high)
        noisy = self.scheduler.add_noise(images, noise, steps)
        return nn.functional.mse_loss(model(noisy, steps, encoder_hidden_states=condition).sample, noise)


def train_steps(model: nn.Module, loss_fn: NoisePredictionLoss, batches: list, steps: int, lr: float = 3e-3) -> list:
    """A few AdamW steps over ``batches`` (cycled) on every trainable parameter; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def held_out_loss(model: nn.Module, loss_fn: NoisePredictionLoss, batches: list, seed: int = 1234) -> float:
    """The mean loss on ``batches`` with fixed noise and steps (comparable before and after a fit)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            return sum(float(loss_fn(model, batch)) for batch in batches) / len(batches)
    finally:
        torch.random.set_rng_state(state)


def lora_layout(model: nn.Module, adapter_name: str) -> dict[str, tuple[int, float]]:
    """``{module name: (rank, scale)}`` of the LoRA adapter ``adapter_name`` injected in ``model``."""
    layout = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter_name in lora_a:
            layout[name] = (int(lora_a[adapter_name].weight.shape[0]), float(module.scaling[adapter_name]))
    return layout


def pretrain_analyse_adapt_reload(
    model: nn.Module, loss_fn: Any, out: Path, save_lora: Callable[[nn.Module, Path], None],
    load_lora: Callable[[Path], nn.Module], *, focus: str, pretrain_steps: int, steps: int, max_batches: int,
    **analyze_options: Any,
) -> tuple[Any, dict]:
    """Steps 1-4 of the module docstring, the same for every diffusers model: only saving and loading differ.

    Runs on one intra-op thread (the models are tiny; on a busy machine more threads only wait on
    each other: :func:`~lightning_fisher.examples.digits_flow.model.single_threaded`).

    Args:
        model: the random-initialised model; ``loss_fn(model, batch)`` its loss, with ``reset()`` and
            ``drawn`` (the range of steps or sigmas drawn since the reset).
        out: folder for ``base/`` (the pretrained model), the map and ``lora/``.
        save_lora: ``save_lora(model, folder)`` writes the adapter as the model's pipeline does.
        load_lora: ``load_lora(folder)`` is a fresh copy of ``out / "base"`` with that adapter loaded.
        focus, pretrain_steps, steps, max_batches: as in :func:`run`.
        analyze_options: more options for :func:`~lightning_fisher.analyze` (``rank_max``, ``exclude``).

    Returns:
        The map and the record's common part (``analysis_drawn``: what the loss drew during the analysis).
    """
    from safetensors import safe_open

    from lightning_fisher import UniformTimestepSampler, analyze, lora_config_from_fisher_map, verify_adapter_ranks
    from lightning_fisher.examples.digits_flow.model import single_threaded

    with single_threaded():
        pretrain_losses = train_steps(model, loss_fn, digit_batches("low", samples=256), pretrain_steps)
        model.save_pretrained(out / "base")

        before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        loss_fn.reset()
        fisher_map = analyze(
            model, digit_batches("high", samples=256), loss_fn, output=out, timestep_sampler=UniformTimestepSampler(),
            timestep_focus=focus, rank=4, rank_min=1, max_batches=max_batches, **analyze_options,
        )
        analysis_drawn = loss_fn.drawn
        base_change = max(float((before[k] - v).abs().max()) for k, v in model.state_dict().items())

        model.requires_grad_(False)
        model.add_adapter(lora_config_from_fisher_map(fisher_map), adapter_name=ADAPTER_NAME)
        verify_adapter_ranks(model, fisher_map, adapter_name=ADAPTER_NAME)
        test = digit_batches("high", "test", samples=64)
        loss_before = held_out_loss(model, loss_fn, test)
        fit_losses = train_steps(model, loss_fn, digit_batches("high", samples=256), steps, lr=1e-2)
        loss_after = held_out_loss(model, loss_fn, test)

        save_lora(model, out / "lora")
        with safe_open(out / "lora" / "pytorch_lora_weights.safetensors", framework="pt") as handle:
            file_keys = sorted(handle.keys())
        fresh = load_lora(out / "lora")
        loaded_ranks = verify_adapter_ranks(fresh, fisher_map, adapter_name=ADAPTER_NAME)
        fresh.eval()
        same_output = held_out_loss(fresh, loss_fn, test) == loss_after

    return fisher_map, {
        "focus": focus,
        "analysis_drawn": analysis_drawn,
        "base_change_by_analysis": base_change,
        "ranks": fisher_map.ranks,
        "alphas": fisher_map.alphas,
        "trained": {name: list(value) for name, value in lora_layout(model, ADAPTER_NAME).items()},
        "loaded": {name: list(value) for name, value in lora_layout(fresh, ADAPTER_NAME).items()},
        "loaded_ranks": loaded_ranks,
        "lora_file_keys": file_keys,
        "pretrain_losses": pretrain_losses,
        "fit_losses": fit_losses,
        "held_out_loss": [loss_before, loss_after],
        "reloaded_output_identical": same_output,
    }


def run(out: Path, focus: str = "texture", pretrain_steps: int = 30, steps: int = 12, max_batches: int = 12) -> dict:
    """Pretrain, analyse, apply the map with ``add_adapter``, fine-tune, save and reload the LoRA; the record.

    Args:
        out: folder for the map, the base model, the LoRA file and ``record.json``.
        focus: the analysis's ``timestep_focus``.
        pretrain_steps: AdamW steps on digits 0-4 before the analysis.
        steps: fine-tuning steps of the adapters on digits 5-9.
        max_batches: analysis batches at most.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from peft.utils import get_peft_model_state_dict

    from lightning_fisher.analysis.scheduler_steps import focus_step_range, to_scheduler_steps

    out = Path(out)

    def save_lora(unet: nn.Module, folder: Path) -> None:  # as a Stable Diffusion pipeline saves it
        Loader.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME),
                                 unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict())

    def load_lora(folder: Path) -> nn.Module:
        fresh = UNet2DConditionModel.from_pretrained(out / "base")
        state_dict, network_alphas, metadata = Loader.lora_state_dict(folder, return_lora_metadata=True)
        Loader.load_lora_into_unet(state_dict, network_alphas, fresh, adapter_name=ADAPTER_NAME, metadata=metadata)
        return fresh

    scheduler = make_scheduler()
    fisher_map, record = pretrain_analyse_adapt_reload(
        make_unet(), NoisePredictionLoss(scheduler), out, save_lora, load_lora, focus=focus,
        pretrain_steps=pretrain_steps, steps=steps, max_batches=max_batches, rank_max=16,
    )
    observed = fisher_map.analysis.timestep_focus.observed_range  # in t; as scheduler steps below
    record["focus_steps"] = focus_step_range(focus, scheduler)
    record["analysis_steps"] = record.pop("analysis_drawn")
    record["observed_steps"] = None if observed is None else to_scheduler_steps(torch.tensor(observed), scheduler).tolist()
    (out / "record.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv: Optional[list[str]] = None) -> dict:
    """The command line (the module docstring's usage); prints one line and returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the map, the base model, the LoRA and record.json")
    parser.add_argument("--focus", default="texture", help="timestep_focus: balanced, texture, structure or LO,HI")
    parser.add_argument("--pretrain-steps", type=int, default=30, help="pretraining steps on digits 0-4")
    parser.add_argument("--steps", type=int, default=12, help="fine-tuning steps on digits 5-9")
    args = parser.parse_args(argv)
    record = run(args.out, focus=args.focus, pretrain_steps=args.pretrain_steps, steps=args.steps)
    loss_before, loss_after = record["held_out_loss"]
    print(
        f"focus {record['focus']}: scheduler steps {record['analysis_steps']}; "
        f"{len(record['loaded_ranks'])} adapters reloaded with the map's ranks; "
        f"held-out loss {loss_before:.4f} -> {loss_after:.4f}"
    )
    return record


if __name__ == "__main__":
    main()
