"""The quality benchmark's bookkeeping: which runs it plans, which LR it picks, what it refuses.

These decide the published numbers, so they are tested on synthetic run records (no training).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402
from quality_bench.plan import full_plan, staged_plan  # noqa: E402
from quality_bench.protocol import ARMS, HEAD_ONLY, REVIEWS  # noqa: E402
from quality_bench.report import write_report  # noqa: E402
from quality_bench.selection import choose_lr  # noqa: E402
from quality_bench.store import ResultStore  # noqa: E402

ARM = {a.name: a for a in (HEAD_ONLY,) + ARMS}


def record(arm, lr, seed, val_loss, *, test_loss=None, val_acc=0.5, test_acc=0.5, params=1000, task="reviews", **extra):
    return {"task": task, "arm": arm, "lr": lr, "seed": seed, "focus": "", "lora_parameters": params,
            "ranks": {"modules": 2, "min": 8, "median": 8, "max": 8}, "val_loss": val_loss,
            "test_loss": val_loss if test_loss is None else test_loss, "val_acc": val_acc, "test_acc": test_acc,
            "seconds": 1.0, **extra}


def test_choose_lr_compares_lrs_on_the_seeds_they_share():
    # 3e-3 has three seeds, two of them easy; on seed 0 alone (the shared seed) 1e-3 is better
    by_lr = {
        1e-3: [record("eva", 1e-3, 0, 0.80)],
        3e-3: [record("eva", 3e-3, 0, 0.85), record("eva", 3e-3, 1, 0.10), record("eva", 3e-3, 2, 0.10)],
    }
    lr, runs = choose_lr(by_lr)
    assert lr == 1e-3
    assert [r["seed"] for r in runs] == [0]


def test_choose_lr_counts_a_diverged_run_as_worst_and_breaks_ties_by_accuracy():
    diverged = {1e-2: [record("flat", 1e-2, 0, None)], 1e-3: [record("flat", 1e-3, 0, 5.0)]}
    assert choose_lr(diverged)[0] == 1e-3
    tied = {1e-3: [record("flat", 1e-3, 0, 0.80000, val_acc=0.6)],
            3e-3: [record("flat", 3e-3, 0, 0.80005, val_acc=0.7)]}
    assert choose_lr(tied)[0] == 3e-3


def test_staged_arms_sweep_their_own_grid_then_run_the_other_seeds_at_the_chosen_lr(tmp_path):
    store = ResultStore(tmp_path / "q.json")
    eva = ARM["eva"]
    sweep, rest = staged_plan(REVIEWS, (ARM["flat"], eva), store)
    assert [(a.name, lr, seed) for a, lr, seed, _ in sweep] == [("eva", lr, 0) for lr in REVIEWS.lrs_for("eva")]
    assert rest == []  # unknown until the sweep is stored
    assert 1e-4 in REVIEWS.lrs_for("eva") and REVIEWS.lrs_for("fisher_median") == REVIEWS.lrs
    for lr in REVIEWS.lrs_for("eva"):
        store.add_run(record("eva", lr, 0, 1.0 if lr != 3e-4 else 0.5))
    _, rest = staged_plan(REVIEWS, (eva,), store)
    assert [(a.name, lr, seed) for a, lr, seed, _ in rest] == [("eva", 3e-4, 1), ("eva", 3e-4, 2)]


def test_main_arms_get_the_full_grid_and_head_only_runs_at_the_head_lr():
    plan = full_plan(REVIEWS, (HEAD_ONLY, ARM["flat"]))
    assert sorted({(a.name, lr) for a, lr, _, _ in plan}) == sorted(
        [("head_only", REVIEWS.head_lr)] + [("flat", lr) for lr in REVIEWS.lrs_for("flat")])
    assert len(plan) == (1 + len(REVIEWS.lrs_for("flat"))) * len(REVIEWS.seeds)


def test_lrs_on_the_command_line_replace_every_arms_grid():
    (reviews,) = quality.selected_tasks(quality.parse_args(["--task", "reviews", "--lrs", "0.001,0.002"]))
    assert reviews.lrs_for("eva") == reviews.lrs_for("flat") == (0.001, 0.002)
    (default,) = quality.selected_tasks(quality.parse_args(["--task", "reviews"]))
    assert default == REVIEWS


def test_a_results_file_refuses_runs_made_under_another_protocol(tmp_path):
    path = tmp_path / "q.json"
    store = ResultStore(path)
    store.check_protocol(REVIEWS)
    store.save()
    with pytest.raises(SystemExit, match="head_lr"):
        ResultStore(path).check_protocol(replace(REVIEWS, head_lr=REVIEWS.head_lr / 2))
    ResultStore(path).check_protocol(replace(REVIEWS, lrs=(0.5,)))  # grids are not the protocol


def test_report_judges_flat_against_the_probe_and_the_map_against_flat(tmp_path):
    store = ResultStore(tmp_path / "q.json")
    store.set_baseline("reviews", "majority", {"train": 0.55, "val": 0.55, "test": 0.554})
    store.set_baseline("reviews", "linear_probe", {"C": 0.01, "val_loss": 0.8, "val_acc": 0.7,
                                                   "test_loss": 0.80, "test_acc": 0.72})
    store.set_baseline("reviews", "linear_probe_train_val", {"C": 0.01, "train_samples": 600,
                                                             "test_loss": 0.69, "test_acc": 0.745})
    refit = [{"seed": s, "test_acc": a, "test_loss": 0.6} for s, a in enumerate([0.76, 0.77, 0.78])]
    store.set_baseline("reviews", "flat_refit_train_val", {"lr": 1e-3, "train_samples": 600, "runs": refit})
    for seed, (flat, fisher) in enumerate([(0.75, 0.80), (0.76, 0.81), (0.74, 0.79)]):
        store.add_run(record("flat", 1e-3, seed, 0.7, test_loss=0.7, test_acc=flat))
        store.add_run(record("fisher_budget", 1e-3, seed, 0.7, test_loss=0.7, test_acc=fisher))
    text = write_report(store, tmp_path / "q.md", "python benchmarks/quality.py", None)
    assert (tmp_path / "q.md").read_text() == text
    assert "clearly above both" in text  # 0.75 - 0.01 > 0.72
    assert "all 600 training reviews (0.7450; not an equal-data comparison): NOT clearly above in accuracy; " \
           "test loss HIGHER" in text  # 0.74 < 0.745, 0.70 > 0.69
    assert "refitted on all 600 training reviews at its chosen LR 0.001 (3 seeds): test accuracy 0.7700 ± 0.0100" in text
    assert "0.7450 / 0.6900: clearly above in accuracy (mean minus one seed std), loss lower" in text
    fisher_line = next(line for line in text.splitlines() if line.startswith("- Fisher, budget (= flat params) vs flat"))
    assert "+0.0500 test acc, outside the seed spread 0.0100" in fisher_line
    assert "-> better" in fisher_line and "-> parity" in fisher_line  # accuracy better, loss equal
    assert json.loads((tmp_path / "q.json").read_text())["baselines"]["reviews"]["linear_probe"]["C"] == 0.01


def test_refit_waits_for_flat_grid_then_trains_on_all_training_reviews_at_the_chosen_lr(tmp_path, monkeypatch):
    """Bookkeeping only: ``run_one`` (a 3-minute MiniLM fit) is replaced by a recorder."""
    from quality_bench import refit

    calls = []

    def fake_run_one(arm, task, lr, seed, focus, folders, workdir):
        calls.append((arm.name, lr, seed, folders["train"]))
        return {"seed": seed, "test_acc": 0.75, "test_loss": 0.7, "val_loss": 0.1, "val_acc": 0.9, "seconds": 1.0}

    monkeypatch.setattr(refit, "run_one", fake_run_one)
    monkeypatch.setattr(refit, "folder_size", lambda folder: 600)
    folders = {"train": tmp_path / "train480", "train_and_val": tmp_path / "train600"}
    store = ResultStore(tmp_path / "q.json")
    flat_lrs = REVIEWS.lrs_for("flat")
    for lr in flat_lrs:
        for seed in REVIEWS.seeds[:-1]:
            store.add_run(record("flat", lr, seed, 0.5 if lr == 1e-3 else 0.9))
    refit.refit_flat(store, REVIEWS, folders, tmp_path)
    assert calls == [] and store.baseline("reviews", refit.BASELINE) is None  # last seed missing
    for lr in flat_lrs:
        store.add_run(record("flat", lr, REVIEWS.seeds[-1], 0.5 if lr == 1e-3 else 0.9))
    refit.refit_flat(store, REVIEWS, folders, tmp_path)
    assert calls == [("flat", 1e-3, seed, tmp_path / "train600") for seed in REVIEWS.seeds]
    stored = store.baseline("reviews", refit.BASELINE)
    assert stored["lr"] == 1e-3 and stored["train_samples"] == 600
    assert all(not any(k.startswith("val_") for k in r) for r in stored["runs"])
    refit.refit_flat(store, REVIEWS, folders, tmp_path)
    assert len(calls) == len(REVIEWS.seeds)  # resumable: nothing left to run


def cells(line):
    return [cell.strip() for cell in line.split("|")[1:-1]]


def digits_store(path, *, measured=True):
    """Digits runs of flat and the equal-budget map at two LRs x 3 seeds, and one EVA run from before the measures."""
    store = ResultStore(path)
    store.set_baseline("digits", "pretrained", {"val_loss": 0.68, "test_loss": 0.64})
    if measured:
        store.set_baseline("digits", "pretrained_low_half", {"test_loss": 0.60})
    for seed in range(3):
        for lr, (flat_forget, map_forget) in {1e-3: (0.02, 0.01), 1e-2: (0.06, 0.03)}.items():
            for arm, forget, val in (("flat", flat_forget, 0.61 if lr == 1e-2 else 0.62), ("fisher_budget", map_forget, 0.615)):
                extra = {"first_epoch_val_loss": val + 0.05 + 0.001 * seed,
                         "pretrain_test_loss": 0.60 + forget + 0.001 * seed} if measured else {}
                run = record(arm, lr, seed, val + 0.001 * seed, test_loss=val - 0.02, task="digits", **extra)
                store.add_run({k: v for k, v in run.items() if k not in ("val_acc", "test_acc")})
    store.add_run({k: v for k, v in record("eva", 1e-3, 0, 0.63, task="digits").items() if k not in ("val_acc", "test_acc")})
    return store


def test_report_tabulates_first_epoch_loss_and_forgetting_at_every_lr_and_draws_the_figure(tmp_path):
    store = digits_store(tmp_path / "quality.json")
    for seed in range(2):  # a head-only fit runs at the head LR: it has no adapter LR to compare at
        run = record("head_only", 1e-2, seed, 0.9, task="digits", first_epoch_val_loss=0.5 + 0.01 * seed)
        store.add_run({k: v for k, v in run.items() if k not in ("val_acc", "test_acc")})
    text = write_report(store, tmp_path / "quality.md", "python benchmarks/quality.py --task digits", None)
    first = text[text.index("### How fast"):text.index("### Forgetting")]
    flat_row = next(line for line in first.splitlines() if line.startswith("| flat LoRA"))
    # flat chooses 1e-2 (val 0.61 < 0.62); epoch-1 losses 0.66, 0.661, 0.662 there
    assert cells(flat_row)[1:3] == ["0.01", "0.6610 ± 0.0010 (n=3)"]
    assert "| PEFT EVA (= flat total rank) | 0.001 | not measured |" in first
    # the map's epoch-1 loss is 0.665 (+ 0.001 * seed) at both LRs, flat's 0.670 at 1e-3 and 0.660 at 1e-2
    line = next(line for line in first.splitlines() if line.startswith("- Fisher, budget (= flat params)"))
    assert "loss after epoch 1 less at 1, more at 1, parity at 0 of 2 LRs" in line
    assert "0.001: -0.0050 (less, spread 0.0010)" in line and "0.01: +0.0050 (more, spread 0.0010)" in line
    assert not any(line.startswith("- head only") for line in first.splitlines())

    forgetting = text[text.index("### Forgetting"):]
    assert "minus the pretrained model's 0.6000" in forgetting
    header = next(line for line in forgetting.splitlines() if line.startswith("| arm"))
    assert header.endswith("| forgetting at LR 0.001 | forgetting at LR 0.01 |")
    flat_row = next(line for line in forgetting.splitlines() if line.startswith("| flat LoRA"))
    assert cells(flat_row)[3:] == ["+0.0610 ± 0.0010 (n=3)", "+0.0210 ± 0.0010 (n=3)", "+0.0610 ± 0.0010 (n=3)"]
    eva_row = next(line for line in forgetting.splitlines() if line.startswith("| PEFT EVA"))
    assert cells(eva_row)[3:] == ["not measured", "not measured", "-"]
    line = next(line for line in forgetting.splitlines() if line.startswith("- Fisher, budget (= flat params) vs"[:31]))
    assert "forgets less at 2, more at 0, parity at 0 of 2 LRs" in line and "0.001: -0.0100 (less, spread 0.0010)" in line
    assert "![adaptation loss against forgetting per arm across LRs](forgetting_digits.png)" in forgetting
    assert (tmp_path / "forgetting_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_from_before_the_measures_are_reported_as_not_measured_and_get_no_figure(tmp_path):
    store = digits_store(tmp_path / "old.json", measured=False)
    text = write_report(store, tmp_path / "old.md", "python benchmarks/quality.py", None)
    assert "Validation loss after the first epoch: not measured in the stored runs" in text
    assert "Forgetting (loss on the pretraining half, digits 0-4): not measured in the stored runs" in text
    # no forgetting figure; the frontier needs only the test losses every run has
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["old_frontier_digits.png"]


def test_remeasure_replaces_a_stored_run_and_keeps_its_numbers(tmp_path):
    from quality_bench.measures import MEASURES
    from quality_bench.measures_report import remeasured_lines

    store = ResultStore(tmp_path / "q.json")
    old = record("flat", 1e-3, 0, 0.70, task="digits")
    store.add_run(old)
    key = ("digits", "flat", 1e-3, 0, "")
    assert store.lacks(key, MEASURES["digits"])
    store.add_run({**old, "val_loss": 0.70000001, "first_epoch_val_loss": 0.8, "pretrain_test_loss": 0.61})
    runs = ResultStore(tmp_path / "q.json").runs("digits")
    assert len(runs) == 1 and runs[0]["previous"]["val_loss"] == 0.70 and runs[0]["first_epoch_val_loss"] == 0.8
    assert not store.lacks(key, MEASURES["digits"])
    assert remeasured_lines(runs) == ["- 1 runs re-measured (`--remeasure`, to add the measures below): 0 reproduced "
                                      "the replaced run's stored numbers exactly; largest difference 1.00e-08"]
    assert quality.parse_args(["--task", "digits", "--remeasure"]).remeasure


def test_remeasure_reruns_fisher_runs_whose_map_stopped_by_an_older_rule(tmp_path, monkeypatch):
    from lightning_fisher.fisher_map.records import STOPPING_METHODS
    from quality_bench import plan as plan_module
    from quality_bench.measures_report import remeasured_lines

    measured = dict(first_epoch_val_loss=0.8, pretrain_test_loss=0.6)
    store = ResultStore(tmp_path / "q.json")
    # recorded before the method was: the spectrum arm's map stopped by the trace ranking's rule
    store.add_run(record("fisher_spectrum", 1e-3, 0, 0.70, task="digits", **measured))
    store.add_run(record("fisher_budget", 1e-3, 0, 0.71, task="digits", **measured))
    store.add_run(record("flat", 1e-3, 0, 0.72, task="digits", **measured))
    assert store.stopped_by_another_rule(("digits", "fisher_spectrum", 1e-3, 0, ""), STOPPING_METHODS["spectrum"])
    assert not store.stopped_by_another_rule(("digits", "fisher_budget", 1e-3, 0, ""), STOPPING_METHODS["trace"])
    ran = []

    def fake_run(arm, task, lr, seed, focus, folders, workdir):
        ran.append(arm.name)
        return record(arm.name, lr, seed, 0.69, task="digits", analysis_stop_method=STOPPING_METHODS[arm.criterion],
                      **measured)

    monkeypatch.setattr(plan_module, "run_one", fake_run)
    monkeypatch.setattr(plan_module, "current_allocation", lambda *args: {})  # the allocation is unchanged
    plan = [(ARM[name], 1e-3, 0, "") for name in ("fisher_spectrum", "fisher_budget", "flat")]
    digits = replace(REVIEWS, name="digits")
    plan_module.run_plan(store, digits, plan, {}, tmp_path, "test")
    assert ran == []  # without --remeasure, stored runs stay
    plan_module.run_plan(store, digits, plan, {}, tmp_path, "test", remeasure=True)
    assert ran == ["fisher_spectrum"]
    runs = store.runs("digits")
    assert remeasured_lines(runs) == [
        "- 1 Fisher runs re-run (`--remeasure`) because their map's analysis now stops by another rule "
        f"({STOPPING_METHODS['spectrum']}); the replaced runs' numbers are kept in the JSON under `previous`"
    ]


def test_remeasure_reruns_fisher_runs_whose_map_the_allocator_now_gives_other_ranks(tmp_path, monkeypatch):
    from lightning_fisher.fisher_map.records import STOPPING_METHODS
    from quality_bench import plan as plan_module
    from quality_bench.measures_report import remeasured_lines

    measured = dict(first_epoch_val_loss=0.8, pretrain_test_loss=0.6, analysis_stop_method=STOPPING_METHODS["trace"])
    old = {"modules": 22, "min": 1, "median": 3.0, "max": 16}  # a rank above a 4-wide module's size
    capped = {"modules": 22, "min": 1, "median": 3.0, "max": 8}
    store = ResultStore(tmp_path / "q.json")
    store.add_run(record("fisher_budget", 1e-3, 0, 0.70, task="digits", ranks=old, map_lora_parameters=12288, **measured))
    store.add_run(record("fisher_budget_50", 1e-3, 0, 0.71, task="digits", ranks=capped, map_lora_parameters=6100,
                         **measured))
    current = {"fisher_budget": {"ranks": capped, "map_lora_parameters": 12300, "map_ranks": {"a": 8}},
               "fisher_budget_50": {"ranks": capped, "map_lora_parameters": 6100, "map_ranks": {"a": 8}}}
    assert store.allocated_otherwise(("digits", "fisher_budget", 1e-3, 0, ""), current["fisher_budget"])
    # compared on the fields the stored run has: an older run without map_ranks is not stale for lacking it
    assert not store.allocated_otherwise(("digits", "fisher_budget_50", 1e-3, 0, ""), current["fisher_budget_50"])
    ran = []

    def fake_run(arm, task, lr, seed, focus, folders, workdir):
        ran.append(arm.name)
        return record(arm.name, lr, seed, 0.69, task="digits", **current[arm.name], **measured)

    monkeypatch.setattr(plan_module, "run_one", fake_run)
    monkeypatch.setattr(plan_module, "current_allocation", lambda arm, *args: current[arm.name])
    plan = [(ARM[name], 1e-3, 0, "") for name in ("fisher_budget", "fisher_budget_50")]
    plan_module.run_plan(store, replace(REVIEWS, name="digits"), plan, {}, tmp_path, "test", remeasure=True)
    assert ran == ["fisher_budget"]
    rerun = next(r for r in store.runs("digits") if r["arm"] == "fisher_budget")
    assert rerun["previous"]["ranks"] == old and rerun["previous"]["test_loss"] == 0.70 and rerun["test_loss"] == 0.69
    assert remeasured_lines(store.runs("digits")) == [
        "- 1 Fisher runs re-run (`--remeasure`) because this version allocates their map other ranks (no rank above a "
        "module's size since Dec 2026); the replaced runs' numbers are kept in the JSON under `previous`"
    ]


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """Digits folders as the benchmark lays them out, with a 1-epoch pretrained checkpoint (seconds, not minutes)."""
    pytest.importorskip("sklearn")
    from lightning_fisher.examples.digits_flow import CHECKPOINT_NAME, pretrain_digits_flow, write_digits_dataset
    from quality_bench.data import split_folder

    root = tmp_path_factory.mktemp("digits")
    full = write_digits_dataset(root / "train", "high", "train")
    test = write_digits_dataset(root / "test", "high", "test")
    pretrain_digits_flow(root / "pretrained" / CHECKPOINT_NAME, epochs=1)
    train, val = split_folder(full, root / "train_fit", root / "val", val_count=64)
    return {"train": train, "val": val, "test": test, "checkpoint": root / "pretrained"}


def test_a_digits_run_records_first_epoch_loss_and_forgetting_without_changing_the_training(tiny_digits, tmp_path,
                                                                                           monkeypatch):
    from lightning_fisher.examples.digits_flow import DigitsFlowMatching, digits_split, held_out_denoising_loss
    from quality_bench import measures
    from quality_bench.protocol import DIGITS
    from quality_bench.runs import run_one

    one_epoch = replace(DIGITS, epochs=1, limit_train_batches=2, limit_eval_batches=1)
    run = run_one(ARM["flat"], one_epoch, 1e-2, 0, "", tiny_digits, tmp_path)
    # after one epoch the measure is the final validation, computed the same way
    assert run["first_epoch_val_loss"] == pytest.approx(run["val_loss"], abs=1e-6)
    pretrained = DigitsFlowMatching(checkpoint_dir=str(tiny_digits["checkpoint"]))
    low = digits_split("low").test_images[:64]
    before = held_out_denoising_loss(pretrained, low, batch_size=64)
    assert measures.pretraining_half_loss(one_epoch, pretrained) == pytest.approx(before)
    assert run["pretrain_test_loss"] != pytest.approx(before, abs=1e-6)  # adaptation moved it

    two_epochs = replace(one_epoch, epochs=2)
    measured = run_one(ARM["flat"], two_epochs, 1e-2, 0, "", tiny_digits, tmp_path)
    monkeypatch.setattr(measures.FirstEpochValidation, "on_train_epoch_end", lambda *args: None)
    unmeasured = run_one(ARM["flat"], two_epochs, 1e-2, 0, "", tiny_digits, tmp_path)
    assert measured["first_epoch_val_loss"] is not None and unmeasured["first_epoch_val_loss"] is None
    assert (measured["val_loss"], measured["test_loss"]) == (unmeasured["val_loss"], unmeasured["test_loss"])


def test_reviews_held_out_loss_is_the_batch_weighted_cross_entropy_in_eval_mode():
    import torch
    from torch import nn

    from quality_bench.measures import held_out_loss

    class Classifier(nn.Module):
        """MiniLMClassifier's call signature: logits from (input_ids, attention_mask)."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 9)
            self.dropout = nn.Dropout(0.9)
            self.frozen = nn.Linear(1, 1)

        def forward(self, input_ids, attention_mask):
            return self.dropout((self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(1))

    torch.manual_seed(0)
    samples = [{"input_ids": torch.randint(0, 50, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
                "label": torch.tensor(i % 9)} for i in range(40)]
    model = Classifier().train()
    model.frozen.eval()  # a submodule kept in eval mode during training stays so
    task = replace(REVIEWS, limit_eval_batches=2)  # batches of 16: 16 + 16 of the 40 samples
    loss = held_out_loss(task, model, samples)
    with torch.no_grad():
        logits = model.embed(torch.stack([s["input_ids"] for s in samples[:32]])).mean(1)
        expected = nn.functional.cross_entropy(logits, torch.stack([s["label"] for s in samples[:32]]))
    assert loss == pytest.approx(float(expected), rel=1e-6)  # dropout off, mean over the 32 samples
    assert model.training and model.dropout.training and not model.frozen.training


# --- the frontier (issue 19): flat twins at every map budget, each map judged against its twin ---


def test_every_budget_map_has_a_flat_twin_at_its_rank_on_the_full_grid():
    from quality_bench.frontier import family_arms, twin
    from quality_bench.protocol import DIGITS

    for task, ranks in ((DIGITS, {0.25: 1, 0.5: 2, 1.0: 4, 2.0: 8}), (REVIEWS, {0.25: 2, 0.5: 4, 1.0: 8, 2.0: 16})):
        flat = family_arms("flat")
        assert {a.rank_fraction: a.base_rank(task) for a in flat} == ranks
        assert all(a.main for a in flat)  # full LR x seed grid, like flat LoRA at the base rank
        assert task.rank_max >= 2 * task.rank  # the 200 % map may give a module the 200 % flat rank or more
        for name in ("trace", "spectrum"):
            maps = family_arms(name)
            assert [a.rank_fraction for a in maps] == [0.25, 0.5, 1.0, 2.0]
            assert [twin(a).name for a in maps] == ["flat_25", "flat_50", "flat", "flat_200"]
            quarter = maps[0]
            assert quarter.min_rank(task) == twin(quarter).min_rank(task) == 1
    plan = full_plan(REVIEWS, (ARM["flat_200"],))
    assert sorted({lr for _, lr, _, _ in plan}) == sorted(REVIEWS.lrs_for("flat")) and len(plan) == 4 * 3
    assert "fisher_budget_200" in REVIEWS.default_arms and not ARM["fisher_budget_200"].main


def test_a_map_at_a_budget_spends_at_most_its_flat_twins_parameters():
    """The 200 % map re-allocated from a base map has the parameters of flat LoRA at twice the rank (PEFT's count)."""
    import peft
    import torch
    from torch import nn

    from lightning_fisher import AllocationSettings
    from lightning_fisher.fisher_map.map import FisherMap
    from quality_bench.frontier import twin
    from quality_bench.protocol import DIGITS
    from quality_bench.runs import arm_fisher_map, lora_parameter_count

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 8))
    scores = {"0": 4.0, "2": 1.0, "4": 0.25}
    base = FisherMap.from_scores(scores, model, allocation=AllocationSettings(
        rank=DIGITS.rank, rank_min=DIGITS.rank_min, rank_max=DIGITS.rank_max, mode="budget"))
    for name in ("fisher_budget_25", "fisher_budget_50", "fisher_budget", "fisher_budget_200"):
        arm = ARM[name]
        fisher_map = arm_fisher_map(arm, DIGITS, base, model)
        rank = twin(arm).base_rank(DIGITS)
        flat = peft.get_peft_model(nn.Sequential(*[nn.Linear(m.in_features, m.out_features) if isinstance(m, nn.Linear)
                                                   else m for m in model]),
                                   peft.LoraConfig(r=rank, target_modules=["0", "2", "4"]))
        flat_parameters = lora_parameter_count(flat)
        assert flat_parameters == rank * (24 + 40 + 40 + 40 + 40 + 8)
        assert fisher_map.budget.flat_lora_parameters == flat_parameters
        assert 0.9 * flat_parameters <= fisher_map.budget.lora_parameters <= flat_parameters


