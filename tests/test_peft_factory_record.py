"""applied_map_record: the record a fit logs, field by field."""

from types import MappingProxyType

import numpy
import pytest
import torch
from torch import nn

from lightning_fisher import FisherMap
from lightning_fisher.peft_factory.record import applied_map_record


def small_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    scores = {"0": 16.0, "1": 1.0, "2": 0.0}
    return FisherMap.from_scores(scores, model, rank=4, rank_min=1, rank_max=8, mode="budget", criterion="trace")


@pytest.mark.parametrize(("ignored", "applied"), [(False, "flat LoRA (no map)"), (True, "flat LoRA (map ignored)")])
def test_flat_lora_records_ranks_and_parameters_only(ignored, applied):
    record = applied_map_record(None, {"a": 8, "b": 8}, 96, 200, ignored=ignored)
    assert record == {"fisher_map": {"trainable_adapter_parameters": 96, "ranks": {"a": 8, "b": 8}, "applied": applied}}


def test_flat_lora_is_not_ignored_by_default():
    assert applied_map_record(None, {}, 0)["fisher_map"]["applied"] == "flat LoRA (no map)"


def test_a_map_in_memory_records_its_identity_and_settings():
    fisher_map = small_map()
    ranks = dict(fisher_map.ranks)
    record = applied_map_record(fisher_map, ranks, 30, 90)
    assert record == {"fisher_map": {
        "trainable_adapter_parameters": 30,
        "ranks": ranks,
        "applied": "(in memory)",
        "model_fingerprint": fisher_map.model.fingerprint,
        "created": fisher_map.created,
        "criterion": "trace",
        "mode": "budget",
        "rank": 4,
        "rank_min": 1,
        "rank_max": 8,
        "modules_adapted": 2,
        "modules_excluded": 1,
        "flat_lora_parameters": 90,
        "parameters_vs_flat": 0.3333,
    }}
    assert len(fisher_map.excluded) == 1 and len(ranks) == 2


def test_a_saved_map_records_its_path(tmp_path):
    fisher_map = small_map()
    path = fisher_map.save(tmp_path / "fisher_map.json")
    loaded = FisherMap.load(path)
    record = applied_map_record(loaded, loaded.ranks, 30)["fisher_map"]
    assert record["applied"] == str(path) and isinstance(record["applied"], str)


def test_the_record_counts_the_ranks_given_not_the_map_s():
    record = applied_map_record(small_map(), {"0": 8}, 16)["fisher_map"]
    assert record["modules_adapted"] == 1 and record["ranks"] == {"0": 8}


@pytest.mark.parametrize("flat", [None, 0])
def test_no_flat_comparison_without_flat_parameters(flat):
    record = applied_map_record(small_map(), {"0": 8}, 16, flat)["fisher_map"]
    assert "flat_lora_parameters" not in record and "parameters_vs_flat" not in record


def test_numbers_are_plain_ints_and_the_ratio_has_four_decimals():
    record = applied_map_record(small_map(), {"0": 8}, numpy.int64(7), numpy.int64(3))["fisher_map"]
    assert type(record["trainable_adapter_parameters"]) is int and record["trainable_adapter_parameters"] == 7
    assert type(record["flat_lora_parameters"]) is int and record["flat_lora_parameters"] == 3
    assert record["parameters_vs_flat"] == 2.3333


def test_ranks_are_copied_into_a_plain_dict():
    ranks = {"0": 8}
    record = applied_map_record(None, MappingProxyType(ranks), 16)["fisher_map"]
    assert type(record["ranks"]) is dict
    ranks["0"] = 2
    assert record["ranks"] == {"0": 8}
    record = applied_map_record(small_map(), MappingProxyType(ranks), 16)["fisher_map"]
    assert type(record["ranks"]) is dict
