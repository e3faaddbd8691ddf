"""Run an analysis under real DDP (gloo, CPU) or in one process; write what each rank saw.

Usage: python ddp_analysis.py {ddp,single} OUT_DIR [--stability] [--spectrum]
Lightning's DDP strategy relaunches this script once per extra process.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import AllocationSettings, analyze


class Task(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.to(torch.float64)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.encoder(x)), y)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    stability = "--stability" in sys.argv
    torch.manual_seed(0)
    task = Task()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    trainer_kwargs = dict(accelerator="cpu", enable_progress_bar=False)
    trainer_kwargs.update(dict(devices=2, strategy="ddp") if mode == "ddp" else dict(devices=1))
    stop = dict(convergence_patience=2, min_batches=2, stability_threshold=0.5) if stability else dict(
        convergence_patience=10_000, min_batches=0, max_batches=None
    )
    criterion = "spectrum" if "--spectrum" in sys.argv else "trace"
    allocation = AllocationSettings(rank=4, rank_min=1, rank_max=16, criterion=criterion)
    fisher_map = analyze(task, data, output=out, allocation=allocation, trainer_kwargs=trainer_kwargs, **stop)
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    record = {
        "rank": rank,
        "scores": fisher_map.scores,
        "ranks": fisher_map.ranks,
        "batches": fisher_map.analysis.batches,
        "samples": fisher_map.analysis.samples,
        "stop_reason": fisher_map.analysis.stop_reason,
        "world_size": fisher_map.analysis.world_size,
        "history": list(fisher_map.analysis.stability.history),
        "method": fisher_map.analysis.stability.method,
        "sigma_sq": {m.name: m.sigma_sq for m in fisher_map.modules},
        "floors": {m.name: m.noise_floor for m in fisher_map.modules},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
