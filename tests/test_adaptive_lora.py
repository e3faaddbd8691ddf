import dataclasses
import logging

import _tasks
import lightning.pytorch as pl
import peft
import pytest
import torch
from torch import nn

from lightning_fisher import (
    AdapterRankMismatchError,
    AdaptiveLoRA,
    FisherMap,
    FisherMapNotFoundError,
    FragileModelError,
    ModelMismatchError,
    analyze,
    save_adapter,
)
from lightning_fisher.peft_factory import adapter_ranks

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)


class Net(nn.Module):
    def __init__(self, width=16, classes=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6 if i == 0 else width, width) for i in range(11))
        self.pooler = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)  # pooler unused: its score is zero, so the map excludes it


class Task(_tasks.Task):
    """``Net`` as ``task.model`` and a head, the same weights each time; the tests below subclass it."""

    def __init__(self, lr=1e-2, classes=4):
        super().__init__(lambda: Net(classes=classes), head=lambda: nn.Linear(classes, classes), lr=lr, log_loss=True)


def data():
    return _tasks.classification_data(64, 6, classes=4)


@pytest.fixture(scope="module")
def fisher_map(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maps")
    return analyze(
        Task(), data(), output=folder, rank=4, rank_min=1, rank_max=12, exclude=["head"],
        convergence_patience=2, min_batches=2, stability_threshold=0.0, trainer_kwargs=QUIET,
    )


def fit(task, callback, epochs=1, **kwargs):
    kwargs.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, callbacks=[callback], **QUIET, **kwargs)
    trainer.fit(task, train_dataloaders=data())
    return trainer


def test_map_ranks_applied_before_optimizer(fisher_map):
    assert "model.pooler" in fisher_map.excluded and len(set(fisher_map.ranks.values())) > 2
    task = Task(lr=1e-5)
    callback = AdaptiveLoRA(fisher_map=fisher_map.path, adapter_root="model")
    adapted = next(name for name in fisher_map.ranks if name.startswith("model.layers."))[len("model."):]
    before = task.model.get_submodule(adapted).weight.detach().clone()
    fit(task, callback)
    expected = {name[len("model."):]: r for name, r in fisher_map.ranks.items()}
    assert adapter_ranks(task.model) == expected
    assert type(task.model.pooler) is nn.Linear  # excluded: no adapter
    layer = task.model.get_submodule(adapted)
    assert torch.equal(layer.base_layer.weight, before)  # base weights frozen
    assert task.head.weight.requires_grad  # outside the adapter root: trained fully
    assert layer.lora_B["default"].weight.abs().sum() > 0  # the optimizer saw the adapters and trained them
    assert "Fisher map detected" in callback.summary
    assert f"{len(fisher_map.excluded)} excluded: " in callback.summary and "pooler" in callback.summary
    assert f"{fisher_map.budget.lora_parameters:,}" in callback.summary


def test_map_found_in_dataset_dir(fisher_map):
    task = Task(lr=1e-5)
    callback = AdaptiveLoRA(dataset_dir=fisher_map.path.parent, adapter_root="model")
    fit(task, callback)
    assert callback.applied_map == fisher_map


def test_the_run_folder_records_which_map_was_applied(fisher_map, tmp_path):
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    task = Task(lr=1e-5)
    callback = AdaptiveLoRA(dataset_dir=fisher_map.path.parent, adapter_root="model")
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="run", version=0), callbacks=[callback],
                         enable_checkpointing=False, **QUIET)
    trainer.fit(task, train_dataloaders=data())
    record = yaml.safe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())["fisher_map"]
    assert record["applied"] == str(fisher_map.path)
    assert record["model_fingerprint"] == fisher_map.model.fingerprint
    assert (record["criterion"], record["mode"], record["rank"]) == ("trace", fisher_map.budget.mode, 4)
    assert record["ranks"] == {name[len("model."):]: r for name, r in fisher_map.ranks.items()}
    assert record["trainable_adapter_parameters"] == fisher_map.budget.lora_parameters
    assert record["parameters_vs_flat"] == pytest.approx(
        fisher_map.budget.lora_parameters / record["flat_lora_parameters"], abs=1e-4)

    flat = AdaptiveLoRA(dataset_dir=fisher_map.path.parent, adapter_root="model", ignore_fisher_map=True)
    trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="flat", version=0), callbacks=[flat],
                         enable_checkpointing=False, **QUIET)
    trainer.fit(Task(lr=1e-5), train_dataloaders=data())
    record = yaml.safe_load((tmp_path / "flat" / "version_0" / "hparams.yaml").read_text())["fisher_map"]
    assert record["applied"] == "flat LoRA (map ignored)" and set(record["ranks"].values()) == {4}


