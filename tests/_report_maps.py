"""Maps shared by the report tests: a real MiniLM map and a small one with colliding names."""

import pytest
import torch
from _nets import CollidingNet, linear_names

from lightning_fisher import FisherMap
from lightning_fisher.fisher_map.map import AnalysisRecord, DatasetRecord, StabilityRecord, TimestepFocusRecord

MINILM_BLOCKS = [f"encoder.layer.{i}" for i in range(6)]
MINILM_KINDS = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


@pytest.fixture(scope="module")
def minilm_map(minilm_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm_path)
    names = linear_names(model)
    generator = torch.Generator().manual_seed(0)
    exponents = torch.rand(len(names), generator=generator) * 2.5 - 5.0  # scores over 2.5 decades
    scores = {name: float(10.0**e) for name, e in zip(names, exponents)}
    scores["pooler.dense"] = 0.0  # the loss does not depend on it: excluded
    stderr = {name: (None if index % 5 == 0 else 0.05 * s) for index, (name, s) in enumerate(scores.items())}
    analysis = AnalysisRecord(
        score="fisher_trace_per_parameter",
        loss_reduction="mean",
        timestep_focus=TimestepFocusRecord("balanced"),
        batches=16,
        samples=512,
        skipped_samples=2,
        converged=True,
        stop_reason="converged",
        seed=7,
        stability=StabilityRecord("split-half spearman", 0.9, 3, 0.95, 4, 100),
        seconds=42.3,
    )
    return FisherMap.from_scores(
        scores,
        model,
        rank=16,
        rank_min=4,
        rank_max=64,
        mode="budget",
        score_stderr=stderr,
        analysis=analysis,
        dataset=DatasetRecord("/data/drug_reviews/train", "sha256:" + "0" * 64, 512),
    )


@pytest.fixture(scope="module")
def colliding_map():
    model = CollidingNet()
    scores = {name: 1.0 + index for index, name in enumerate(linear_names(model))}
    scores["pooler.dense"] = 0.0
    scores["layers.3.q"] = 0.0  # an excluded module inside the grid
    return FisherMap.from_scores(scores, model, rank=8, rank_min=2, rank_max=32)


def sections(text):
    header, table, *rest = text.split("\n\n")
    return header, table, (rest[0] if rest else "")
