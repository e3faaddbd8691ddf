"""A Lightning Fabric fine-tuning loop that analyses, applies the map with PEFT and trains.

The whole program, as a Fabric user writes it: ``fabric.launch()`` starts the processes (DDP on
gloo with ``--devices 2`` on CPU), :func:`~lightning_fisher.analyze` measures the pretrained
model on the shared-out training batches with the loop's own loss (``loss_fn``; no
LightningModule, no Trainer), ``peft.get_peft_model`` injects the map's ranks, and a few AdamW
steps train the adapters under ``fabric.setup``. Every process returns the same map (the sums
are all-reduced after every batch); only rank 0 writes it. Analyse before ``fabric.setup``
wraps the model: DDP cannot wrap the frozen model the analysis runs on.

The task is small and made up so that it runs in seconds on a CPU: a "pretrained" MLP (trained
for a few steps on one teacher) fine-tuned on a second teacher's targets.

Usage::

    python -m lightning_fisher.examples.fabric_finetune OUT_DIR [--devices 2] [--steps 6] [--whole-data]

writes ``OUT_DIR/fisher_map.json`` (rank 0) and ``OUT_DIR/rank<R>.json`` (what each process
saw: scores, ranks, the trained adapters' ranks, the losses).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["main", "make_data", "make_model", "mse_loss", "run"]

FEATURES, HIDDEN, OUTPUTS = 8, 32, 4


def make_model() -> nn.Module:
    """The "pretrained" model: an MLP fitted for a few steps to a first teacher (seeded: the same everywhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUTPUTS)
    ).double()
    teacher = nn.Linear(FEATURES, OUTPUTS).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256, FEATURES, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model


def make_data(samples: int = 96, batch_size: int = 8) -> DataLoader:
    """The fine-tuning data: a second teacher's targets (sequential order, so runs are comparable)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, FEATURES, generator=generator, dtype=torch.float64)
    w = torch.randn(FEATURES, OUTPUTS, generator=generator, dtype=torch.float64)
    return DataLoader(TensorDataset(x, torch.tanh(x @ w)), batch_size=batch_size, shuffle=False)


def mse_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loop's loss, the batch's mean: the same function analyses and trains."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def run(out: Path, devices: int = 1, steps: int = 6, whole_data: bool = False, fabric_kwargs: Optional[dict] = None) -> dict:
    """Analyse, apply the map, train ``steps`` steps; return (and write) what this process saw.

    Args:
        out: folder for ``fisher_map.json`` and each process's record.
        devices: processes; DDP on gloo when more than one.
        steps: training steps after the analysis.
        whole_data: analyse every batch instead of stopping once the ranking is stable (then
            any number of processes measures the same samples: the same map as one process).
        fabric_kwargs: more ``Fabric`` arguments.
    """
    import peft
    from lightning.fabric import Fabric

    from lightning_fisher import analyze, lora_config_from_fisher_map, verify_adapter_ranks
    from lightning_fisher.peft_factory import adapter_ranks

    fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", **(fabric_kwargs or {}))
    fabric.launch()
    model = make_model()
    loader = fabric.setup_dataloaders(make_data())  # each process gets its share of the samples
    stopping = dict(convergence_patience=10_000, min_batches=0, max_batches=None) if whole_data else {}
    fisher_map = analyze(model, loader, mse_loss, output=out, rank=8, rank_min=1, rank_max=32, **stopping)

    model = peft.get_peft_model(model, lora_config_from_fisher_map(fisher_map))
    verify_adapter_ranks(model, fisher_map)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    losses = []
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        optimizer.zero_grad()
        loss = mse_loss(model, batch)
        fabric.backward(loss)
        optimizer.step()
        losses.append(float(fabric.all_reduce(loss.detach(), reduce_op="mean")))
    record = {
        "rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "scores": fisher_map.scores,
        "ranks": fisher_map.ranks,
        "batches": fisher_map.analysis.batches,
        "samples": fisher_map.analysis.samples,
        "stop_reason": fisher_map.analysis.stop_reason,
        "history": list(fisher_map.analysis.stability.history),
        "adapter_ranks": adapter_ranks(model.module if hasattr(model, "module") else model),
        "losses": losses,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(record))
    return record


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for fisher_map.json and each process's record")
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP on gloo when more than one)")
    parser.add_argument("--steps", type=int, default=6, help="training steps after the analysis")
    parser.add_argument("--whole-data", action="store_true", help="analyse every batch (no early stop)")
    args = parser.parse_args(argv)
    record = run(args.out, devices=args.devices, steps=args.steps, whole_data=args.whole_data)
    if record["rank"] == 0:
        print(f"adapters {record['adapter_ranks']}; loss {record['losses'][0]:.4f} -> {record['losses'][-1]:.4f}")


if __name__ == "__main__":
    main()