def test_ignore_fisher_map_gives_flat_ranks(fisher_map):
    task = Task()
    callback = AdaptiveLoRA(
        dataset_dir=fisher_map.path.parent, ignore_fisher_map=True, adapter_root="model", lora_kwargs={"r": 4}
    )
    fit(task, callback)
    ranks = adapter_ranks(task.model)
    assert set(ranks.values()) == {4}
    assert set(ranks) == {f"layers.{i}" for i in range(11)} | {"pooler", "out"}
    assert "fisher map ignored" in callback.summary


def test_no_map_in_folder_means_flat(tmp_path):
    task = Task()
    fit(task, AdaptiveLoRA(dataset_dir=tmp_path, adapter_root="model", lora_kwargs={"r": 2, "target_modules": ["out"]}))
    assert adapter_ranks(task.model) == {"out": 2}


def test_explicit_missing_map_is_an_error(tmp_path):
    with pytest.raises(FisherMapNotFoundError, match="fisher_map.json"):
        fit(Task(), AdaptiveLoRA(fisher_map=tmp_path, adapter_root="model"))


def test_overridden_settings_reported(fisher_map):
    callback = AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", lora_kwargs={"r": 32, "lora_dropout": 0.1})
    task = Task(lr=1e-5)
    fit(task, callback)
    assert "settings replaced by the map: r=32" in callback.summary
    assert task.model.out.lora_dropout["default"].p == 0.1


def lr_warnings(record):
    return [str(w.message) for w in record if "learning rate" in str(w.message)]


