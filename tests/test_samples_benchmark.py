"""The samples-per-criterion benchmark's pure parts: the half split, the replayed stopping rules, the agreement
figures and the frontier verdicts (synthetic inputs, values computed by hand)."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import samples_per_criterion as spc  # noqa: E402
from quality_bench.protocol import DIGITS  # noqa: E402
from quality_bench.runs import map_path  # noqa: E402


def test_parity_halves_are_disjoint_and_cover_the_files_in_order():
    files = [Path(f"s_{i}.pt") for i in range(7)]
    even, odd = spc.parity_halves(files)
    assert even == [files[0], files[2], files[4], files[6]]
    assert odd == [files[1], files[3], files[5]]
    assert not set(even) & set(odd)
    assert sorted(even + odd) == sorted(files)


def test_replay_stop_reads_the_batch_a_rule_would_have_stopped_at():
    curve = [0.4, 0.95, 0.95, 0.5, 0.95, 0.95, 0.95]
    assert spc.replay_stop(curve, patience=2, threshold=0.9, min_batches=1) == 3
    assert spc.replay_stop(curve, patience=2, threshold=0.9, min_batches=5) == 6  # batches 5, 6 stable
    assert spc.replay_stop(curve, patience=3, threshold=0.9, min_batches=5) == 7
    assert spc.replay_stop(curve, patience=5, threshold=0.9, min_batches=5) is None  # not within the curve
    assert spc.replay_stop(curve, patience=1, threshold=0.3, min_batches=1) == 1
    # a batch without a correlation (no half has an adapter yet) breaks a run of stable batches
    assert spc.replay_stop([0.95, None, 0.95, 0.95], patience=2, threshold=0.9, min_batches=0) == 4


def test_samples_at_counts_a_short_last_batch():
    assert spc.samples_at(5, 64, 574) == 320
    assert spc.samples_at(9, 64, 574) == 574
    assert spc.samples_at(None, 64, 574) is None


def test_rank_agreement_by_hand():
    a = {"q": 1, "k": 2, "v": 4}
    b = {"q": 2, "k": 2, "out": 1}
    # over q, k, v, out: ranks (1, 2, 4, 0) and (2, 2, 0, 1); k equal; |1-2| + 0 + |4-0| + |0-1| = 6
    # Spearman: ranks (2, 3, 4, 1) and (3.5, 3.5, 1, 2) -> covariance -1.5, variances 5 and 4.5
    got = spc.rank_agreement(a, b)
    assert got["modules"] == 4 and got["equal"] == 1 and got["l1"] == 6
    assert got["spearman"] == pytest.approx(-1.5 / math.sqrt(5 * 4.5))
    # a module neither map gives an adapter counts as an agreement (rank 0 both)
    wider = spc.rank_agreement(a, b, modules=["q", "k", "v", "out", "fc1"])
    assert wider["modules"] == 5 and wider["equal"] == 2 and wider["l1"] == 6
    same = spc.rank_agreement(a, dict(a))
    assert same == {"spearman": pytest.approx(1.0), "equal": 3, "l1": 0, "modules": 3}


def test_spearman_is_none_when_one_side_is_constant():
    assert spc.spearman([4, 4, 4], [1, 2, 3]) is None
    assert spc.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_pin_puts_one_map_where_every_fit_seed_looks(tmp_path):
    source = tmp_path / "map.json"
    source.write_text('{"a map": 1}')
    workdir = spc.pin(source, DIGITS, "spectrum", tmp_path / "pinned")
    for seed in spc.FIT_SEEDS:
        target = map_path(DIGITS, seed, "balanced", workdir, "spectrum")
        assert target.read_text() == '{"a map": 1}'
        assert target.name == f"digits_b40_seed{seed}_balanced_spectrum.json"


def test_chosen_lrs_follow_the_quality_benchmarks_validation_choice(tmp_path):
    runs = [{"task": "digits", "arm": "fisher_spectrum", "focus": "balanced", "lr": lr, "seed": 0, "val_loss": v,
             "test_loss": v} for lr, v in ((1e-3, 0.61), (1e-2, 0.59), (3e-2, 0.60))]
    runs.append({"task": "reviews", "arm": "fisher_spectrum", "focus": "", "lr": 1e-3, "seed": 0, "val_loss": 0.1})
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"runs": runs}))
    assert spc.chosen_lrs(path, "digits") == {"fisher_spectrum/balanced": 1e-2}


def fit(key, seed, loss, arm="fisher_spectrum"):
    return {"map": key, "arm": arm, "seed": seed, "lr": 1e-2, "lora_parameters": 100, "test_loss": loss}


def test_frontier_judges_each_map_against_the_full_data_map_by_the_seed_spread():
    results = {"fits": [fit("spectrum/full", s, v) for s, v in enumerate((0.590, 0.592, 0.588))]
               + [fit("spectrum/even", s, v) for s, v in enumerate((0.600, 0.602, 0.598))]
               + [fit("spectrum/odd", s, v) for s, v in enumerate((0.591, 0.589, 0.590))]
               + [fit("spectrum/full@5", s, v) for s, v in enumerate((0.589, 0.591, 0.590))]}
    rows = {row["map"]: row for row in spc.frontier(results)}
    assert rows["spectrum/full"]["test_loss"]["mean"] == pytest.approx(0.590)
    assert rows["spectrum/full"]["test_loss"]["std"] == pytest.approx(0.002)
    assert rows["spectrum/full"]["versus"] == {}  # the reference
    assert list(rows["spectrum/even"]["versus"]) == ["spectrum/full"]
    even = rows["spectrum/even"]["versus"]["spectrum/full"]
    assert even["difference"] == pytest.approx(0.010) and even["word"] == "worse"
    odd = rows["spectrum/odd"]["versus"]
    assert odd["spectrum/full"]["word"] == "parity"
    assert odd["spectrum/even"]["difference"] == pytest.approx(-0.010) and odd["spectrum/even"]["word"] == "better"
    assert list(rows["spectrum/full@5"]["versus"]) == ["spectrum/full"]  # an early map meets the full one only
    assert rows["spectrum/full@5"]["versus"]["spectrum/full"]["word"] == "parity"
