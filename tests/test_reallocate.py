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
    assert f"from {source}: {old.summary()}" in out and "was:" not in out  # nothing was replaced


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


def reallocate(source, output, *flags):
    return main(["reallocate", str(source), "--output", str(output), *flags])


def test_reallocate_never_replaces_a_file_that_is_not_a_map(tmp_path, capsys):
    precious = tmp_path / "precious.json"
    precious.write_text('{"precious": true}')
    assert reallocate(V1_MAP, precious, "--rank", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lightning-fisher reallocate: error: {precious}: --output names an existing file that is "
                          "not a fisher map")
    assert "it is not replaced. Pass another --output, or move that file away first" in err
    assert precious.read_text() == '{"precious": true}' and not (tmp_path / "precious.json.bak").exists()


def test_reallocate_over_a_map_keeps_it_as_bak_and_describes_it(tmp_path, capsys):
    folder = tmp_path / "data"
    assert reallocate(V1_MAP, f"{folder}/", "--rank", "2") == 0  # a trailing /: the folder is created, and said so
    assert capsys.readouterr().out.startswith(f"{folder / 'fisher_map.json'} (created folder {folder}): rank 2")
    first = (folder / "fisher_map.json").read_bytes()
    replaced = FisherMap.load(folder)
    assert reallocate(V1_MAP, folder, "--rank", "3", "--rank-max", "8") == 0
    out = capsys.readouterr().out
    assert (folder / "fisher_map.json.bak").read_bytes() == first
    assert f"fisher map replaced: the previous one (created {replaced.created}) is kept as " \
           f"{folder / 'fisher_map.json.bak'}; ranks changed in" in out
    # "was:" is the file replaced (rank 2), not the map reallocated (the v1 map, rank 4)
    assert f"was: {replaced.summary()}" in out and f"from {V1_MAP}: {FisherMap.load(V1_MAP).summary()}" in out
    assert FisherMap.load(folder).budget.rank == 3


def test_reallocate_output_names_a_json_file_or_a_folder(tmp_path, capsys):
    assert reallocate(V1_MAP, tmp_path / "new.txt", "--rank", "2") == 1
    assert "new.txt: --output is neither a .json file name nor an existing folder; name a file such as " \
           f"{tmp_path / 'new.json'}, or a folder to create with a trailing /" in capsys.readouterr().err
    assert not (tmp_path / "new.txt").exists()
    nested = tmp_path / "a" / "b" / "m.json"
    assert reallocate(V1_MAP, nested, "--rank", "2") == 0
    assert capsys.readouterr().out.startswith(f"{nested} (created folders {tmp_path / 'a'}, {tmp_path / 'a' / 'b'}): ")
    assert FisherMap.load(nested).budget.rank == 2
