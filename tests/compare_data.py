"""Shared by the compare tests: a dataset folder with a map from `lightning-fisher analyze`, and independent parameter counts."""

import pytest
from _tasks import write_dataset

from lightning_fisher.allocation.trace_rule import allocate_ranks, lora_parameters
from lightning_fisher.cli import main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A dataset folder with a map from `lightning-fisher analyze` (median mode, rank 4)."""
    folder = write_dataset(tmp_path_factory.mktemp("compare") / "data")
    code = main(["analyze", "--model", "cli_models.TinyClassifier", "--dataset-dir", str(folder), "--rank", "4",
                 "--rank-min", "1", "--rank-max", "16", "--exclude", "head", "--data.batch_size", "8",
                 "--convergence-patience", "2", "--min-batches", "2", "--stability-threshold", "0.0", *QUIET])
    assert code == 0
    return folder


def budget_parameters(fisher_map, rank):
    """LoRA parameters of the map's scores allocated in budget mode at ``rank``, computed independently."""
    b = fisher_map.budget
    ranks = allocate_ranks(fisher_map.scores, rank=rank, rank_min=b.rank_min, rank_max=b.rank_max, mode="budget",
                           rank_costs=fisher_map.rank_costs, score_power=b.score_power,
                           exclude_threshold=b.exclude_threshold)
    return lora_parameters(ranks, fisher_map.rank_costs)
