"""``lightning-fisher reallocate``: a stored map with another budget or criterion, no new analysis."""

import shutil
from pathlib import Path

from lightning_fisher import AllocationSettings, FisherMap
from lightning_fisher.cli import main

V1_MAP = Path(__file__).parent / "data" / "fisher_map_v1.json"


def test_reallocate_writes_a_new_map_and_leaves_the_old_one(tmp_path, capsys):
    source = tmp_path / "old" / "fisher_map.json"
    source.parent.mkdir()
    shutil.copy(V1_MAP, source)
    before = source.read_bytes()
    assert main(["reallocate", str(source.parent), "--output", str(tmp_path / "new.json"), "--rank", "2",
                 "--rank-max", "8", "--score-power", "1.0"]) == 0
    assert source.read_bytes() == before
    old, new = FisherMap.load(source), FisherMap.load(tmp_path / "new.json")
    # unset flags keep the map's settings
    assert new.allocation == AllocationSettings(rank=2, rank_min=1, rank_max=8, mode="budget", score_power=1.0,
                                                exclude_threshold=0.2)
    assert new.budget.lora_parameters <= new.budget.flat_lora_parameters == old.budget.flat_lora_parameters // 2
    assert new.analysis == old.analysis and new.model == old.model
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'new.json'}: rank 2, min 1, max 8, mode budget\n")
    assert f"was: {old.summary()}" in out


def test_reallocate_refuses_to_overwrite_its_source_and_a_missing_spectrum(tmp_path, capsys):
    shutil.copy(V1_MAP, tmp_path / "fisher_map.json")
    before = (tmp_path / "fisher_map.json").read_bytes()
    assert main(["reallocate", str(tmp_path), "--output", str(tmp_path / "fisher_map.json"), "--rank", "2"]) == 1
    assert "--output names the map being reallocated" in capsys.readouterr().err
    assert (tmp_path / "fisher_map.json").read_bytes() == before
    assert main(["reallocate", str(tmp_path), "--output", str(tmp_path / "new.json"), "--criterion", "spectrum"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-fisher reallocate: error: criterion 'spectrum': 28 module(s) have no recorded spectrum")
    assert not (tmp_path / "new.json").exists()