def frontier_store(path):
    """Digits runs: flat at 50 % and 100 % on two LRs x 3 seeds, maps at 50 % (staged: one LR off the chosen one)."""
    store = ResultStore(path)
    store.set_baseline("digits", "pretrained", {"val_loss": 0.68, "test_loss": 0.64})

    def add(arm, lr, seed, test_loss, val_loss, params, focus=""):
        run = record(arm, lr, seed, val_loss, test_loss=test_loss, task="digits", params=params)
        store.add_run({**{k: v for k, v in run.items() if k not in ("val_acc", "test_acc")}, "focus": focus})

    noise = (-0.001, 0.0, 0.001)
    for seed in range(3):
        for lr in (1e-3, 1e-2):
            add("flat", lr, seed, 0.586 + noise[seed], 0.61 if lr == 1e-2 else 0.62, 12320)
            add("flat_50", lr, seed, 0.591 + noise[seed] + (0.002 if lr == 1e-3 else 0), 0.61 if lr == 1e-2 else 0.62,
                6160)
        # the trace map at 50 %: chose 1e-2, better than its twin beyond the spread; the spectrum one worse
        add("fisher_budget_50", 1e-2, seed, 0.585 + noise[seed], 0.60, 6100, focus="balanced")
        add("fisher_spectrum_50", 1e-2, seed, 0.5935 + noise[seed], 0.60, 6050, focus="balanced")
        add("fisher_budget", 1e-2, seed, 0.5865 + 2 * noise[seed], 0.60, 12288, focus="balanced")
    add("fisher_budget_50", 1e-3, 0, 0.60, 0.65, 6100, focus="balanced")  # its sweep's other LR: one seed
    add("fisher_spectrum_50", 1e-3, 0, 0.60, 0.65, 6050, focus="balanced")
    return store


