"""The plain loop under a raw torch.distributed group (gloo, CPU), as torchrun or accelerate set it up.

Usage: python plain_ddp.py OUT_DIR MIN_BATCHES
Two processes; rank 0 is given 5 batches and rank 1 only 3, so the pass must end for both when
rank 1's run out. Each rank writes what it saw (or the error it raised) to OUT_DIR/rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_fisher import FisherAnalysisError, analyze


def batches_of(rank):
    generator = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    count = 5 if rank == 0 else 3
    return [(x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]) for i in range(count)]


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def worker(rank, out, min_batches, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        fisher_map = analyze(model(), batches_of(rank), loss_fn, output=out, rank=4, rank_min=1, rank_max=8,
                             convergence_patience=10_000, min_batches=min_batches, max_batches=None)
        record = {"scores": fisher_map.scores, "batches": fisher_map.analysis.batches,
                  "samples": fisher_map.analysis.samples, "stop_reason": fisher_map.analysis.stop_reason,
                  "world_size": fisher_map.analysis.world_size}
    except FisherAnalysisError as error:
        record = {"error": str(error)}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    out, min_batches = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(out, min_batches, os.path.abspath(out / "init")), nprocs=2, join=True)
