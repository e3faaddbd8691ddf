"""``lightning-fisher wizard``: the real console script in a pseudo-terminal, and its parts without one."""

import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch
import yaml
from _tasks import write_dataset

from lightning_fisher import AllocationSettings, FisherMap
from lightning_fisher.cli import wizard, wizard_answers
from lightning_fisher.cli.lightning_clis import build_analyze_cli
from lightning_fisher.cli.quiet import all_output_discarded
from lightning_fisher.cli.wizard import Prompter, Wizard
from lightning_fisher.cli.wizard_answers import (
    WizardAnswers,
    answers_to_config,
    default_presets_dir,
    load_presets,
    parse_config_path,
    render_config,
)
from lightning_fisher.cli.wizard_estimate import RunTimeEstimate, analysis_batches, estimate_run_time
from lightning_fisher.errors import SettingsError

TESTS = Path(__file__).parent
REPO = TESTS.parent
SCRIPT = Path(sys.executable).parent / "lightning-fisher"
MODEL = "cli_models.TinyClassifier"
FLOW = "cli_models.TinyFlow"  # has a timestep_sampler and required __init__ arguments


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data", n=48)


def _env():
    # Keep any PYTHONPATH already set; add the tests folder so cli_models imports.
    paths = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def spawn_wizard(cwd, *args, timeout=60):
    child = pexpect.spawn(
        str(SCRIPT), ["wizard", *args], cwd=str(cwd), env=_env(), encoding="utf-8", timeout=timeout,
        dimensions=(60, 200),
    )
    child.logfile_read = io.StringIO()
    return child


def answer(child, *steps):
    """Each step is (text the wizard prints, line to type, or None to type nothing)."""
    for expected, line in steps:
        child.expect_exact(expected)
        if line is not None:
            child.sendline(line)


def transcript(child):
    return child.logfile_read.getvalue().replace("\r\n", "\n")


def finish(child):
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


#: Enter at every rank, criterion, stopping and seed question (with no change to the stopping rule).
ENTER_THROUGH_SETTINGS = [
    (prompt, "") for prompt in ("rank (int)", "rank_min (int)", "rank_max (int)", "rank_mode (", "score_power (float)",
                                "exclude_threshold (float)", "criterion (str)", "Change the stopping rule?", "seed (")
]