def test_frontier_table_pairs_each_map_with_its_flat_twin_and_judges_by_the_seed_spread(tmp_path):
    from quality_bench.frontier import frontier_pairs, frontier_table
    from quality_bench.selection import arm_rows

    store = frontier_store(tmp_path / "quality.json")
    rows = arm_rows("digits", store.runs("digits"))
    pairs = {(p["arm"].name, p["focus"]): p for p in frontier_pairs("digits", rows)}
    assert pairs[("fisher_budget_50", "balanced")]["twin_row"]["arm"] == "flat_50"
    assert pairs[("fisher_budget", "balanced")]["twin_row"]["arm"] == "flat"
    assert pairs[("fisher_budget_200", None)]["row"] is None and pairs[("fisher_budget_200", None)]["twin_row"] is None

    table = frontier_table("digits", rows)
    line = {tuple(cells(l)[:3]): cells(l) for l in table if l.startswith("| Fisher")}
    trace_50 = line[("Fisher map, trace", "50 %", "balanced")]
    # map 0.585 ± 0.001 at 1e-2 against flat_50's 0.591 ± 0.001 at 1e-2 (its choice: 0.61 < 0.62)
    assert trace_50[3:] == ["6,100 / 6,160", "0.01 / 0.01", "0.5850 ± 0.0010 (n=3)", "0.5910 ± 0.0010 (n=3)",
                            "-0.0060 (spread 0.0010): **better**",
                            "0.01: -0.0060 (spread 0.0010) better; 1 LR with one seed (not judged)"]
    spectrum_50 = line[("Fisher map, spectrum", "50 %", "balanced")]
    assert spectrum_50[7] == "+0.0025 (spread 0.0010): **worse**"
    # at full budget: +0.0005 against a spread of 0.002 -> parity, against flat LoRA at rank 4, not rank 2
    assert line[("Fisher map, trace", "100 %", "balanced")][6:8] == ["0.5860 ± 0.0010 (n=3)",
                                                                       "+0.0005 (spread 0.0020): **parity**"]
    assert line[("Fisher map, trace", "200 %", "-")][5:7] == ["not yet measured",
                                                              "not yet measured (flat LoRA 200 %, rank 8)"]
    assert "- test loss, at the chosen LRs: better 1, parity 1, worse 1 of 3 measured map / twin pairs" in table


