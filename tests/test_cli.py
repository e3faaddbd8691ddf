"""The lightning-fisher command: analyze -> fit with the map, flat fallback, and input errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tasks import write_dataset
from safetensors.torch import load_file

from lightning_fisher import FisherMap
from lightning_fisher.cli import main
from lightning_fisher.cli.arguments import normalize_flags

TESTS = Path(__file__).parent
MODEL = ["--model", "cli_models.TinyClassifier"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")


def analyze_args(dataset, *extra):
    return ["analyze", *MODEL, "--dataset-dir", str(dataset), "--rank", "4", "--rank-min", "1", "--rank-max", "16",
            "--exclude", "head", "--data.batch_size", "8", "--convergence-patience", "2", "--min-batches", "2",
            "--stability-threshold", "0.0", *QUIET, *extra]


def fit_args(dataset, root, *extra):
    return ["fit", *MODEL, "--dataset-dir", str(dataset), "--data.batch_size", "8", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(root), "--adaptive_lora.adapter_root", "backbone",
            "--adaptive_lora.export_dir", str(root / "adapter"), *QUIET, *extra]


def adapter_shapes(folder):
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return {key.split("base_model.model.")[1].split(".lora_A")[0]: value.shape[0]
            for key, value in weights.items() if ".lora_A" in key}


def test_normalize_flags():
    assert normalize_flags(["--rank-min", "16", "--timestep-focus=0.2,0.5", "--trainer.max_epochs", "3"]) == [
        "--rank_min", "16", "--timestep_focus=0.2,0.5", "--trainer.max_epochs", "3"]
    assert normalize_flags(["--ignore-fisher-map", "--model", "x.M", "--checkpoint-dir", "ckpt"]) == [
        "--model", "x.M", "--adaptive_lora.ignore_fisher_map=true", "--model.init_args.checkpoint_dir=ckpt"]
    assert normalize_flags(["--ignore-fisher-map", "false"]) == ["--adaptive_lora.ignore_fisher_map=false"]


def test_analyze_then_fit_uses_the_map_and_ignore_gives_flat(dataset, tmp_path):
    assert main(analyze_args(dataset)) == 0
    fisher_map = FisherMap.load(dataset)
    assert set(fisher_map.scores) == {f"backbone.{i}" for i in (0, 2, 4, 6)}
    assert fisher_map.analysis.stop_reason == "converged" and fisher_map.dataset.num_files == 64
    assert main(fit_args(dataset, tmp_path / "adaptive")) == 0
    expected = {name[len("backbone."):]: r for name, r in fisher_map.ranks.items()}
    assert adapter_shapes(tmp_path / "adaptive" / "adapter") == expected
    checkpoint = next((tmp_path / "adaptive").rglob("*.ckpt"))
    stored = torch.load(checkpoint, weights_only=True)["lightning_fisher"]
    assert stored["adapter_ranks"] == expected and stored["fisher_map"]["budget"]["rank"] == 4

    assert main(fit_args(dataset, tmp_path / "flat", "--ignore-fisher-map")) == 0
    assert set(adapter_shapes(tmp_path / "flat" / "adapter").values()) == {4}  # the map's base rank


def test_analyze_with_the_spectrum_criterion_then_fit(dataset, tmp_path):
    # 16 samples cannot tell any direction from noise: the analysis says so and writes nothing
    short = ("--min-batches", "2", "--max-batches", "2")
    assert main(analyze_args(dataset, "--criterion", "spectrum", "--rank-mode", "budget", *short)) == 1
    assert not (dataset / "fisher_map.json").exists()
    # the spectrum's stopping rule has no verdict while no half's allocation adapts a module, so
    # left to itself the analysis runs on until the halves agree on one
    assert main(analyze_args(dataset, "--criterion", "spectrum", "--rank-mode", "budget")) == 0
    fisher_map = FisherMap.load(dataset)
    assert fisher_map.budget.criterion == "spectrum"
    assert all(m.sigma_sq and m.noise_floor > 0 for m in fisher_map.modules)
    assert fisher_map.budget.lora_parameters <= fisher_map.budget.flat_lora_parameters
    assert main(fit_args(dataset, tmp_path / "spectrum")) == 0
    expected = {name[len("backbone."):]: r for name, r in fisher_map.ranks.items()}
    assert adapter_shapes(tmp_path / "spectrum" / "adapter") == expected


def test_checkpoint_dir_reaches_the_model(dataset, tmp_path):
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    torch.manual_seed(1)
    from cli_models import TinyClassifier

    weights = TinyClassifier().backbone.state_dict()
    weights = {k: torch.randn_like(v) for k, v in weights.items()}
    torch.save(weights, pretrained / "weights.pt")
    assert main(analyze_args(dataset, "--checkpoint-dir", str(pretrained), "--output", str(tmp_path / "m.json"))) == 0
    other = tmp_path / "other.json"
    assert main(analyze_args(dataset, "--output", str(other))) == 0
    assert FisherMap.load(tmp_path / "m.json").scores != FisherMap.load(other).scores


def test_analyze_names_the_folders_it_creates(dataset, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    assert main(analyze_args(dataset, "--output", str(tmp_path / "new" / "maps"))) == 0
    written = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fisher map written to"))
    assert written.splitlines()[0] == (f"fisher map written to {tmp_path / 'new' / 'maps' / 'fisher_map.json'} "
                                       f"(created folders {tmp_path / 'new'}, {tmp_path / 'new' / 'maps'})")
    assert "  analysis: 16 samples in 2 batches, converged" in written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--timestep-focus", "sideways"], "timestep_focus='sideways' is not one of"),
        (["--timestep-focus", "0.7,0.2"], "need 0 <= LO < HI <= 1"),
        (["--rank-min", "64"], "rank_min (64) is greater than rank_max (16)"),
        (["--rank", "0"], "rank: must be a positive integer"),
    ],
)
def test_analyze_flag_errors(dataset, capsys, extra, message):
    assert main(analyze_args(dataset, *extra)) == 1
    assert message in capsys.readouterr().err
    assert not (dataset / "fisher_map.json").exists()


def test_dataset_folder_errors(tmp_path, capsys):
    assert main(analyze_args(tmp_path / "missing")) == 1
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(analyze_args(tmp_path / "empty")) == 1
    assert "holds no sample files" in capsys.readouterr().err


def cli_error(capsys):
    """The line the command printed for an error (Lightning's own start-up lines may precede it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "argv, line",
    [
        (["analyze", "--dataset-dir", "data"],
         "lightning-fisher analyze: error: the following arguments are required: model "
         "(--model my_pkg.MyModule, or model: in a --config file)"),
        (["fit", "--dataset-dir", "data"],
         "lightning-fisher fit: error: the following arguments are required: model "
         "(--model my_pkg.MyModule, or model: in a --config file)"),
        (["analyze", "--config", "/no/such.yaml"],
         "lightning-fisher analyze: error: config: File does not exist: '/no/such.yaml'"),
        (["analyze", *MODEL, "--dataset-dir", "data", "--no-such-flag", "1"],
         "lightning-fisher analyze: error: unrecognized arguments: --no_such_flag 1"),
        (["analyze", *MODEL, "--dataset-dir", "data", "--model", "no_such_module.Model"],
         "lightning-fisher analyze: error: model: Problem with given class_path 'no_such_module.Model': "
         "No module named 'no_such_module'"),
    ],
)
def test_parse_errors_are_one_line_and_exit_2(argv, line, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [line]


def test_missing_dataset_folder_is_one_line(tmp_path, capsys):
    assert main(analyze_args(tmp_path / "missing")) == 1
    assert cli_error(capsys) == (
        f"lightning-fisher analyze: error: dataset_dir {tmp_path / 'missing'} does not exist; it should be a dataset "
        "folder with one .pt or .safetensors file per sample (run your preprocessing first)"
    )


def test_errors_in_the_users_model_file_show_file_and_line(dataset, tmp_path, monkeypatch, capsys):
    code = "import lightning.pytorch as pl\n\ndef helper():\n    raise RuntimeError('boom at import')\n\nhelper()\n"
    (tmp_path / "broken_model.py").write_text(code + "\nclass Model(pl.LightningModule):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["analyze", "--model", "broken_model.Model", "--dataset-dir", str(dataset)]) == 2
    assert cli_error(capsys) == (
        "lightning-fisher analyze: error: importing broken_model.Model failed: RuntimeError: boom at import "
        f"({tmp_path / 'broken_model.py'}, line 4, in helper)"
    )
    # building the model: the line in its __init__
    assert main(analyze_args(dataset, "--model.init_args.width", "-3")) == 1
    line = cli_error(capsys)
    assert line.startswith(
        "lightning-fisher analyze: error: cli_models.TinyClassifier raised: RuntimeError: Trying to create tensor "
        "with negative dimension -3"
    )
    source = (TESTS / "cli_models.py").read_text().splitlines()
    number = next(i for i, text in enumerate(source, 1) if "self.backbone = nn.Sequential" in text)
    assert line.endswith(f"({TESTS / 'cli_models.py'}, line {number}, in <listcomp>)")


def test_shortcut_flags_in_a_config_file_are_refused(dataset, capsys):
    assert main(analyze_args(dataset, "--config", "checkpoint_dir: ckpt")) == 1
    assert cli_error(capsys) == (
        "lightning-fisher analyze: error: checkpoint_dir: in a config file write model.init_args.checkpoint_dir "
        "(the flag --checkpoint-dir is a command-line shortcut)"
    )


def test_corrupt_sample_is_named(dataset, capsys):
    (dataset / "sample_000000.pt").write_bytes(b"not a tensor file")  # read when the data is set up
    assert main(analyze_args(dataset)) == 1
    assert "sample_000000.pt" in capsys.readouterr().err
    (dataset / "sample_000000.pt").unlink()
    (dataset / "sample_000041.pt").write_bytes(b"also broken")  # found by a full check
    assert main(analyze_args(dataset, "--data.validate", "full")) == 1
    assert "sample_000041.pt" in capsys.readouterr().err


def test_unwritable_output_fails_before_analysing(dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(analyze_args(dataset, "--output", str(blocker / "maps"))) == 1
    err = capsys.readouterr().err
    assert "cannot write the fisher map" in err and "a_file" in err


def test_fragile_model_needs_opt_in(dataset, tmp_path, capsys):
    assert main(analyze_args(dataset)) == 0
    assert main(fit_args(dataset, tmp_path / "r", "--adaptive_lora.fragile", "true")) == 1
    err = capsys.readouterr().err  # the advice in the command line's spelling
    assert "opt in with --adaptive_lora.allow_fragile true and a lower learning rate" in err
    assert "pass --adaptive_lora.ignore_fisher_map true" in err and "=True" not in err
    assert main(fit_args(dataset, tmp_path / "r", "--adaptive_lora.fragile", "true",
                         "--adaptive_lora.allow_fragile", "true")) == 0
    # the library's warning, without the source path Lightning's format puts before it
    warning = next(line for line in capsys.readouterr().err.splitlines() if "adapter learning rate" in line)
    assert warning.startswith("lightning-fisher fit: warning: adapter learning rate 0.01 is above 0.0001")
    assert warning.endswith("set --adaptive_lora.lr_warning_threshold to change it): a fisher map concentrates "
                            "adapter capacity where the data pulls hardest, so it adapts faster and can overfit "
                            "sooner than flat ranks; consider at most 0.0001 and watch validation closely")


def test_a_map_for_another_model_gives_advice_in_flag_spelling(dataset, tmp_path, capsys):
    assert main(analyze_args(dataset)) == 0
    capsys.readouterr()
    assert main(fit_args(dataset, tmp_path / "r", "--model.init_args.width", "12")) == 1
    err = capsys.readouterr().err
    assert "was made for another model" in err and "strict=False" not in err
    assert err.rstrip().endswith("Re-run the analysis for this model, or pass --adaptive_lora.strict false to apply "
                                 "it anyway.")


def test_console_script_end_to_end(dataset, tmp_path):
    """The installed entry point, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    script = Path(sys.executable).parent / "lightning-fisher"
    run = subprocess.run([str(script), *analyze_args(dataset)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    output = run.stdout + run.stderr
    assert "fisher map written to" in output
    # the seed is passed through once, and Lightning's noise stays out of the command's output
    assert output.count("Seed set to 0") == 1 and "No seed found" not in output
    assert "Tip:" not in output and "LeafSpec" not in output
    assert "GPU available: False" not in output and "TPU available: False" not in output
    assert "tensorboardX" not in output  # Lightning's note on its default logger (analyze logs to CSV)
    help_text = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "analyze" in help_text and "demo" in help_text
    json.loads((dataset / "fisher_map.json").read_text())


def test_help_lists_the_shortcuts_and_describes_the_subcommands():
    script = Path(sys.executable).parent / "lightning-fisher"
    analyze = subprocess.run([str(script), "analyze", "--help"], capture_output=True, text=True, timeout=120).stdout
    fit = subprocess.run([str(script), "fit", "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "--checkpoint-dir DIR" in analyze and "--checkpoint-dir DIR" in fit and "--ignore-fisher-map" in fit
    assert "FisherAnalysisModule" not in analyze + fit  # the wrapper is not a model to pass
    assert "Train with LoRA adapters: a fisher_map.json in the dataset folder sets the ranks" in " ".join(fit.split())
    assert "Fisher analysis: run your model's training_step" in " ".join(analyze.split())


def test_demo_help_lists_the_tasks(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "reviews: all-MiniLM-L6-v2 classifying drug-review conditions" in text
    assert "digits: a flow-matching model" in text and "(epochs 10, rank 4, rank-min 1" in text


def noise_filter_passes(logger_name, inside, after):
    """Messages logged to ``logger_name`` inside ``lightning_noise_filtered`` and after it, as they reach a handler."""
    import logging

    from lightning_fisher.cli.quiet import lightning_noise_filtered

    logger = logging.getLogger(logger_name)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with lightning_noise_filtered():
            for args in inside:
                logger.warning(*args)
        for args in after:
            logger.warning(*args)
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_lightning_tips_are_filtered_only_inside_the_command():
    tip = "💡 Tip: For seamless cloud logging, try installing litlogger"
    passed = noise_filter_passes("lightning.pytorch.utilities.rank_zero", [(tip,), ("fisher map written to x",)],
                                 [("💡 Tip: after the command, a library user sees it",)])
    assert passed == ["fisher map written to x", "💡 Tip: after the command, a library user sees it"]


def test_bitsandbytes_kernel_note_is_filtered_only_inside_the_command():
    note = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."
    passed = noise_filter_passes("bitsandbytes.backends.cpu.ops",
                                 [(note, "No module named 'kernels'"), ("a real bitsandbytes warning",)],
                                 [(note, "after the command")])
    assert passed == [
        "a real bitsandbytes warning",
        "Failed to load CPU gemm_4bit_forward from kernels-community: after the command. Please make sure ..."]


def test_kernels_trust_note_and_device_lines_are_filtered_only_inside_the_command():
    note = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode."
    assert noise_filter_passes("kernels._internals.hf_hub", [(note,), ("another kernels warning",)], [(note,)]) == [
        "another kernels warning", note]
    passed = noise_filter_passes(
        "lightning.pytorch.utilities.rank_zero",
        [("GPU available: False, used: False",), ("TPU available: False, using: 0 TPU cores",),
         ("GPU available: True (cuda), used: False",)],
        [("GPU available: False, used: False",)])
    assert passed == ["GPU available: True (cuda), used: False", "GPU available: False, used: False"]


def test_show_prints_table_and_writes_plot(dataset, tmp_path, capsys):
    assert main(analyze_args(dataset)) == 0
    capsys.readouterr()
    assert main(["show", str(dataset), "--plot", str(tmp_path / "map.png")]) == 0
    out = capsys.readouterr().out
    fisher_map = FisherMap.load(dataset)
    assert str(dataset / "fisher_map.json") in out
    for name, rank in fisher_map.ranks.items():
        assert name.split(".")[-1] in out
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", str(tmp_path / "nowhere")]) == 1
    assert "no fisher map here" in capsys.readouterr().err


def console_script(*argv, **popen):
    """The installed ``lightning-fisher`` as a user starts it from a terminal, with ``cli_models`` importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    script = Path(sys.executable).parent / "lightning-fisher"
    return subprocess.Popen([str(script), *argv], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=ctrl_c_as_in_a_terminal, **popen)


def ctrl_c_as_in_a_terminal():
    """In the child, before it starts: Ctrl-C's default action, as a command typed at a terminal has.

    A test suite started in the background by a non-interactive shell (as a CI job can be)
    inherits SIGINT *ignored*, and Python keeps an ignored SIGINT ignored: without this the
    interrupt tests would send a signal nobody hears.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_analysis(dataset, signal_number):
    """Send ``signal_number`` once the analysis is at its third batch; ``(status, stderr lines)``."""
    # 1.5 s a batch: the signal lands inside the third batch even on a busy machine
    args = analyze_args(dataset, "--model", "cli_models.SlowClassifier", "--model.init_args.delay", "1.5",
                        "--stability-threshold", "1.0", "--max-batches", "100")
    process = console_script(*args)
    for line in process.stdout:
        if line.startswith("training_step 2"):
            process.send_signal(signal_number)
            break
    _, err = process.communicate(timeout=300)
    return process.returncode, [line for line in err.splitlines() if line.strip()]


# Ctrl-C stops inside the third batch; on SIGTERM Lightning lets it finish
@pytest.mark.parametrize("signal_name, status, batches", [("SIGINT", 130, 2), ("SIGTERM", 143, 3)])
def test_an_interrupted_analysis_says_no_map_was_written(dataset, signal_name, status, batches):
    import signal

    (dataset / "fisher_map.json").write_text("a previous map")
    status_got, err = interrupted_analysis(dataset, getattr(signal, signal_name))
    assert status_got == status
    assert err[-1] == (f"lightning-fisher analyze: analysis interrupted after {batches} batches: no map written; "
                       "the previous map is unchanged")
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in err), err
    assert (dataset / "fisher_map.json").read_text() == "a previous map"


def test_sigterm_during_fit_is_one_line_and_exit_143(dataset, tmp_path):
    import signal

    process = console_script(*fit_args(dataset, tmp_path / "run", "--model", "cli_models.SlowClassifier"))
    for line in process.stdout:
        if line.startswith("training_step 2"):
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]  # was 0: as if the fit had finished
    assert err.splitlines()[-1] == "lightning-fisher fit: interrupted (SIGTERM) before it finished"
    assert "Traceback" not in err


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    import signal
    import time

    # `analyze --help` imports torch, then Lightning and jsonargparse: seconds of start-up either way
    process = console_script("analyze", "--help")
    time.sleep(2.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert err.splitlines() in (["lightning-fisher: interrupted while starting; nothing was done"],
                                ["lightning-fisher analyze: interrupted (Ctrl-C) before it finished"])


def test_show_plot_refuses_an_unwritable_place_before_printing(dataset, tmp_path, capsys):
    assert main(analyze_args(dataset)) == 0
    capsys.readouterr()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["show", str(dataset), "--plot", str(blocker / "map.png")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no table, then an error
    assert captured.err == (f"lightning-fisher show: error: {blocker / 'map.png'}: cannot write the heatmap there "
                            f"({blocker} is not a folder); pass another --plot\n")
    assert main(["show", str(dataset), "--plot", str(tmp_path / "map.jpg")]) == 1
    assert "map.jpg: --plot writes a PNG image; give a file name ending in .png" in capsys.readouterr().err
    # missing folders are made, and said
    assert main(["show", str(dataset), "--format", "json", "--plot", str(tmp_path / "plots" / "map.png")]) == 0
    assert capsys.readouterr().err == (f"heatmap written to {tmp_path / 'plots' / 'map.png'} "
                                       f"(created folder {tmp_path / 'plots'})\n")
