"""``lightning-fisher reallocate``: a stored map with another budget or criterion, no new analysis."""

import shutil

import pytest
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


def test_reallocate_parser_options_are_the_settings_own(capsys):
    import dataclasses as dc

    from lightning_fisher.allocation.settings import field_help
    from lightning_fisher.cli.reallocate import build_parser

    parser = build_parser()
    assert parser.prog == "lightning-fisher reallocate"
    assert parser.description == ("Allocate the ranks of a stored fisher map again with other settings (budget, bounds, "
                                  "mode or criterion), without a new analysis. Unset flags keep the map's values.")
    actions = {a.dest: a for a in parser._actions}
    assert actions["map"].help == "fisher_map.json, or the dataset folder that holds it"
    assert actions["output"].required is True and actions["output"].help == (
        "where to write the new map: a .json file, or a folder (an existing one, or a new one written with a trailing /). "
        "A map already there is kept as .bak; any other file there is refused")
    alpha = actions["lora_alpha"]
    assert alpha.option_strings == ["--lora_alpha", "--lora-alpha"] and alpha.type is float and alpha.default is None
    assert alpha.help == "alpha at the new base rank (default: the map's alpha policy carried to it)"
    for f in dc.fields(AllocationSettings):
        action = actions[f.name]
        flag = f.metadata["flag"]
        assert action.option_strings == list(dict.fromkeys([f"--{flag}", f"--{flag.replace('_', '-')}"]))
        assert action.default is None and action.help == f"{field_help(f)} (default: the map's)"
    assert actions["mode"].choices == ("median", "budget") and actions["mode"].type is str
    assert actions["rank"].choices is None and actions["rank"].type is int
    assert actions["score_power"].type is float


def test_reallocate_flags_in_both_spellings_and_the_alpha(tmp_path, capsys):
    assert reallocate(V1_MAP, tmp_path / "a.json", "--rank_max", "8", "--rank-mode", "median", "--lora_alpha", "3") == 0
    first = FisherMap.load(tmp_path / "a.json")
    assert first.allocation.rank_max == 8 and first.allocation.mode == "median"
    assert first.alpha.lora_alpha == 3.0  # at the base rank: the map's own alpha there is 8.0
    assert FisherMap.load(V1_MAP).alpha.lora_alpha != 3.0
    assert reallocate(V1_MAP, tmp_path / "b.json", "--lora-alpha", "2.5") == 0
    assert FisherMap.load(tmp_path / "b.json").alpha.lora_alpha == 2.5


@pytest.mark.parametrize("argv, line", [
    (["--rank", "2"], "the following arguments are required: --output"),
    (["--output", "x.json", "--rank-mode", "flat"], "argument --rank_mode/--rank-mode: invalid choice: 'flat'"),
])
def test_reallocate_parse_errors_exit_2(argv, line, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:  # argparse's own exit
        main(["reallocate", str(V1_MAP), *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"lightning-fisher reallocate: error: {line}")
    assert not (tmp_path / "x.json").exists()


def test_reallocate_output_with_a_trailing_slash_is_a_folder_even_named_json(tmp_path, capsys):
    assert reallocate(V1_MAP, f"{tmp_path / 'maps.json'}/", "--rank", "2") == 0
    assert (tmp_path / "maps.json").is_dir() and FisherMap.load(tmp_path / "maps.json" / "fisher_map.json").budget.rank == 2


def test_reallocate_refuses_an_unwritable_output_before_working(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert reallocate(V1_MAP, blocker / "new.json", "--rank", "2") == 1
    assert capsys.readouterr().err == (f"lightning-fisher reallocate: error: {blocker / 'new.json'}: cannot write the new "
                                       f"map there ({blocker} is not a folder); pass another --output\n")


def test_reallocate_output_ending_in_the_platform_separator_is_a_folder(tmp_path, monkeypatch):
    from lightning_fisher.cli import reallocate as reallocate_module

    monkeypatch.setattr(reallocate_module.os, "sep", "\\")  # as on Windows: "/" and os.sep both end a folder name
    assert reallocate_module.output_file(f"{tmp_path / 'm.json'}/", V1_MAP) == tmp_path / "m.json" / "fisher_map.json"
    assert reallocate_module.output_file(f"{tmp_path / 'n.json'}\\", V1_MAP) == tmp_path / "n.json\\" / "fisher_map.json"