def test_frontier_figure_is_drawn_from_the_stored_runs_and_written_atomically(tmp_path, monkeypatch):
    from quality_bench import frontier

    written = []
    real_write = frontier.write_bytes_atomic

    def spy(path, data, **options):
        written.append(path)
        return real_write(path, data, **options)

    monkeypatch.setattr(frontier, "write_bytes_atomic", spy)
    store = frontier_store(tmp_path / "quality.json")
    text = write_report(store, tmp_path / "quality.md", "python benchmarks/quality.py --task digits", None)
    figure = tmp_path / "frontier_digits.png"
    assert written == [figure] and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier_digits.png", "quality.json", "quality.md"]
    assert "![digits: test metric against LoRA parameters per family](frontier_digits.png)" in text
    assert ("- not yet measured on digits: flat LoRA 25 %, flat LoRA 200 %, Fisher map, trace 25 %, Fisher map, "
            "trace 200 %, Fisher map, spectrum 25 %, Fisher map, spectrum 100 %, Fisher map, spectrum 200 %") in text
    # --report-only redraws it from the results file alone
    figure.unlink()
    quality.main(["--report-only", "--results", str(tmp_path / "quality.json")])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = write_report(store, tmp_path / "other.md", "x", None)
    assert "(other_frontier_digits.png)" in other and (tmp_path / "other_frontier_digits.png").is_file()
