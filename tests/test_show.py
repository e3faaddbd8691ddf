"""``lightning-fisher show``: its output is the report's table / records, options passed through, plot checks."""

import importlib.util
import os
from pathlib import Path

import pytest

from lightning_fisher import FisherMap
from lightning_fisher.cli import main
from lightning_fisher.cli import show as show_module
from lightning_fisher.report import format_map_table, map_csv, map_json

V1_MAP = Path(__file__).parent / "data" / "fisher_map_v1.json"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_terminal(monkeypatch):
    """No COLUMNS and no terminal: shutil.get_terminal_size falls back to show's own default."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)

    def no_size(*args):
        raise OSError("not a terminal")

    monkeypatch.setattr(os, "get_terminal_size", no_size)


def test_show_text_is_the_report_table_at_the_fallback_width(no_terminal, capsys):
    fisher_map = FisherMap.load(V1_MAP)
    assert main(["show", str(V1_MAP)]) == 0
    out = capsys.readouterr().out
    assert out == format_map_table(fisher_map, sort="name", top=None, width=120) + "\n"
    assert out != format_map_table(fisher_map, sort="name", top=None, width=80) + "\n"  # the width matters


def test_show_text_uses_the_terminal_width_and_passes_sort_and_top(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "70")
    fisher_map = FisherMap.load(V1_MAP)
    assert main(["show", str(V1_MAP), "--sort", "score", "--top", "3"]) == 0
    assert capsys.readouterr().out == format_map_table(fisher_map, sort="score", top=3, width=70) + "\n"


@pytest.mark.parametrize("sort", ["name", "score", "rank"])
def test_show_json_and_csv_are_the_records_alone(sort, capsys):
    fisher_map = FisherMap.load(V1_MAP)
    assert main(["show", str(V1_MAP), "--format", "json", "--sort", sort, "--top", "2"]) == 0
    assert capsys.readouterr() == (map_json(fisher_map, sort=sort, top=2) + "\n", "")
    assert main(["show", str(V1_MAP), "--format", "csv", "--sort", sort]) == 0
    captured = capsys.readouterr()
    assert captured.out == map_csv(fisher_map, sort=sort, top=None)  # no blank line after the CSV
    assert captured.out.endswith("\n") and not captured.out.endswith("\n\n") and captured.err == ""


def test_show_top_must_be_positive_and_one_is_enough(capsys):
    assert main(["show", str(V1_MAP), "--format", "csv", "--top", "0"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "lightning-fisher show: error: top: expected a positive number of rows, got 0\n"
    assert main(["show", str(V1_MAP), "--format", "csv", "--top", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # the header and one row


def test_show_plot_message_goes_to_stdout_for_text_and_stderr_for_data(tmp_path, capsys):
    assert main(["show", str(V1_MAP), "--plot", str(tmp_path / "a.PNG")]) == 0  # the suffix in any case
    captured = capsys.readouterr()
    assert captured.out.endswith(f"\nheatmap written to {tmp_path / 'a.PNG'}\n") and captured.err == ""
    assert (tmp_path / "a.PNG").read_bytes()[:8] == PNG
    assert main(["show", str(V1_MAP), "--format", "csv", "--plot", str(tmp_path / "b.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out == map_csv(FisherMap.load(V1_MAP), sort="name", top=None)
    assert captured.err == f"heatmap written to {tmp_path / 'b.png'}\n"


def test_show_plot_without_matplotlib_is_refused_before_printing(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["show", str(V1_MAP), "--plot", str(tmp_path / "map.png")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "matplotlib" in captured.err
    assert not (tmp_path / "map.png").exists()


def test_show_plot_write_failure_is_a_report_write_error(tmp_path, monkeypatch, capsys):
    def full_disk(fisher_map, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(show_module, "plot_map", full_disk)
    assert main(["show", str(V1_MAP), "--format", "json", "--plot", str(tmp_path / "map.png")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'map.png'}: cannot write the heatmap ([Errno 28] No space left on device)" in err


def test_show_parser_names_its_options_and_choices():
    parser = show_module.build_parser()
    assert parser.prog == "lightning-fisher show"
    assert parser.description == "Print a fisher map: scores with uncertainty and ranks, grouped by block and module type."
    actions = {a.dest: a for a in parser._actions}
    assert actions["map"].help == "fisher_map.json, or the dataset folder that holds it"
    assert (actions["format"].choices, actions["format"].default) == (("text", "json", "csv"), "text")
    assert actions["format"].help == ("text: header, table and rank matrix (default); json / csv: one record per module "
                                      "(name, type, shape, score, stderr, rank, alpha, excluded), nothing else on stdout")
    assert (actions["sort"].choices, actions["sort"].default) == (("name", "score", "rank"), "name")
    assert actions["sort"].help == "row order (default: by block)"
    assert (actions["top"].type, actions["top"].default, actions["top"].help) == (int, None, "show only the first N rows")
    plot = actions["plot"]
    assert (plot.metavar, plot.default, plot.help) == ("OUT.png", None, "also write a heatmap of scores and ranks")


@pytest.mark.parametrize("argv, line", [
    (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["--sort", "size"], "argument --sort: invalid choice: 'size'"),
])
def test_show_refuses_unknown_choices(argv, line, capsys):
    with pytest.raises(SystemExit) as info:  # argparse's own exit
        main(["show", str(V1_MAP), *argv])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines()[-1].startswith(f"lightning-fisher show: error: {line}")


def test_show_plot_into_new_folders_says_so(tmp_path, capsys):
    target = tmp_path / "plots" / "maps" / "map.png"
    assert main(["show", str(V1_MAP), "--format", "json", "--plot", str(target)]) == 0
    assert capsys.readouterr().err == (f"heatmap written to {target} (created folders {tmp_path / 'plots'}, "
                                       f"{tmp_path / 'plots' / 'maps'})\n")
    assert target.read_bytes()[:8] == PNG


def test_show_plot_refuses_a_folder_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["show", str(V1_MAP), "--plot", str(blocker / "map.png")]) == 1
    assert capsys.readouterr() == ("", f"lightning-fisher show: error: {blocker / 'map.png'}: cannot write the heatmap "
                                       f"there ({blocker} is not a folder); pass another --plot\n")
