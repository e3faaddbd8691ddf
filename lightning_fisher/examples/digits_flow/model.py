"""The digits flow-matching model: a small transformer-style velocity model over 2x2 patches.

:class:`DigitsFlowMatching` works on the 16 patch tokens of 2x2 pixels of an 8x8 image. Its
attention uses separate ``q``/``k``/``v``/``out`` ``nn.Linear`` layers and its MLP two
``nn.Linear`` layers, so LoRA can target each of them by name (``blocks.0.attn.q``,
``blocks.0.mlp.fc1``, ...).

Flow convention (as :mod:`lightning_fisher.analysis.timesteps`): ``t = 0`` is clean data, ``t = 1``
pure noise, ``x_t = (1 - t) * x0 + t * noise``, and the model predicts the velocity
``noise - x0``. Training timesteps come from ``self.timestep_sampler(batch_size, device)``,
so the Fisher analysis can focus them.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fisher.analysis.timesteps import LogitNormalTimestepSampler, TimestepSampler, UniformTimestepSampler

__all__ = ["CHECKPOINT_NAME", "DigitsFlowMatching", "denoising_loss", "held_out_denoising_loss", "single_threaded"]

PATCH = 2
IMAGE = 8
NUM_TOKENS = (IMAGE // PATCH) ** 2
TOKEN_DIM = PATCH * PATCH
#: File name of a pretrained checkpoint inside a ``checkpoint_dir``.
CHECKPOINT_NAME = "digits_flow.pt"


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block, then restore the previous count.

    This model's matrices are tiny (64 wide, 16 tokens): extra threads only add synchronisation,
    and on a busy machine their spin-waiting made a training step 20x slower in our measurements.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _timestep_sampler(name: str) -> TimestepSampler:
    if name == "uniform":
        return UniformTimestepSampler()
    if name == "logit_normal":
        return LogitNormalTimestepSampler()
    raise ValueError(f"timestep_distribution must be 'uniform' or 'logit_normal', got {name!r}")


def _patchify(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 8, 8]`` -> ``[B, 16, 4]``: row-major 2x2 patches."""
    b = x.shape[0]
    g = IMAGE // PATCH
    return x.reshape(b, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(b, g * g, TOKEN_DIM)


def _unpatchify(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_patchify`."""
    b = tokens.shape[0]
    g = IMAGE // PATCH
    return tokens.reshape(b, g, g, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, 1, IMAGE, IMAGE)


def _sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` in ``[0, 1]``, ``[B] -> [B, dim]``."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float().unsqueeze(-1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``out`` projections."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(attended.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; the timestep embedding is added before each block."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio * width)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = x + condition
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def denoising_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, labels=None) -> torch.Tensor:
    """Rectified-flow loss: MSE between ``model(x_t, t)`` and ``noise - x0``, mean over all elements.

    Every sample has the same number of elements, so this is also the mean over samples of
    per-sample mean losses (what the Fisher analysis assumes of a batch loss).
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x_t = (1.0 - t.reshape(shape)) * x0 + t.reshape(shape) * noise
    return F.mse_loss(model(x_t, t, labels), noise - x0)


class DigitsFlowMatching(pl.LightningModule):
    """Rectified-flow velocity model for 8x8 digits: a small transformer over 2x2 patches.

    Batches are dicts with ``x`` (float32 ``[B, 1, 8, 8]`` in ``[-1, 1]``) and ``label``
    (int64 ``[B]``, used only with ``label_conditioning``), as written by
    :func:`write_digits_dataset`.

    ``self.timestep_sampler`` is the sampler :meth:`training_step` draws ``t`` from (protocol
    of :mod:`lightning_fisher.analysis.timesteps`); noise comes from ``torch.randn`` on the global
    generator. Validation and test losses use timesteps and noise from a generator seeded per
    batch (``eval_seed + batch_idx``), so held-out losses are comparable across runs.

    Args:
        width: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        label_conditioning: add a learned embedding of the digit label (off by default).
        timestep_distribution: ``"uniform"`` (:class:`UniformTimestepSampler`) or
            ``"logit_normal"`` (:class:`LogitNormalTimestepSampler`).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        eval_seed: base seed of the fixed validation / test timesteps and noise.
        checkpoint_dir: a folder holding ``digits_flow.pt`` from :func:`pretrain_digits_flow`
            (the command line's ``--checkpoint-dir``); its weights are loaded after building
            the model, so the architecture arguments must match the checkpoint's.
    """

    def __init__(
        self,
        width: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: int = 2,
        label_conditioning: bool = False,
        timestep_distribution: Literal["uniform", "logit_normal"] = "uniform",
        learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        eval_seed: int = 1234,
        checkpoint_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.timestep_sampler = _timestep_sampler(timestep_distribution)
        self.patch_embed = nn.Linear(TOKEN_DIM, width)
        self.pos_embed = nn.Parameter(torch.randn(1, NUM_TOKENS, width) * 0.02)
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label_embed = nn.Embedding(10, width) if label_conditioning else None
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, TOKEN_DIM)
        if checkpoint_dir is not None:
            self._load_pretrained(Path(checkpoint_dir) / CHECKPOINT_NAME)

    def _load_pretrained(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint_dir: {path} does not exist; write it with "
                "lightning_fisher.examples.digits_flow.pretrain_digits_flow(path) or "
                "`lightning-fisher demo --task digits --prepare-only`"
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        architecture = ("width", "depth", "heads", "mlp_ratio", "label_conditioning")
        different = {k: (checkpoint["hparams"][k], self.hparams[k]) for k in architecture if checkpoint["hparams"][k] != self.hparams[k]}
        if different:
            raise ValueError(f"checkpoint_dir: {path} was trained with other architecture settings {different} (checkpoint, here)")
        self.load_state_dict(checkpoint["state_dict"])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predicted velocity ``[B, 1, 8, 8]`` at noisy images ``x_t`` and times ``t`` ``[B]``."""
        condition = self.time_embed(_sinusoidal(t, self.hparams.width).to(x_t.dtype))
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("DigitsFlowMatching(label_conditioning=True) needs the batch's 'label'")
            condition = condition + self.label_embed(labels)
        condition = condition.unsqueeze(1)
        tokens = self.patch_embed(_patchify(x_t)) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens, condition)
        return _unpatchify(self.output(self.norm(tokens)))

    def _labels(self, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        return batch.get("label") if self.label_embed is not None else None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0 = batch["x"]
        t = self.timestep_sampler(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        loss = denoising_loss(self, x0, t, noise, self._labels(batch))
        self.log("train_loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def _fixed_loss(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0 = batch["x"]
        # Drawn on the CPU so the same seed gives the same numbers on every device.
        generator = torch.Generator().manual_seed(self.hparams.eval_seed + batch_idx)
        t = torch.rand(x0.shape[0], generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        return denoising_loss(self, x0, t, noise, self._labels(batch))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._fixed_loss(batch, batch_idx)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["x"].shape[0], sync_dist=True)
        return loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._fixed_loss(batch, batch_idx)
        self.log("test_loss", loss, batch_size=batch["x"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        # Read requires_grad now: LoRA injection freezes the base weights after __init__.
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DigitsFlowMatching has no parameter with requires_grad=True to optimize.")
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    def sample(self, num_samples: int, *, steps: int = 32, labels: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Generate images by Euler integration from ``t = 1`` (noise) to ``t = 0``."""
        x = torch.randn((num_samples, 1, IMAGE, IMAGE), generator=generator).to(self.device)
        times = torch.linspace(1.0, 0.0, steps + 1, device=self.device)
        for t_now, t_next in zip(times[:-1], times[1:]):
            velocity = self(x, t_now.expand(num_samples), labels)
            x = x + (t_next - t_now) * velocity
        return x


@torch.no_grad()
def held_out_denoising_loss(
    model: DigitsFlowMatching, images: torch.Tensor, *, batch_size: int = 256, seed: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
) -> float:
    """Mean denoising loss over ``images`` with fixed timesteps and noise, without a Trainer.

    Uses the same per-batch seeding as :meth:`DigitsFlowMatching.validation_step` (batch ``i``
    seeded with ``seed + i``; default ``model.hparams.eval_seed``), weighted by batch size.
    """
    was_training = model.training
    model.eval()
    base = model.hparams.eval_seed if seed is None else seed
    total, count = 0.0, 0
    try:
        for index, start in enumerate(range(0, len(images), batch_size)):
            x0 = images[start : start + batch_size].to(model.device)
            batch = {"x": x0}
            if labels is not None:
                batch["label"] = labels[start : start + batch_size].to(model.device)
            generator = torch.Generator().manual_seed(base + index)
            t = torch.rand(x0.shape[0], generator=generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            loss = denoising_loss(model, x0, t, noise, model._labels(batch))
            total += float(loss) * x0.shape[0]
            count += x0.shape[0]
    finally:
        model.train(was_training)
    return total / count
