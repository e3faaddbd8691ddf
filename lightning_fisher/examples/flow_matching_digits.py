"""A diffusers SD3 transformer on handwritten digits, flow matching: analyse, ``add_adapter``, save and load the LoRA.

The flow-matching counterpart of :mod:`~lightning_fisher.examples.diffusers_digits`, written as an
SD3 / Flux user writes it, on a model small enough for a CPU:

1. a random-initialised ``SD3Transformer2DModel`` (2 joint blocks, 2 heads of 8; the digit's
   one-hot label is both the text tokens and the pooled text projection) is "pretrained" for a
   few steps on digits 0-4 with the rectified-flow loss,
   ``mse(transformer((1 - sigma) x + sigma noise, timestep, label).sample, noise - x)``, and a
   ``FlowMatchEulerDiscreteScheduler(shift=3.0)``;
2. :func:`~lightning_fisher.analyze` measures it on digits 5-9 with the same loss and a
   ``timestep_focus``: the loss draws its ``(timesteps, sigmas)`` through
   :func:`~lightning_fisher.analysis.scheduler_steps.draw_flow_matching`, which reads the
   focused ``t`` in ``[0, 1]`` from the scheduler's training table (``texture``: the 40 % of the
   table with the least noise, every sigma below 0.67 at ``shift=3``);
3. ``transformer.add_adapter(lora_config_from_fisher_map(...))`` injects the map's ranks and
   alphas, and a few AdamW steps fine-tune the adapters;
4. ``SD3LoraLoaderMixin.save_lora_weights`` writes the LoRA as an SD3 pipeline does, and
   ``lora_state_dict`` + ``load_lora_into_transformer`` load it into a fresh copy of the base
   model, where every module's rank and alpha are checked against the map.

What diffusers' SD3 loader needs (diffusers 0.42, measured by the tests): keys ``transformer.``
+ the module's name in the transformer (the map's name) + ``.lora_A.weight`` /
``.lora_B.weight``, in ``pytorch_lora_weights.safetensors``; ``save_lora_weights`` takes
``transformer_lora_layers=`` and ``transformer_lora_adapter_metadata=`` (the ``LoraConfig``'s
dict), ``lora_state_dict(..., return_lora_metadata=True)`` returns ``(state_dict, metadata)``
(no network alphas, unlike the UNet loader's triple) and ``load_lora_into_transformer`` takes
``metadata=``. The model's own ``load_lora_adapter`` defaults to ``prefix="transformer"``, so it
reads this file as it is. One module must not get an adapter: SD3's last block is
``context_pre_only`` (the text tokens' output is dropped), so its ``attn.add_q_proj`` feeds
nothing, gets no gradient and is excluded (:func:`unused_modules`).

Data: scikit-learn's 8x8 digits upsampled to 16x16 in ``[-1, 1]``
(:func:`~lightning_fisher.examples.diffusers_digits.digit_batches`).

Usage::

    python -m lightning_fisher.examples.flow_matching_digits OUT_DIR [--focus texture] [--steps 12]

writes ``OUT_DIR/fisher_map.json``, ``OUT_DIR/base/`` (the pretrained transformer,
``save_pretrained``), ``OUT_DIR/lora/pytorch_lora_weights.safetensors`` and
``OUT_DIR/record.json`` (what was checked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lightning_fisher.examples.diffusers_digits import ADAPTER_NAME, IMAGE_SIZE, pretrain_analyse_adapt_reload

__all__ = ["ADAPTER_NAME", "RectifiedFlowLoss", "main", "make_scheduler", "make_transformer", "run", "unused_modules"]

def make_transformer() -> nn.Module:
    """A tiny random-initialised ``SD3Transformer2DModel`` (about 22k parameters; seeded)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=10,  # the text tokens: the digit's one-hot label, one token
        pooled_projection_dim=10,  # the pooled text embedding: the same one-hot label
        caption_projection_dim=16,
        pos_embed_max_size=IMAGE_SIZE,
    )


def unused_modules(transformer: nn.Module) -> list[str]:
    """The ``attn.add_q_proj`` of each ``context_pre_only`` block: its text queries feed no output."""
    return [f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(transformer.transformer_blocks)
            if block.context_pre_only]