def files_written(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


# --------------------------------------------------------------------------------------------
# The console script in a pseudo-terminal


def test_wizard_session_writes_config_and_runs_analyze(dataset, tmp_path):
    # cwd has no configs/presets, so the presets come from the checkout next to the package.
    child = spawn_wizard(tmp_path)
    answer(
        child,
        ("class path [lightning_fisher.examples.text_classifier.MiniLMClassifier]:", MODEL),
        ("Checkpoint folder [Enter: the model's own default]:", ""),
        ("Include [Enter: every nn.Linear]:", ""),
        ("Exclude [Enter: none]:", "head"),
        ("Dataset folder", str(dataset)),
        ("Batch size [16]:", ""),
        ("Start from a preset? (none/small/medium/large) [none]:", "small"),
        ("rank (int) [8]:", "4"),
        ("rank_min (int) [2]:", "1"),
        ("rank_max (int) [32]:", "16"),
        ("rank_mode (median/budget) [budget]:", ""),
        ("score_power (float) [0.5]:", ""),
        ("exclude_threshold (float) [0.05]:", ""),
        ("criterion (str) [trace]:", ""),
        ("Change the stopping rule? [y/N]:", ""),
        ("seed (Optional[int]) [0]:", ""),
        ("'turbo') model? [y/N]:", ""),
        (f"Save the config to [{dataset / 'fisher_analyze.yaml'}]:", ""),
        ("Run the analysis now? [Y/n]:", ""),
    )
    child.expect_exact("fisher map written to", timeout=300)
    assert finish(child) == 0
    out = transcript(child)
    assert "found 48 samples (.pt) in" in out
    # a text classifier has no timestep_sampler: no focus question
    assert "TinyClassifier has no timestep_sampler" in out and "Timestep focus (balanced" not in out
    fit = f"lightning-fisher fit --model {MODEL} --dataset-dir {dataset.resolve()} --data.batch_size 16 --trainer.max_epochs 3"
    assert f"then train with the map (fit takes these flags, not the analysis config):\n  {fit}\n" in out
    summary = out[out.index("[7/8] Summary"):out.index("[8/8]")]
    assert re.search(r"samples\s+48 samples", summary)
    assert re.search(r"estimated run time\s+about [0-9.]+ s \(3 batches x [0-9.]+ s", summary), summary
    # the summary is the config as saved
    shown = "\n".join(line[4:] for line in summary.splitlines() if line.startswith("  | "))
    assert shown + "\n" == (dataset / "fisher_analyze.yaml").read_text()
    assert "# Rank fields started from the preset 'small'." in shown

    config = yaml.safe_load((dataset / "fisher_analyze.yaml").read_text())
    assert config == {
        "model": {"class_path": MODEL},
        "dataset_dir": str(dataset.resolve()),
        "data": {"class_path": "lightning_fisher.TensorDirectoryDataModule", "init_args": {"batch_size": 16}},
        "timestep_focus": "balanced",
        "rank": 4, "rank_min": 1, "rank_max": 16, "rank_mode": "budget",
        "score_power": 0.5, "exclude_threshold": 0.05, "criterion": "trace",
        "convergence_patience": 5, "stability_threshold": 0.9, "min_batches": 5, "max_batches": 200,
        "seed": 0, "include": None,
        "exclude": ["head"],
    }
    fisher_map = FisherMap.load(dataset)
    budget = fisher_map.budget
    assert (budget.rank, budget.rank_min, budget.rank_max, budget.mode) == (4, 1, 16, "budget")
    assert set(fisher_map.scores) == {f"backbone.{i}" for i in (0, 2, 4, 6)}  # head excluded
    assert fisher_map.analysis.batches == 3 and fisher_map.dataset.num_files == 48


def test_back_required_arguments_focus_and_the_exact_commands(dataset, tmp_path, monkeypatch):
    child = spawn_wizard(tmp_path, "--presets-dir", str(REPO / "configs" / "presets"))
    answer(
        child,
        ("class path [lightning_fisher.examples.text_classifier.MiniLMClassifier]:", "back"),
        ("! this is the first question", None),
        ("class path", MODEL),
        ("Checkpoint folder", "back"),  # back to the model: another one
        ("class path [cli_models.TinyClassifier]:", FLOW),
        ("TinyFlow needs: width, noise_scale, schedule", None),
        ("width (int):", "wide"),
        ("'wide' is not a whole number", "16"),
        ("noise_scale (float):", "back"),
        ("width (int) [16]:", "24"),
        ("noise_scale (float):", "0.5"),
        ("schedule (linear/cosine):", "cosine"),
        ("TinyFlow takes no checkpoint_dir argument", None),
        ("Include [Enter: every nn.Linear]:", ""),
        ("Exclude [Enter: none]:", ""),
        ("Dataset folder", str(dataset)),
        ("Batch size [16]:", "back"),
        ("Dataset folder", str(dataset)),
        ("Batch size [16]:", "12"),
        ("[3/8] Timestep focus", None),
        ("Timestep focus (balanced/texture/structure/LO,HI) [balanced]:", "texture"),
        ("Start from a preset? (none/small/medium/large) [none]:", "BACK"),
        ("Timestep focus (balanced/texture/structure/LO,HI) [texture]:", "custom"),
        ("! timestep_focus='custom' is not one of balanced, texture, structure, or a range 'LO,HI'", None),
        ("Timestep focus (balanced/texture/structure/LO,HI) [texture]:", "0.6,0.3"),
        ("need 0 <= LO < HI <= 1", None),
        ("Timestep focus (balanced/texture/structure/LO,HI) [texture]:", "structure"),
        ("Start from a preset?", "small"),
        ("rank (int) [8]:", "4"),
        ("rank_min (int) [2]:", "1"),
        ("rank_max (int) [32]:", "16"),
        ("rank_mode (median/budget) [budget]:", "back"),
        ("rank_max (int) [32]:", "8"),
        ("rank_mode (median/budget) [budget]:", ""),
        ("score_power (float) [0.5]:", ""),
        ("exclude_threshold (float) [0.05]:", ""),
        ("criterion (str) [trace]:", ""),
        ("Change the stopping rule? [y/N]:", ""),
        ("seed (Optional[int]) [0]:", ""),
        ("'turbo') model? [y/N]:", ""),
        ("[7/8] Summary", None),
        (f"Save the config to [{dataset / 'fisher_analyze.yaml'}]:", ""),
        ("Run the analysis now? [Y/n]:", "back"),
        (f"Save the config to [{dataset / 'fisher_analyze.yaml'}]:", str(tmp_path / "flow.yaml")),
        ("Run the analysis now? [Y/n]:", "n"),
    )
    child.expect_exact("run the analysis later with")
    assert finish(child) == 0
    out = transcript(child)
    assert "  |   init_args:\n  |     width: 24\n  |     noise_scale: 0.5\n  |     schedule: cosine\n" in out
    config = yaml.safe_load((tmp_path / "flow.yaml").read_text())
    assert config["model"] == {"class_path": FLOW, "init_args": {"width": 24, "noise_scale": 0.5, "schedule": "cosine"}}
    assert config["timestep_focus"] == "structure" and config["data"]["init_args"]["batch_size"] == 12
    assert [config[k] for k in ("rank", "rank_min", "rank_max", "rank_mode")] == [4, 1, 8, "budget"]

    # the two commands printed are the ones to run, as printed
    analyze_line = f"lightning-fisher analyze --config {tmp_path / 'flow.yaml'}"
    fit_line = (
        f"lightning-fisher fit --model {FLOW} --model.init_args.width 24 --model.init_args.noise_scale 0.5 "
        f"--model.init_args.schedule cosine --dataset-dir {dataset.resolve()} --data.batch_size 12 --trainer.max_epochs 3"
    )
    assert f"run the analysis later with:\n  {analyze_line}\nthen train with the map" in out
    assert f"\n  {fit_line}\n" in out
    from lightning_fisher.cli import main

    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    assert main([*shlex.split(analyze_line)[1:], *quiet]) == 0
    fisher_map = FisherMap.load(dataset)
    assert fisher_map.analysis.timestep_focus.focus.describe().startswith("structure")
    assert main([*shlex.split(fit_line)[1:], "--trainer.max_epochs", "1", *quiet]) == 0
    checkpoint = next((tmp_path / "lightning_logs").rglob("*.ckpt"))
    assert torch.load(checkpoint, weights_only=True)["lightning_fisher"]["adapter_ranks"] == fisher_map.ranks


def test_invalid_answers_are_explained_and_asked_again(dataset, tmp_path):
    (dataset / "fisher_map.json").write_text("{}")  # an earlier map: warned about, left alone
    (tmp_path / "empty").mkdir()
    save_to = tmp_path / "configs" / "mine.yaml"
    child = spawn_wizard(tmp_path, "--save-config", str(save_to), "--presets-dir", str(REPO / "configs" / "presets"))
    answer(
        child,
        ("class path", "cli_models.NoSuchModel"),
        ("module 'cli_models' has no attribute 'NoSuchModel'", "no_such_module.Model"),
        ("cannot import module 'no_such_module'", "collections.OrderedDict"),
        ("not a LightningModule subclass", MODEL),
        ("Checkpoint folder", str(tmp_path / "no_checkpoint")),
        ("no_checkpoint is not an existing folder", ""),
        ("Include", "backbone("),
        ("is not a valid regular expression", "backbone"),
        ("Exclude", "head("),
        ("is not a valid regular expression", "head"),
        ("Dataset folder", str(tmp_path / "missing")),
        ("missing does not exist", str(tmp_path / "empty")),
        ("holds no sample files", str(dataset)),
        ("fisher_map.json already exists; the analysis will replace it and keep it as fisher_map.json.bak", None),
        ("Batch size [16]:", "0"),
        ("0 is not positive", "many"),
        ("'many' is not a whole number", "8"),
        ("Start from a preset?", "none"),
        ("rank (int) [64]:", "32"),
        ("rank_min (int) [16]:", "64"),
        ("rank_max (int) [128]:", "16"),
        ("rank_mode (median/budget) [median]:", "mean"),
        ("'mean' is not one of: median, budget", ""),
        ("score_power (float) [0.5]:", ""),
        ("exclude_threshold (float) [0.05]:", "some"),
        ("'some' is not a number", ""),
        ("criterion (str) [trace]:", "nosuch"),
        # the settings object's own check, naming the field; the defaults offered are the last
        # valid ones, so Enter cannot loop
        ("! rank_min (64) is greater than rank_max (16); answer again from rank_min", None),
        ("rank_min (int) [16]:", "8"),
        ("rank_max (int) [128]:", "64"),
        ("rank_mode (median/budget) [median]:", ""),
        ("score_power (float) [0.5]:", ""),
        ("exclude_threshold (float) [0.05]:", ""),
        ("criterion (str) [trace]:", "nosuch"),
        ("! criterion: must be one of trace, spectrum, got 'nosuch'", None),
        ("answer again from criterion", None),
        ("criterion (str) [trace]:", "spectrum"),
        ("Change the stopping rule? [y/N]:", "y"),
        ("convergence_patience (int) [5]:", ""),
        ("stability_threshold (float) [0.9]:", ""),
        ("min_batches (int) [5]:", "10"),
        ("max_batches (Optional[int]) [200]:", "5"),
        ("! max_batches (5) is smaller than min_batches (10); answer again from max_batches", None),
        ("max_batches (Optional[int]) [200]:", "none"),
        ("seed (Optional[int]) [0]:", "x"),
        ("'x' is not a whole number", "none"),
        ("'turbo') model? [y/N]:", "maybe"),
        ("answer y or n", "n"),
        (f"Save the config to [{save_to}]:", ""),
        ("Run the analysis now? [Y/n]:", "n"),
    )
    child.expect_exact("run the analysis later with")
    assert finish(child) == 0
    out = transcript(child)
    assert f"lightning-fisher analyze --config {save_to}" in out
    assert "Traceback" not in out
    config = yaml.safe_load(save_to.read_text())
    assert config["timestep_focus"] == "balanced" and config["data"]["init_args"]["batch_size"] == 8
    assert [config[k] for k in ("rank", "rank_min", "rank_max", "rank_mode")] == [32, 8, 64, "median"]
    assert (config["criterion"], config["min_batches"], config["max_batches"], config["seed"]) == ("spectrum", 10, None, None)
    assert config["include"] == ["backbone"]
    assert (dataset / "fisher_map.json").read_text() == "{}"  # not run: no map written
    assert files_written(tmp_path) == ["configs/mine.yaml", "data/fisher_map.json"]


def test_ctrl_c_at_the_last_question_writes_nothing(dataset, tmp_path):
    child = spawn_wizard(tmp_path, "--presets-dir", str(REPO / "configs" / "presets"))
    answer(
        child,
        ("class path", MODEL), ("Checkpoint folder", ""), ("Include", ""), ("Exclude", ""),
        ("Dataset folder", str(dataset)), ("Batch size", ""), ("preset?", "small"), *ENTER_THROUGH_SETTINGS,
        ("'turbo') model?", ""), ("Save the config to", ""),
    )
    child.expect_exact("Run the analysis now? [Y/n]:")
    child.sendintr()
    if child.expect_exact(["wizard cancelled, nothing written", pexpect.TIMEOUT], timeout=5) == 1:
        # On a loaded machine the ^C can land after readline shows the prompt but before it waits
        # for input; CPython's readline then misses the signal. A second ^C reaches it waiting.
        child.sendintr()
        child.expect_exact("wizard cancelled, nothing written")
    assert finish(child) == 130
    assert files_written(tmp_path) == []


def test_end_of_input_midway_writes_nothing(dataset, tmp_path):
    child = spawn_wizard(tmp_path)
    answer(child, ("class path", MODEL), ("Checkpoint folder", ""), ("Include", ""), ("Exclude", "head"))
    child.expect_exact("Dataset folder")
    child.sendeof()
    child.expect_exact("wizard cancelled, nothing written (end of input)")
    assert finish(child) == 1
    assert "Traceback" not in transcript(child)
    assert files_written(tmp_path) == []


def test_fragile_model_without_opt_in_stops(dataset, tmp_path):
    child = spawn_wizard(tmp_path)
    answer(
        child,
        ("class path", MODEL), ("Checkpoint folder", ""), ("Include", ""), ("Exclude", ""),
        ("Dataset folder", str(dataset)), ("Batch size", ""), ("preset?", ""), *ENTER_THROUGH_SETTINGS,
        ("'turbo') model? [y/N]:", "y"),
        ("Type 'yes' to continue with this model anyway [Enter: stop]:", "ok"),
    )
    child.expect_exact("stopped: nothing written")
    assert finish(child) == 1
    out = transcript(child)
    for words in ("loss spikes", "base model", "lower the learning rate"):
        assert words in out
    assert "Summary" not in out
    assert files_written(tmp_path) == []


def test_needs_a_terminal_and_an_existing_presets_dir(tmp_path, capsys):
    assert wizard.run_wizard(["--presets-dir", str(tmp_path / "missing")]) == 2
    assert "--presets-dir" in capsys.readouterr().err

    run = subprocess.run(
        [str(SCRIPT), "wizard"], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_env(), timeout=120
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "lightning-fisher wizard needs an interactive terminal; use `lightning-fisher analyze --config ...` instead"
    )


# --------------------------------------------------------------------------------------------
# The parts, without a terminal


class Script:
    """Plays the user: answers in order, then end of input."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.prompts = []
        self.lines = []

    def input(self, prompt):
        self.prompts.append(prompt)
        if not self.answers:
            raise EOFError
        return self.answers.pop(0)

    def output(self, text=""):
        self.lines.append(text)

    def prompter(self):
        return Prompter(self.input, self.output)


def test_prompter_ask_default_reask_and_empty():
    script = Script("", "x", "7", "", "")
    p = script.prompter()
    assert p.ask("Batch size", default="16", parse=wizard_answers.parse_positive_int) == 16
    assert p.ask("Rank", parse=wizard_answers.parse_positive_int) == 7
    assert script.lines == ["  ! 'x' is not a whole number"]
    assert script.prompts == ["Batch size [16]: ", "Rank: ", "Rank: "]
    assert p.ask("Exclude", parse=wizard_answers.parse_patterns, empty="none") == []
    assert p.ask("Checkpoint folder", parse=wizard_answers.parse_folder, empty="the model's own default") is None
    with pytest.raises(EOFError):
        p.ask("Dataset folder")


def test_prompter_needs_an_answer_without_default():
    script = Script("", "  data  ")
    assert script.prompter().ask("Dataset folder") == "data"
    assert script.lines == ["  ! an answer is needed"]


def test_prompter_yes_no_and_choice():
    script = Script("", "perhaps", "YES", "n", "tex", "s", "STRUCTURE", "")
    p = script.prompter()
    assert p.yes_no("Run now?", default=True) is True
    assert p.yes_no("Turbo?", default=False) is True
    assert p.yes_no("Turbo?", default=False) is False
    options = ["balanced", "texture", "structure", "custom"]
    assert p.choice("Focus", options, default="balanced") == "texture"
    assert p.choice("Focus", options, default="balanced") == "structure"  # a unique prefix
    assert p.choice("Focus", options, default="custom") == "structure"
    assert p.choice("Focus", options, default="custom") == "custom"
    assert script.prompts[1] == "Turbo? [y/N]: " and script.prompts[4] == "Focus (balanced/texture/structure/custom) [balanced]: "
    assert script.lines == ["  ! answer y or n"]


def test_prompter_choice_ambiguous_prefix():
    script = Script("s", "sm")
    assert script.prompter().choice("Preset", ["none", "small", "structure"], default="none") == "small"
    assert script.lines == ["  ! 's' is not one of: none, small, structure"]


def answers(**overrides):
    values = dict(
        model=MODEL, dataset_dir="/data/train", checkpoint_dir="/ckpt", exclude=["head", r"encoder\.pooler"],
        num_samples=48, batch_size=8, timestep_focus="0.2,0.5", ranks=AllocationSettings(4, 1, 16, "budget"),
        preset="small", fragile=False,
    )
    values.update(overrides)
    return WizardAnswers(**values)


def test_answers_to_config():
    assert answers_to_config(answers()) == {
        "model": {"class_path": MODEL, "init_args": {"checkpoint_dir": "/ckpt"}},
        "dataset_dir": "/data/train",
        "data": {"class_path": "lightning_fisher.TensorDirectoryDataModule", "init_args": {"batch_size": 8}},
        "timestep_focus": "0.2,0.5",
        "rank": 4, "rank_min": 1, "rank_max": 16, "rank_mode": "budget",
        "score_power": 0.5, "exclude_threshold": 0.05, "criterion": "trace",
        "convergence_patience": 5, "stability_threshold": 0.9, "min_batches": 5, "max_batches": 200,
        "seed": 0, "include": None,
        "exclude": ["head", r"encoder\.pooler"],
    }
    assert answers_to_config(answers(checkpoint_dir=None, exclude=[]))["model"] == {"class_path": MODEL}


def test_render_config_is_what_analyze_reads(dataset):
    text = render_config(answers(dataset_dir=str(dataset), checkpoint_dir=None, fragile=True))
    assert "# fragile: true" in text and "--adaptive_lora.fragile true --adaptive_lora.allow_fragile true" in text
    with all_output_discarded():
        cli = build_analyze_cli(["--config", text], exit_on_error=False)
    from cli_models import TinyClassifier

    assert isinstance(cli.model, TinyClassifier)
    assert cli.datamodule.batch_size == 8 and str(cli.datamodule.dataset_dir) == str(dataset)
    c = cli.config
    assert (c.rank, c.rank_min, c.rank_max, c.rank_mode, c.timestep_focus) == (4, 1, 16, "budget", "0.2,0.5")
    assert c.exclude == ["head", r"encoder\.pooler"]


def test_analysis_batches_and_estimate_text():
    assert analysis_batches(48, 16, min_batches=5, patience=5, max_batches=200) == (3, 3)
    assert analysis_batches(1000, 16, min_batches=5, patience=5, max_batches=200) == (5, 63)
    assert analysis_batches(1000, 16, min_batches=10, patience=3, max_batches=20) == (10, 20)
    assert analysis_batches(1000, 16, min_batches=0, patience=7, max_batches=None) == (7, 63)
    estimate = RunTimeEstimate(load_seconds=2.0, batch_seconds=0.5, batches_low=5, batches_high=63)
    assert estimate.describe() == "about 4.5 s to 34 s (5 to 63 batches x 0.5 s, plus 2.0 s to load the model)"
    assert RunTimeEstimate(30.0, 60.0, 200, 200).describe() == "about 3.3 h (200 batches x 60 s, plus 30 s to load the model)"


def test_estimate_run_time_times_a_real_batch(dataset):
    estimate = estimate_run_time(render_config(answers(dataset_dir=str(dataset), checkpoint_dir=None)), 48)
    # 48 samples in batches of 8: 6 batches in one pass; converged at the earliest after 5.
    assert (estimate.batches_low, estimate.batches_high) == (5, 6)
    assert 0 < estimate.batch_seconds < 30 and 0 < estimate.load_seconds < 60
    assert not (dataset / "fisher_map.json").exists()


def test_presets_fill_only_rank_fields(tmp_path):
    presets, problems = load_presets(REPO / "configs" / "presets")
    assert list(presets) == ["small", "medium", "large"] and problems == []
    assert presets["small"] == AllocationSettings(8, 2, 32, "budget")
    assert presets["large"] == AllocationSettings(64, 16, 128, "median")

    (tmp_path / "tiny.yaml").write_text("rank: 4\nrank_min: 1\ntrainer: {max_epochs: 3}\nlearning_rate: 0.1\n")
    (tmp_path / "broken.yaml").write_text("rank_min: 64\nrank_max: 8\n")
    (tmp_path / "notes.txt").write_text("not a preset")
    presets, problems = load_presets(tmp_path)
    assert presets == {"tiny": AllocationSettings(4, 1, 128, "median")}
    assert len(problems) == 1 and "broken.yaml" in problems[0] and "rank_min (64) is greater" in problems[0]
    assert load_presets(None) == ({}, [])


def test_default_presets_dir(tmp_path):
    assert default_presets_dir(tmp_path) == (REPO / "configs" / "presets").resolve()
    (tmp_path / "configs" / "presets").mkdir(parents=True)
    assert default_presets_dir(tmp_path) == tmp_path / "configs" / "presets"


def test_parse_config_path(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        parse_config_path(str(tmp_path))
    with pytest.raises(ValueError, match="ending in .yaml"):
        parse_config_path(str(tmp_path / "config.txt"))
    assert parse_config_path(str(tmp_path / "new" / "c.yml")) == tmp_path / "new" / "c.yml"


def fake_estimate(text, num_samples):
    assert yaml.safe_load(text)["dataset_dir"]  # the rendered config is what gets timed
    return RunTimeEstimate(1.0, 0.25, 3, 3)


def test_wizard_flow_with_fragile_opt_in(dataset):
    presets = {"small": AllocationSettings(8, 2, 32, "budget")}
    script = Script(
        FLOW, "16", "0.5", "linear", "", "", str(dataset), "12", "structure", "small", "", "", "", "median", "", "", "",
        "", "", "y", "yes", "", "n",
    )
    plan = Wizard(script.prompter(), presets=presets, estimate=fake_estimate).collect()
    assert plan.run_now is False and plan.config_path == dataset / "fisher_analyze.yaml"
    a = plan.answers
    assert (a.model, a.dataset_dir, a.num_samples, a.batch_size, a.timestep_focus) == (
        FLOW, str(dataset.resolve()), 48, 12, "structure")
    assert a.init_args == {"width": 16, "noise_scale": 0.5, "schedule": "linear"}
    assert a.ranks == AllocationSettings(8, 2, 32, "median") and a.preset == "small" and a.fragile is True
    assert a.exclude == [] and a.checkpoint_dir is None
    out = "\n".join(script.lines)
    assert "estimated run time  about 1.8 s (3 batches x 0.25 s, plus 1.0 s to load the model)" in out
    assert "  | # fragile: true" in out and "--adaptive_lora.allow_fragile true" in out
    assert "  | timestep_focus: structure\n" in out
    assert "# fragile: true" in render_config(a)


def test_wizard_reports_a_failed_estimate_as_unknown(dataset, tmp_path):
    def failing(text, num_samples):
        raise RuntimeError("CUDA out of memory")

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    script = Script(MODEL, str(checkpoint), "", "head", str(dataset), "", *[""] * 7, "", "", "")
    with pytest.raises(EOFError):  # the script ends at the save question
        Wizard(script.prompter(), estimate=failing).collect()
    out = "\n".join(script.lines)
    # the reason, then where in the failing code (here the test's stand-in for the model)
    assert "  ! could not time a batch: test_wizard.py raised: RuntimeError: CUDA out of memory (" in out
    assert re.search(r"test_wizard\.py, line \d+, in failing\)", out)
    assert "estimated run time  unknown" in out
    assert f"  |     checkpoint_dir: {checkpoint.resolve()}\n" in out
    assert script.prompts[-1] == f"Save the config to [{dataset / 'fisher_analyze.yaml'}]: "


def test_answers_parsed_by_the_argument_annotation():
    from typing import Literal, Optional

    from lightning_fisher.cli.model_class import has_timestep_sampler, required_init_arguments
    from lightning_fisher.cli.values import parse_typed, type_name

    assert parse_typed("3", int) == 3 and parse_typed("0.5", float) == 0.5 and parse_typed("yes", bool) is True
    assert parse_typed("none", Optional[int]) is None and parse_typed("7", Optional[int]) == 7
    assert parse_typed("[1, 2]", list[int]) == [1, 2] and parse_typed("007", str) == "007"
    assert parse_typed("b", Literal["a", "b"]) == "b"
    for text, annotation, message in (("x", int, "'x' is not a whole number"), ("c", Literal["a", "b"], "'c' is not one of: a, b"),
                                      ("maybe", bool, "'maybe': answer true or false")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_typed(text, annotation)
    assert [(name, type_name(annotation)) for name, annotation in required_init_arguments(FLOW).items()] == [
        ("width", "int"), ("noise_scale", "float"), ("schedule", "linear/cosine")]
    assert required_init_arguments(MODEL) == {}
    assert has_timestep_sampler(FLOW) and not has_timestep_sampler(MODEL)
    assert has_timestep_sampler("lightning_fisher.examples.digits_flow.DigitsFlowMatching")


@dataclasses.dataclass(frozen=True)
class WithWarmup(AllocationSettings):
    """A setting added to the allocation settings: the wizard asks it with no change of its own."""

    warmup_batches: int = dataclasses.field(
        default=3, metadata={"flag": "warmup_batches", "help": "Batches seen before any score counts."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.warmup_batches < 0:
            raise SettingsError(f"warmup_batches: must be 0 or more, got {self.warmup_batches}", field="warmup_batches")


def test_a_new_setting_is_a_question_checked_by_its_settings_object(dataset):
    script = Script(MODEL, "", "", "", str(dataset), "", "", "", "", "", "", "", "", "-1", "2", "", "", "", "", "n")
    plan = Wizard(script.prompter(), estimate=fake_estimate, allocation=WithWarmup).collect()
    assert plan.answers.ranks == WithWarmup(warmup_batches=2)
    assert answers_to_config(plan.answers)["warmup_batches"] == 2
    assert "warmup_batches (int) [3]: " in script.prompts and "  Batches seen before any score counts." in script.lines
    # the object's own check refused -1, naming the field; asked again with the last valid value
    assert "  ! warmup_batches: must be 0 or more, got -1; answer again from warmup_batches" in script.lines
    assert script.prompts.count("warmup_batches (int) [3]: ") == 2


def test_criterion_stopping_and_seed_answers_reach_the_map(dataset, monkeypatch):
    # criterion, then the stopping rule (min_batches 1, max_batches 2), seed 7, include the backbone
    script = Script(
        MODEL, "", r"backbone\.\d+", "head", str(dataset), "", "", "", "", "", "", "", "spectrum",
        "y", "", "", "1", "2", "7", "", "", "", "n",
    )
    plan = Wizard(script.prompter(), estimate=fake_estimate).collect()
    assert "criterion (str) [trace]: " in script.prompts
    assert any(line.startswith("  trace: ") and "; spectrum: " in line for line in script.lines)  # the registry's help
    config_path = plan.config_path
    config_path.write_text(render_config(plan.answers))
    config = yaml.safe_load(config_path.read_text())
    assert (config["criterion"], config["min_batches"], config["max_batches"], config["seed"]) == ("spectrum", 1, 2, 7)
    assert config["include"] == [r"backbone\.\d+"]

    from lightning_fisher.cli import main

    monkeypatch.chdir(dataset.parent)
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
    assert main(["analyze", "--config", str(config_path), *quiet]) == 0
    fisher_map = FisherMap.load(dataset)
    assert fisher_map.budget.criterion == "spectrum"
    assert (fisher_map.analysis.batches, fisher_map.analysis.stop_reason, fisher_map.analysis.seed) == (2, "max_batches", 7)
    assert set(fisher_map.scores) == {f"backbone.{i}" for i in (0, 2, 4, 6)}
