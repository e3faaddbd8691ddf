"""Fit with AdaptiveLoRA under real DDP (gloo, CPU) or in one process; write what each rank holds.

Usage: python ddp_fit.py {ddp,single} MAP_FILE OUT_DIR
Under DDP each of the 2 ranks takes 8 samples per step (rank r: samples r, r+2, ...); the single
process takes the same 16 samples in one batch, so with a mean loss and plain SGD both runs take
the same steps (the order is fixed here, not left to Lightning's shuffling distributed sampler).
Lightning's DDP strategy relaunches this script once per extra process.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ddp_analysis import Task as AnalysisTask

from lightning_fisher import AdaptiveLoRA
from lightning_fisher.peft_factory import adapter_ranks


class Task(AnalysisTask):
    """The analysis script's model, trained with plain SGD (so both runs' steps compare exactly)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class SeedAdapterInit(pl.Callback):
    """Seed right before AdaptiveLoRA injects (its ``setup`` runs next), so both modes draw the same init."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(0)


class Data(pl.LightningDataModule):
    """96 samples, 16 per optimizer step split over the ranks, in a fixed order."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(96, 6, generator=generator, dtype=torch.float64)
        self.dataset = TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=16 // world, sampler=sampler)


def main() -> None:
    mode, map_file, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.manual_seed(0)
    task = Task()
    devices = dict(devices=2, strategy="ddp") if mode == "ddp" else dict(devices=1)
    callback = AdaptiveLoRA(fisher_map=map_file, adapter_root="encoder", export_dir=out / "adapter",
                            lora_kwargs={"lora_dropout": 0.0, "init_lora_weights": "gaussian"},
                            lr_warning_threshold=1.0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[SeedAdapterInit(), callback], **devices)
    trainer.fit(task, datamodule=Data())
    rank = trainer.global_rank
    record = {
        "rank": rank,
        "world_size": trainer.world_size,
        "steps": trainer.global_step,
        "adapter_ranks": adapter_ranks(task.encoder),
        "trainable": {name: p.detach().flatten().tolist() for name, p in task.named_parameters() if p.requires_grad},
        "frozen": {name: p.detach().flatten().tolist() for name, p in task.named_parameters() if not p.requires_grad},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