def test_learning_rate_warning_is_relative_to_flat_lora(fisher_map, recwarn):
    # alpha/r constant: every module has flat LoRA's scaling, so no learning rate is "too high"
    fit(Task(lr=1e-2), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model"))
    assert lr_warnings(recwarn) == []

    # rsLoRA: alpha constant, scaling alpha/sqrt(r), largest at the smallest rank
    fit(Task(lr=1e-2), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", lora_kwargs={"use_rslora": True}))
    name, rank = min(fisher_map.ranks.items(), key=lambda item: item[1])
    ratio = (4 / rank) ** 0.5  # flat LoRA: alpha 8 at rank 4, scaling 8/sqrt(4)
    assert rank < 4 and lr_warnings(recwarn) == [
        f"the fisher map raises the largest adapter scaling to {ratio:.2f}x flat LoRA's at rank 4 "
        f"({name[len('model.'):]}: rank {rank}, alpha 8, scaling {8 / rank ** 0.5:.3g} vs 4), so at learning rate "
        f"0.01 its largest step is {ratio:.2f}x flat LoRA's; for the same largest step use about {0.01 / ratio:.2g} "
        "and watch validation closely"
    ]


def test_learning_rate_ceiling_when_set_and_for_fragile_models(fisher_map, recwarn):
    fit(Task(lr=1e-2), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", lr_warning_threshold=1e-3))
    assert lr_warnings(recwarn) == [
        "adapter learning rate 0.01 is above 0.001 (lr_warning_threshold): a fisher map concentrates adapter "
        "capacity where the data pulls hardest, so it adapts faster and can overfit sooner than flat ranks; "
        "consider at most 0.001 and watch validation closely"
    ]
    recwarn.clear()
    fit(Task(lr=1e-2), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", fragile=True, allow_fragile=True))
    assert lr_warnings(recwarn)[0].startswith(
        "adapter learning rate 0.01 is above 0.0001 (the ceiling for models marked fragile; set "
        "lr_warning_threshold to change it)"
    )
    recwarn.clear()
    fit(Task(lr=1e-5), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", fragile=True, allow_fragile=True))
    assert lr_warnings(recwarn) == []


def test_fragile_model_needs_opt_in(fisher_map):
    with pytest.raises(FragileModelError, match="allow_fragile=True"):
        fit(Task(), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", fragile=True))
    task = Task(lr=1e-5)
    fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", fragile=True, allow_fragile=True))
    assert adapter_ranks(task.model)
    # flat ranks on a fragile model are what the seed recommends: no opt-in needed
    fit(Task(), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", fragile=True, ignore_fisher_map=True))


def test_map_for_another_model_is_an_error_listing_modules(fisher_map):
    class Wider(Task):
        def __init__(self):
            super().__init__()
            self.model.layers[5] = nn.Linear(16, 16, bias=False)
            self.model.layers[7] = nn.Linear(16, 16)
            del self.model.layers[10]

    with pytest.raises(ModelMismatchError) as excinfo:
        fit(Wider(), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model"))
    message = str(excinfo.value)
    assert "missing in model: model.layers.10" in message
    assert str(fisher_map.path) in message and "strict=False" in message

    class OtherHead(Task):
        def __init__(self):
            super().__init__(classes=4)
            self.head = nn.Linear(4, 7)

    with pytest.raises(ModelMismatchError, match="other parameters differ"):
        fit(OtherHead(), AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model"))
    with pytest.warns(UserWarning, match="other parameters differ"):
        task = OtherHead()
        task.lr = 1e-5
        fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", strict=False))
    assert adapter_ranks(task.model)


def test_tampered_map_fails_rank_verification(fisher_map, monkeypatch):
    from lightning_fisher.training import adaptive_lora

    real_plan = adaptive_lora.plan_from_fisher_map

    def plan_with_a_wrong_rank(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        pattern = dict(plan.config.rank_pattern)
        key = next(iter(pattern))
        pattern[key] += 1
        return dataclasses.replace(plan, config=dataclasses.replace(plan.config, rank_pattern=pattern))

    monkeypatch.setattr(adaptive_lora, "plan_from_fisher_map", plan_with_a_wrong_rank)
    task = Task()
    with pytest.raises(AdapterRankMismatchError, match="adapter rank"):
        fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model"))
    assert_as_built(task)


def assert_as_built(task):
    """The model is as its constructor left it: no adapter layer, every weight trainable, no PEFT config."""
    fresh = type(task)()
    assert [type(m) for m in task.modules()] == [type(m) for m in fresh.modules()]
    assert task.state_dict().keys() == fresh.state_dict().keys()
    assert all(p.requires_grad for p in task.parameters())
    assert not hasattr(task.model, "peft_config")


def test_an_injection_peft_refuses_leaves_the_model_as_it_was(fisher_map):
    class Replaced(Task):
        def __init__(self):
            super().__init__()
            self.model.layers[3] = nn.Identity()  # after layers 0-2, which PEFT wraps first

    task = Replaced()
    assert "model.layers.3" in fisher_map.ranks
    with pytest.warns(UserWarning, match="shape differs: model.layers.3"), pytest.raises(ValueError, match="Identity"):
        fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", strict=False))
    assert_as_built(task)


def test_summary_counts_flat_lora_on_the_model_trained(fisher_map):
    class MoreClasses(Task):
        def __init__(self):
            super().__init__(classes=7)  # model.out: [7, 16] here, [4, 16] in the map

    callback = AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", strict=False)
    task = MoreClasses()
    task.lr = 1e-5
    with pytest.warns(UserWarning, match="shape differs: model.out"):
        fit(task, callback)
    flat = fisher_map.budget.flat_lora_parameters + 4 * 3  # out's rank cost is 16 + 7, not 16 + 4
    line = next(line for line in callback.summary.splitlines() if "trainable adapter parameters" in line)
    assert line.endswith(f"flat rank 4 on all {len(fisher_map.modules)} candidates ({flat:,})")


def test_summary_counts_the_models_candidates_and_names_those_the_map_lacks(fisher_map):
    # a map without model.layers.5, consistent in itself (it validates), applied to the full model
    scores = {name: score for name, score in fisher_map.scores.items() if name != "model.layers.5"}
    partial = FisherMap.from_scores(scores, Task(), rank=4, rank_min=1, rank_max=12)
    assert "model.layers.5" not in {m.name for m in partial.modules}
    callback = AdaptiveLoRA(fisher_map=partial, adapter_root="model")
    task = Task(lr=1e-5)
    fit(task, callback)
    assert "layers.5" not in adapter_ranks(task.model)
    lines = callback.summary.splitlines()
    adapted = len(partial.ranks)
    assert lines[1] == f"  modules adapted: {adapted} / 13 candidates on the model ({len(partial.excluded)} excluded: " \
        f"{', '.join(n[len('model.'):] for n in partial.excluded)})"
    assert lines[2] == ("  not in the fisher map, so no adapter: 1 candidate module of this model (layers.5); analyse "
                        "this model again to score them")


def test_resume_restores_adapter_shapes_and_weights(fisher_map, tmp_path):
    task = Task(lr=1e-5)
    trainer = fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model"), default_root_dir=tmp_path)
    checkpoint = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = {k: v.clone() for k, v in task.state_dict().items() if "lora_" in k}
    assert torch.load(checkpoint, weights_only=False)["lightning_fisher"]["adapter_ranks"] == adapter_ranks(task.model)

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items() if "lora_" in k}

    snapshot = Snapshot()
    resumed = Task(lr=1e-5)
    callbacks = [AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model"), snapshot]
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, callbacks=callbacks, **QUIET)
    trainer.fit(resumed, train_dataloaders=data(), ckpt_path=checkpoint)
    assert trainer.current_epoch == 2  # one more epoch after the restored one
    assert adapter_ranks(resumed.model) == adapter_ranks(task.model)
    assert snapshot.state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(snapshot.state[key], value), key


def test_resume_with_a_changed_map_names_the_modules(fisher_map, tmp_path):
    task = Task(lr=1e-5)
    trainer = fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model"))
    checkpoint = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint)
    other = FisherMap.from_scores(
        {name: (1.0 if name != "model.layers.2" else 50.0) for name in fisher_map.scores}, Task(),
        rank=4, rank_min=1, rank_max=12,
    )
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[AdaptiveLoRA(fisher_map=other, adapter_root="model")], **QUIET
    )
    with pytest.raises(ModelMismatchError, match="map changed since the checkpoint"):
        trainer.fit(Task(), train_dataloaders=data(), ckpt_path=checkpoint)


def test_export_loads_with_peft_model_from_pretrained(fisher_map, tmp_path):
    task = Task(lr=1e-2)
    fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", export_dir=tmp_path / "adapter"), epochs=2)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = Task().model  # same seed: the same pretrained weights
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert adapter_ranks(loaded) == adapter_ranks(task.model)
    x = torch.randn(5, 6)
    task.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), task.model(x), atol=1e-6)
        assert not torch.allclose(Task().model(x), task.model(x), atol=1e-4)  # the adapter changed something
    with pytest.raises(ValueError, match="no PEFT adapter"):
        save_adapter(nn.Linear(2, 2), tmp_path / "none")


def test_dora_and_loha_from_the_map(fisher_map):
    task = Task(lr=1e-5)
    fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", lora_kwargs={"use_dora": True}))
    assert "default" in task.model.out.lora_magnitude_vector
    task = Task(lr=1e-5)
    fit(task, AdaptiveLoRA(fisher_map=fisher_map, adapter_root="model", adapter="loha"))
    assert adapter_ranks(task.model) == {n[len("model."):]: r for n, r in fisher_map.ranks.items()}


def test_flat_lora_follows_the_alpha_policy(fisher_map):
    task = Task()
    fit(task, AdaptiveLoRA(fisher_map=fisher_map, ignore_fisher_map=True, adapter_root="model"))
    # the ignored map's base rank and scaling (alpha = 2r: scaling 2), like the map's own modules
    assert {m.scaling["default"] for m in task.model.modules() if hasattr(m, "scaling")} == {2.0}
    assert set(adapter_ranks(task.model).values()) == {fisher_map.budget.rank}
    plain = Task()
    fit(plain, AdaptiveLoRA(adapter_root="model", lora_kwargs={"r": 16}))
    assert {m.scaling["default"] for m in plain.model.modules() if hasattr(m, "scaling")} == {2.0}
