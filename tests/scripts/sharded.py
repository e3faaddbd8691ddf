"""Analyse and fit under FSDP2 (Lightning's ModelParallelStrategy, 2 CPU processes, gloo); write what each rank saw.

Usage: python sharded.py OUT_DIR
One launch runs three fits: the analysis with the ``trace`` criterion, the analysis with the
``spectrum`` criterion, and an ``AdaptiveLoRA`` fit with the trace map. Lightning's strategy
relaunches this script once for the second process; later Trainers in the same processes reuse
its process group. Each rank reads its half of the data through the shuffling
``DistributedSampler`` Lightning puts in a training loader. :func:`Task.configure_model` shards every Linear with
``fully_shard`` and wraps one layer in a (non-reentrant) activation-checkpoint wrapper, as
FSDP2 recipes do.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import AdaptiveLoRA, AllocationSettings, analyze
from lightning_fisher.peft_factory import adapter_ranks

SAMPLES, BATCH = 96, 8  # per rank: 48 samples, 6 batches


def data() -> TensorDataset:
    x = torch.randn(SAMPLES, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())


class Task(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.to(torch.float64)

    def configure_model(self):
        if self.device_mesh is None:  # one process: nothing to shard
            return
        layer = self.encoder[2]
        apply_activation_checkpointing(self.encoder, check_fn=lambda module: module is layer)
        mesh = self.device_mesh["data_parallel"]
        for module in (self.encoder[0], self.encoder[2], self.encoder, self.head):
            fully_shard(module, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.encoder(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def strategy():
    return dict(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))


def full(tensor):
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().flatten().tolist()


def main() -> None:
    out = Path(sys.argv[1])
    loader = DataLoader(data(), batch_size=BATCH, shuffle=False)
    stop = dict(convergence_patience=10_000, min_batches=0, max_batches=None)
    record = {}
    for criterion in ("trace", "spectrum"):
        allocation = AllocationSettings(rank=4, rank_min=1, rank_max=16, criterion=criterion)
        task = Task()
        fisher_map = analyze(task, loader, output=out / criterion, allocation=allocation,
                             trainer_kwargs=strategy(), **stop)
        record[criterion] = {
            "analysed": {"sharded": sorted(name for name, p in task.named_parameters() if isinstance(p, DTensor))},
            "scores": fisher_map.scores,
            "ranks": fisher_map.ranks,
            "samples": fisher_map.analysis.samples,
            "batches": fisher_map.analysis.batches,
            "world_size": fisher_map.analysis.world_size,
            "fingerprint": fisher_map.model.fingerprint,
            "sigma_sq": {m.name: m.sigma_sq for m in fisher_map.modules},
            "floors": {m.name: m.noise_floor for m in fisher_map.modules},
        }
    task = Task()
    callback = AdaptiveLoRA(fisher_map=out / "trace", adapter_root="encoder", export_dir=out / "adapter",
                            lora_kwargs={"lora_dropout": 0.0, "init_lora_weights": "gaussian"},
                            lr_warning_threshold=1.0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], **strategy())
    trainer.fit(task, DataLoader(data(), batch_size=BATCH))
    probe = torch.linspace(-1, 1, 18, dtype=torch.float64).reshape(3, 6)
    with torch.no_grad():
        output = task.encoder(probe)
    record["fit"] = {
        "steps": trainer.global_step,
        "adapter_ranks": adapter_ranks(task.encoder),
        "sharded": sorted(name for name, p in task.named_parameters() if isinstance(p, DTensor)),
        "trainable": {name: full(p) for name, p in task.encoder.named_parameters() if p.requires_grad},
        "output": output.flatten().tolist(),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
