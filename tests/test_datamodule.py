"""TensorDirectoryDataModule on generated folders, with a real Lightning Trainer and LightningCLI."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_fisher.errors import DatasetFolderError
from lightning_fisher.data.tensor_folder import write_sample_folder
from lightning_fisher.training.datamodule import TensorDirectoryDataModule


def image_sample(i: int) -> dict[str, torch.Tensor]:
    return {"x": torch.full((1, 8, 8), float(i)), "label": torch.tensor(i % 2), "index": torch.tensor(i)}


def make_folder(folder: Path, count: int, *, start: int = 0, format: str = "pt") -> Path:
    write_sample_folder(folder, (image_sample(i) for i in range(start, start + count)), format=format)
    return folder


def loader_indices(loader) -> list[int]:
    return torch.cat([batch["index"] for batch in loader]).tolist()


class CountingModule(pl.LightningModule):
    """Records which samples each loop saw, so the test can check the datamodule fed all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 2)
        self.train_indices: list[int] = []
        self.val_indices: list[int] = []
        self.test_indices: list[int] = []
        self.batch_shapes: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        self.train_indices += batch["index"].tolist()
        self.batch_shapes.append(tuple(batch["x"].shape))
        return torch.nn.functional.cross_entropy(self.layer(batch["x"].flatten(1)), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.val_indices += batch["index"].tolist()

    def test_step(self, batch, batch_idx):
        self.test_indices += batch["index"].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def quick_trainer() -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


# -- loaders -------------------------------------------------------------------------------


def test_batches_have_expected_shapes_and_values(tmp_path: Path) -> None:
    datamodule = TensorDirectoryDataModule(make_folder(tmp_path, 10), batch_size=4, shuffle=False)
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())

    assert [tuple(b["x"].shape) for b in batches] == [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)]
    assert [tuple(b["label"].shape) for b in batches] == [(4,), (4,), (2,)]
    assert batches[0]["label"].dtype == torch.int64
    assert loader_indices(batches) == list(range(10))  # unshuffled: natural file order
    assert torch.equal(batches[2]["x"][1], torch.full((1, 8, 8), 9.0))
    assert datamodule.val_dataloader() == []


def test_drop_last(tmp_path: Path) -> None:
    datamodule = TensorDirectoryDataModule(make_folder(tmp_path, 10), batch_size=4, drop_last=True)
    datamodule.setup("fit")
    assert [len(b["index"]) for b in datamodule.train_dataloader()] == [4, 4]


def test_same_seed_same_order_different_seed_different_order(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, 20)

    def order(seed: int) -> list[int]:
        datamodule = TensorDirectoryDataModule(folder, batch_size=3, seed=seed)
        datamodule.setup("fit")
        return loader_indices(datamodule.train_dataloader())

    first = order(seed=1)
    assert sorted(first) == list(range(20))
    assert first != list(range(20))
    assert order(seed=1) == first
    assert order(seed=2) != first


def test_val_fraction_split_sizes_disjoint_and_deterministic(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, 20)

    def split(seed: int) -> tuple[list[int], list[int]]:
        datamodule = TensorDirectoryDataModule(folder, batch_size=4, val_fraction=0.25, seed=seed)
        assert datamodule.num_samples == 15  # known before setup
        datamodule.setup("fit")
        assert datamodule.num_samples == 15
        return loader_indices(datamodule.train_dataloader()), loader_indices(datamodule.val_dataloader())

    train, val = split(seed=0)
    assert len(train) == 15 and len(val) == 5
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == set(range(20))
    assert val == sorted(val)  # validation is unshuffled, in folder order
    assert split(seed=0) == (train, val)
    assert set(split(seed=3)[1]) != set(val)


def test_tiny_val_fraction_still_holds_out_one_sample(tmp_path: Path) -> None:
    datamodule = TensorDirectoryDataModule(make_folder(tmp_path, 5), val_fraction=0.01)
    datamodule.setup("fit")
    assert (len(datamodule.train_dataset), len(datamodule.val_dataset)) == (4, 1)

    single = TensorDirectoryDataModule(make_folder(tmp_path / "one", 1), val_fraction=0.5)
    with pytest.raises(DatasetFolderError, match=r"1 sample file\(s\): too few"):
        single.setup("fit")


def test_different_shapes_name_both_files(tmp_path: Path) -> None:
    write_sample_folder(tmp_path, [{"input_ids": torch.zeros(8, dtype=torch.int64), "label": torch.tensor(0)}] * 2)
    write_sample_folder(tmp_path, [{"input_ids": torch.zeros(6, dtype=torch.int64), "label": torch.tensor(1)}], start=2)
    datamodule = TensorDirectoryDataModule(tmp_path, batch_size=4, shuffle=False)
    datamodule.setup("fit")

    with pytest.raises(DatasetFolderError) as info:
        next(iter(datamodule.train_dataloader()))
    message = str(info.value)
    assert "'input_ids'" in message
    assert "sample_000000.pt has shape (8,)" in message and "sample_000002.pt has shape (6,)" in message
    assert "pad" in message

    one_at_a_time = TensorDirectoryDataModule(tmp_path, batch_size=1)
    one_at_a_time.setup("fit")
    assert sorted(len(b["input_ids"][0]) for b in one_at_a_time.train_dataloader()) == [6, 8, 8]


