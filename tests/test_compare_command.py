"""lightning-fisher compare (cli/compare_command.py): flat LoRA versus the map at the same budget, on real Lightning fits."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule

from cli_models import TinyClassifier
from compare_data import budget_parameters, dataset, write_dataset  # noqa: F401 (dataset is a fixture)
from lightning_fisher import FisherMap, FisherMapNotFoundError
from lightning_fisher.cli import main
from lightning_fisher.cli.compare_command import run_compare
from lightning_fisher.errors import CompareError


class NoValLossClassifier(TinyClassifier):
    """Same parameters as TinyClassifier (so the map fits), but validation logs only an accuracy."""

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["x"]).argmax(-1) == batch["label"]).float().mean())


def fit_config(path, dataset, root, model="cli_models.TinyClassifier"):
    """A fit config as users have them: checkpoints, an export folder, no validation."""
    config = {
        "model": {"class_path": model},
        "dataset_dir": str(dataset),
        "data": {"class_path": "lightning_fisher.TensorDirectoryDataModule", "init_args": {"batch_size": 8}},
        "adaptive_lora": {"adapter_root": "backbone", "export_dir": str(root / "adapter")},
        "trainer": {"max_epochs": 3, "default_root_dir": str(root), "limit_val_batches": 0,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def files_under(folder):
    return {p for p in Path(folder).rglob("*") if p.is_file()}


def test_compare_runs_flat_fisher_and_half_budget_against_its_twin(dataset, tmp_path, capsys, monkeypatch):
    """The issue's check: --budgets 0.5 adds flat@0.5 at half the rank and parameters, and fisher@0.5 is judged against it."""
    monkeypatch.chdir(tmp_path)
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs")
    before = files_under(tmp_path) | files_under(dataset)
    output = tmp_path / "results.json"
    plot = tmp_path / "figures" / "frontier.png"
    code = main(["compare", "--config", str(config), "--budgets", "0.5", "--seeds", "0,1", "--max-steps", "8",
                 "--output", str(output), "--plot", str(plot)])
    assert code == 0

    fisher_map = FisherMap.load(dataset)
    assert fisher_map.budget.mode == "median" and fisher_map.budget.rank == 4
    costs = fisher_map.rank_costs
    step = max(costs.values())  # one rank step of the widest module
    flat = 4 * sum(costs.values())
    fisher = budget_parameters(fisher_map, 4)
    half = budget_parameters(fisher_map, 2)
    assert flat - step < fisher <= flat
    assert 2 * sum(costs.values()) - step < half <= 2 * sum(costs.values())

    results = json.loads(output.read_text())
    runs = results["runs"]
    arm_names = ("flat", "flat@0.5", "fisher", "fisher@0.5")
    assert len(runs) == 8
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in arm_names for s in (0, 1)}
    counted = {r["arm"]: r["lora_parameters"] for r in runs}  # counted in the model after injection
    assert counted == {"flat": flat, "flat@0.5": flat // 2, "fisher": fisher, "fisher@0.5": half}
    assert 0.4 < half / flat <= 0.5
    for run in runs:
        assert math.isfinite(run["val_loss"]) and run["val_loss"] > 0
        assert run["metrics"]["val_loss"] == run["val_loss"] and 0 <= run["metrics"]["val_acc"] <= 1
        assert run["steps"] == 8
    by_seed = {r["seed"]: r["val_loss"] for r in runs if r["arm"] == "flat"}
    assert by_seed[0] != by_seed[1]
    arms = {arm["name"]: arm for arm in results["arms"]}
    assert list(arms) == list(arm_names)
    assert arms["flat"]["modules"] == {"0": 4, "2": 4, "4": 4, "6": 4}  # the map's candidates, rebased
    # the twin: flat LoRA at half the rank on the same modules, with half the parameters
    assert arms["flat@0.5"]["modules"] == {"0": 2, "2": 2, "4": 2, "6": 2}
    assert arms["flat@0.5"]["rank"] == 2 and arms["flat@0.5"]["expected_lora_parameters"] * 2 == flat
    assert arms["fisher@0.5"]["twin"] == "flat@0.5" and arms["fisher"]["twin"] == "flat"
    half_verdicts = [v for v in results["verdicts"] if v.startswith("fisher@0.5 ")]
    assert len(half_verdicts) == 1 and half_verdicts[0].startswith("fisher@0.5 vs flat@0.5: val_loss")
    assert [(v["arm"], v["twin"]) for v in results["twin_verdicts"]] == [("fisher", "flat"), ("fisher@0.5", "flat@0.5")]

    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert [row.split("|")[1].strip() for row in rows] == list(arm_names)
    flat_losses = [r["val_loss"] for r in runs if r["arm"] == "flat"]
    mean = sum(flat_losses) / 2
    std = abs(flat_losses[0] - flat_losses[1]) / math.sqrt(2)
    assert f"{mean:.4f} ± {std:.4f}" in rows[0] and f"{flat:,}" in rows[0] and "1.00x" in rows[0]
    assert "0.50x" in rows[1] and f"{half / flat:.2f}x" in rows[3]
    assert "fisher vs flat: val_loss" in out and "seed spread" in out
    assert "val_fraction=0.2" in out  # the config had no validation data: compare says what it did
    assert "fisher@0.5 vs flat@0.5: val_loss" in out
    # the closing line: which family is ahead at which budget, against the twins
    closing = out.strip().splitlines()[-1]
    assert closing == results["summary"] and closing.startswith("At equal parameters (paired by seed")
    assert "at 1 of rank 4, " in closing and "at 0.5 of rank 4, " in closing and "flat@0.5" in closing
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and f"written to {plot}" in out

    # Checkpoints, the export folder, logs and the trainer's root: none of them were written; the
    # plot left no temporary file beside it.
    assert files_under(tmp_path) | files_under(dataset) == before | {output, plot}
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_missing_map_is_a_clear_error(tmp_path):
    folder = write_dataset(tmp_path / "no_map")
    config = fit_config(tmp_path / "fit.yaml", folder, tmp_path / "runs")
    with pytest.raises(FisherMapNotFoundError, match="run lightning-fisher analyze first") as error:
        run_compare(["--config", str(config)])
    assert str(folder / "fisher_map.json") in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_model_without_val_loss_is_a_clear_error(dataset, tmp_path):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs", model="test_compare_command.NoValLossClassifier")
    with pytest.raises(CompareError, match=r"logs no 'val_loss' in validation \(validation metrics logged: val_acc\)"):
        run_compare(["--config", str(config), "--seeds", "0", "--max-steps", "2"])


class NoValidationClassifier(TinyClassifier):
    """TinyClassifier as if it had no validation_step."""

    validation_step = LightningModule.validation_step


def test_model_without_validation_step_is_refused_before_any_run(dataset, tmp_path):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs",
                        model="test_compare_command.NoValidationClassifier")
    with pytest.raises(CompareError) as error:
        run_compare(["--config", str(config), "--seeds", "0", "--max-steps", "2"])
    assert str(error.value) == (
        "test_compare_command.NoValidationClassifier has no validation_step, and compare scores every arm on "
        "validation: add a validation_step that logs 'val_loss' (self.log('val_loss', loss)) to NoValidationClassifier")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "extra, message",
    [(["--budgets", "1.0,zero"], "--budgets: expected comma-separated numbers"),
     (["--budgets", "-0.5"], "--budgets: each must be a positive fraction"),
     (["--seeds", "0,0"], "--seeds: each seed once"),
     (["--max-steps", "0"], "--max_steps: must be a positive number"),
     (["--seeds=-1"], "--seeds: each seed must be a whole number from 0 to 4294967295, got -1"),
     (["--seeds", "0,99999999999"], "--seeds: each seed must be a whole number from 0 to 4294967295, got 99999999999")],
)
def test_option_errors_name_the_option(dataset, tmp_path, extra, message):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs")
    with pytest.raises(CompareError, match=message.replace("(", r"\(")):
        run_compare(["--config", str(config), *extra])