def make_scheduler() -> Any:
    """SD3's flow-matching scheduler: 1000 training timesteps, ``shift=3.0``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


class RectifiedFlowLoss:
    """The rectified-flow loss, the batch's mean: the same function pretrains, analyses and fine-tunes.

    ``(timesteps, sigmas)`` come from :func:`~lightning_fisher.analysis.scheduler_steps.draw_flow_matching`
    (the model's focused ``timestep_sampler`` inside ``analyze``, the scheduler's uniform draw
    outside); the lowest and highest sigma drawn since :meth:`reset` are kept in ``drawn``.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` as built for training.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.drawn: Optional[tuple[float, float]] = None

    def reset(self) -> None:
        """Forget the sigmas drawn so far."""
        self.drawn = None

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        from lightning_fisher.analysis.scheduler_steps import draw_flow_matching

        images, condition = batch
        noise = torch.randn_like(images)
        timesteps, sigmas = draw_flow_matching(model, self.scheduler, images.shape[0], images.device)
        low, high = float(sigmas.min()), float(sigmas.max())
        if self.drawn is not None:
            low, high = min(low, self.drawn[0]), max(high, self.drawn[1])
        self.drawn = (low, high)
        sigma = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - sigma) * images + sigma * noise
        prediction = model(
            noisy, encoder_hidden_states=condition, pooled_projections=condition[:, 0], timestep=timesteps
        )
        return nn.functional.mse_loss(prediction.sample, noise - images)


def run(out: Path, focus: str = "texture", pretrain_steps: int = 30, steps: int = 12, max_batches: int = 12) -> dict:
    """Pretrain, analyse, apply the map with ``add_adapter``, fine-tune, save and reload the LoRA; the record.

    The steps are :func:`~lightning_fisher.examples.diffusers_digits.pretrain_analyse_adapt_reload`'s,
    with the SD3 loader's saving and loading.

    Args:
        out: folder for the map, the base model, the LoRA file and ``record.json``.
        focus: the analysis's ``timestep_focus``.
        pretrain_steps: AdamW steps on digits 0-4 before the analysis.
        steps: fine-tuning steps of the adapters on digits 5-9.
        max_batches: analysis batches at most.
    """
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders import SD3LoraLoaderMixin as Loader
    from peft.utils import get_peft_model_state_dict

    from lightning_fisher.analysis.scheduler_steps import to_flow_matching

    out = Path(out)

    def save_lora(transformer: nn.Module, folder: Path) -> None:  # as an SD3 pipeline saves it
        Loader.save_lora_weights(
            folder, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME),
            transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER_NAME].to_dict())

    def load_lora(folder: Path) -> nn.Module:
        fresh = SD3Transformer2DModel.from_pretrained(out / "base")
        state_dict, metadata = Loader.lora_state_dict(folder, return_lora_metadata=True)  # no network alphas here
        Loader.load_lora_into_transformer(state_dict, fresh, adapter_name=ADAPTER_NAME, metadata=metadata)
        return fresh

    scheduler = make_scheduler()
    transformer = make_transformer()
    exclude = unused_modules(transformer)
    fisher_map, record = pretrain_analyse_adapt_reload(
        transformer, RectifiedFlowLoss(scheduler), out, save_lora, load_lora, focus=focus,
        pretrain_steps=pretrain_steps, steps=steps, max_batches=max_batches, rank_max=12, exclude=exclude,
    )
    observed = fisher_map.analysis.timestep_focus.observed_range  # in t; as sigmas below
    record["analysis_sigmas"] = record.pop("analysis_drawn")
    record["observed_sigmas"] = None if observed is None else to_flow_matching(torch.tensor(observed), scheduler)[1].tolist()
    record["exclude"] = exclude
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
    low, high = record["analysis_sigmas"]
    print(
        f"focus {record['focus']}: sigmas {low:.3f}-{high:.3f}; "
        f"{len(record['loaded_ranks'])} adapters reloaded with the map's ranks; "
        f"held-out loss {loss_before:.4f} -> {loss_after:.4f}"
    )
    return record


if __name__ == "__main__":
    main()