def test_worker_processes_load_the_same_batches(tmp_path: Path) -> None:
    # A clean pass only: after a worker raises, torch waits 5 s for the worker to exit, too slow here.
    folder = make_folder(tmp_path, 6)
    in_process = TensorDirectoryDataModule(folder, batch_size=4, seed=5)
    in_workers = TensorDirectoryDataModule(folder, batch_size=4, seed=5, num_workers=1)
    in_process.setup("fit")
    in_workers.setup("fit")
    assert loader_indices(in_workers.train_dataloader()) == loader_indices(in_process.train_dataloader())


def test_describe(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "train", 12, format="safetensors")
    expected = f"12 samples (.safetensors) in {folder}; keys: index, label, x"
    assert TensorDirectoryDataModule(folder).describe() == expected
    split = TensorDirectoryDataModule(folder, val_fraction=0.25, seed=4).describe()
    assert split.endswith("; validation: 3 of them held out (val_fraction=0.25, seed=4)")


# -- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"num_workers": -1}, "num_workers"),
        ({"validate": "sometimes"}, "validate"),
        ({"val_fraction": 0.1, "val_dir": "."}, "val_dir"),
    ],
)
def test_invalid_arguments_name_the_argument(tmp_path: Path, kwargs: dict, name: str) -> None:
    make_folder(tmp_path, 2)
    with pytest.raises(ValueError, match=name):
        TensorDirectoryDataModule(tmp_path, **kwargs)


def test_missing_folders_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(DatasetFolderError, match=r"dataset_dir .*no_such_data does not exist"):
        TensorDirectoryDataModule(tmp_path / "no_such_data")
    make_folder(tmp_path, 2)
    with pytest.raises(DatasetFolderError, match=r"val_dir .*nope does not exist"):
        TensorDirectoryDataModule(tmp_path, val_dir=tmp_path / "nope")


def test_empty_folder_fails_at_setup_naming_it(tmp_path: Path) -> None:
    (tmp_path / "fisher_map.json").write_text("{}")
    datamodule = TensorDirectoryDataModule(tmp_path)
    assert datamodule.dataset_dir / "fisher_map.json" == tmp_path / "fisher_map.json"
    with pytest.raises(DatasetFolderError, match=rf"{tmp_path} holds no sample files"):
        datamodule.setup("fit")


def test_no_test_dir_means_no_test_loader(tmp_path: Path) -> None:
    datamodule = TensorDirectoryDataModule(make_folder(tmp_path, 2))
    with pytest.raises(ValueError, match="pass test_dir"):
        datamodule.test_dataloader()


# -- Lightning -------------------------------------------------------------------------------


def test_trainer_fits_over_every_sample_then_tests(tmp_path: Path) -> None:
    train = make_folder(tmp_path / "train", 10)
    val = make_folder(tmp_path / "val", 3, start=100, format="safetensors")
    test = make_folder(tmp_path / "test", 2, start=200)
    datamodule = TensorDirectoryDataModule(train, batch_size=4, val_dir=val, test_dir=test, seed=7)
    model = CountingModule()
    trainer = quick_trainer()

    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)

    assert sorted(model.train_indices) == list(range(10))
    assert model.train_indices != list(range(10))  # shuffled
    assert model.batch_shapes == [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)]
    # sanity check (2 batches) + one full validation epoch, in file order
    assert model.val_indices == [100, 101, 102] + [100, 101, 102]
    assert model.test_indices == [200, 201]
    assert trainer.global_step == 3


def test_trainer_with_val_fraction_validates_held_out_samples(tmp_path: Path) -> None:
    datamodule = TensorDirectoryDataModule(make_folder(tmp_path, 10), batch_size=5, val_fraction=0.2)
    model = CountingModule()
    trainer = quick_trainer()
    trainer.fit(model, datamodule=datamodule)

    held_out = set(model.val_indices)
    assert len(held_out) == 2
    assert sorted(model.train_indices) == sorted(set(range(10)) - held_out)


def test_trainer_without_validation_data_skips_validation(tmp_path: Path) -> None:
    model = CountingModule()  # has a validation_step, but the datamodule has nothing to validate on
    quick_trainer().fit(model, datamodule=TensorDirectoryDataModule(make_folder(tmp_path, 6), batch_size=4))
    assert sorted(model.train_indices) == list(range(6))
    assert model.val_indices == []


def test_configured_from_lightning_cli_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["train.py"])  # not pytest's own arguments
    folder = make_folder(tmp_path / "data", 6)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"dataset_dir": str(folder), "batch_size": 3, "val_fraction": 0.5, "validate": "full"},
                "trainer": {"logger": False, "enable_checkpointing": False, "accelerator": "cpu"},
            }
        )
    )

    cli = LightningCLI(CountingModule, TensorDirectoryDataModule, run=False, args=["--config", str(config)])

    datamodule = cli.datamodule
    assert isinstance(datamodule, TensorDirectoryDataModule)
    assert datamodule.dataset_dir == folder
    assert (datamodule.batch_size, datamodule.val_fraction, datamodule.validate) == (3, 0.5, "full")
    assert datamodule.hparams["batch_size"] == 3
    assert datamodule.num_samples == 3