class NoRunClassifier(TinyClassifier):
    def __init__(self, *args, **kwargs):
        raise AssertionError("no model may be built: the --plot check comes first")


def test_plot_that_cannot_be_written_is_refused_before_training(dataset, tmp_path, monkeypatch):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs", model="test_compare_command.NoRunClassifier")
    (tmp_path / "file").write_text("")
    with pytest.raises(CompareError, match=r"--plot: cannot write .*file, not a folder; choose another place"):
        run_compare(["--config", str(config), "--plot", str(tmp_path / "file" / "frontier.png")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    with pytest.raises(CompareError, match=r"--plot: plotting needs matplotlib: pip install 'lightning-fisher\[plot\]'"):
        run_compare(["--config", str(config), "--plot", str(tmp_path / "frontier.png")])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "frontier.png").exists()


def test_output_that_is_not_a_results_file_is_refused_before_any_run(dataset, tmp_path):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs")
    precious = tmp_path / "precious.json"
    precious.write_text('{"precious": true}')
    with pytest.raises(CompareError) as error:
        run_compare(["--config", str(config), "--seeds", "0", "--output", str(precious)])
    assert str(error.value) == (
        f"--output: {precious} exists and is not a compare results file (JSON without compare's keys monitor, arms, "
        "runs); it is not replaced. Pass another --output, or move that file away first")
    assert precious.read_text() == '{"precious": true}' and not (tmp_path / "runs").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CompareError, match=f"--output: cannot write {blocker / 'r.json'} \\({blocker} is not a folder\\)"):
        run_compare(["--config", str(config), "--seeds", "0", "--output", str(blocker / "r.json")])


class FixedLrClassifier(TinyClassifier):
    """Takes an ``lr`` argument but builds its optimizer at 0.5 whatever it is given."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def test_compare_with_lrs_chooses_each_arms_lr_and_judges_at_the_best_and_at_equal_lrs(dataset, tmp_path, capsys):
    from lightning_fisher.compare.results import choose_learning_rate

    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs")
    output = tmp_path / "results.json"
    code = main(["compare", "--config", str(config), "--lrs", "1e-1,1e-4", "--seeds", "0,1", "--max-steps", "6",
                 "--output", str(output)])
    assert code == 0
    results = json.loads(output.read_text())
    assert results["lrs"] == [1e-4, 1e-1]
    runs = results["runs"]
    assert sorted((r["arm"], r["lr"], r["seed"]) for r in runs) == sorted(
        (a, lr, s) for a in ("flat", "fisher") for lr in (1e-4, 1e-1) for s in (0, 1))
    for arm in ("flat", "fisher"):
        losses = {lr: {r["seed"]: r["val_loss"] for r in runs if r["arm"] == arm and r["lr"] == lr} for lr in (1e-4, 1e-1)}
        ties = {lr: {r["seed"]: r["metrics"]["val_acc"] for r in runs if r["arm"] == arm and r["lr"] == lr}
                for lr in (1e-4, 1e-1)}
        assert results["chosen_lrs"][arm] == choose_learning_rate(losses, tie_scores=ties)
        # 6 steps at 1e-4 barely move the adapters; at 1e-1 they do: the learning rate reached the optimizer
        assert abs(losses[1e-1][0] - losses[1e-4][0]) > 1e-3

    out = capsys.readouterr().out
    assert "learning rates 0.0001, 0.1 (model.init_args.lr)" in out
    best_table, equal_table = out.split("At equal learning rates:")
    chosen = {row.split("|")[1].strip(): row.split("|")[6].strip() for row in best_table.splitlines()
              if row.startswith("| f")}
    assert chosen == {arm: f"{lr:g}" for arm, lr in results["chosen_lrs"].items()}
    assert "val_loss at lr 0.0001" in equal_table and "val_loss at lr 0.1" in equal_table
    winner = min(results["chosen_lrs"], key=lambda arm: sum(
        r["val_loss"] for r in runs if r["arm"] == arm and r["lr"] == results["chosen_lrs"][arm]))
    assert f"at each arm's own best learning rate: {winner} (val_loss" in out
    assert "the seed spread" in out and "(sample std)" in out
    assert "at lr 0.0001, fisher vs flat: val_loss" in out and "at lr 0.1, fisher vs flat: val_loss" in out


def test_compare_lrs_that_do_not_reach_the_optimizer_is_a_clear_error(dataset, tmp_path):
    config = fit_config(tmp_path / "fit.yaml", dataset, tmp_path / "runs", model="test_compare_command.FixedLrClassifier")
    with pytest.raises(CompareError, match=r"lrs: the run was built for learning rate 0.001, but its optimizer's "
                                           r"parameter groups start at 0.5"):
        run_compare(["--config", str(config), "--lrs", "1e-3", "--seeds", "0", "--max-steps", "2"])
    with pytest.raises(CompareError, match=r"--lr_key: 'model.init_args.rate' is not a key of the config"):
        run_compare(["--config", str(config), "--lrs", "1e-3", "--lr-key", "model.init_args.rate"])
    with pytest.raises(CompareError, match=r"--lrs: each must be a positive learning rate, got 0"):
        run_compare(["--config", str(config), "--lrs", "1e-3,0"])


def test_compare_output_has_no_lines_a_user_cannot_act_on(dataset, tmp_path):
    """The console script as a user runs it: one seed, two steps, progress bar and model summary left on."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])))
    script = Path(sys.executable).parent / "lightning-fisher"
    run = subprocess.run(
        [str(script), "compare", "--model", "cli_models.TinyClassifier", "--dataset-dir", str(dataset),
         "--data.batch_size", "8", "--adaptive_lora.adapter_root", "backbone", "--max-steps", "2", "--seeds", "0",
         "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    for noise in ("No seed found", "Seed set to", "GPU available: False", "TPU available: False", "Total params",
                  "/-2", "seed(s)"):
        assert noise not in output, noise
    assert "vs flat LoRA at rank 4: 1 seed, 2 steps per run" in output
    assert "Epoch 0/1" in output  # the progress bar is still there, with an epoch limit that reads right


def test_an_interrupted_compare_says_which_runs_it_kept(dataset, tmp_path):
    from test_cli import ctrl_c_as_in_a_terminal  # SIGINT heard even when the suite runs in the background

    import os
    import signal
    import subprocess
    import sys

    tests = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])))
    output = tmp_path / "results.json"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "lightning-fisher"), "compare", "--model", "cli_models.SlowClassifier",
         "--model.init_args.delay", "0.5", "--dataset-dir", str(dataset), "--data.batch_size", "8",
         "--adaptive_lora.adapter_root", "backbone", "--max-steps", "2", "--seeds", "0", "--output", str(output),
         "--trainer.enable_progress_bar", "false"],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
        preexec_fn=ctrl_c_as_in_a_terminal)
    first_done = False
    for line in process.stdout:
        first_done = first_done or line.startswith("compare [1/2]")
        if first_done and line.startswith("training_step 0"):  # inside the second run
            process.send_signal(signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 130, rest[-3000:]
    assert rest.splitlines()[-1] == f"lightning-fisher compare: interrupted; the results of 1 finished run are in {output}"
    assert [run["arm"] for run in json.loads(output.read_text())["runs"]] == ["flat"]
