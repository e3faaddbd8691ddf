"""Where the map is (peft_factory/locate.py), and the map-reading parts of the package importing no PEFT."""

import sys

import pytest
import torch
from _fresh_python import assert_runs_in_fresh_python
from _nets import CollidingNet, linear_names
from torch.utils.data import DataLoader, TensorDataset

from lightning_fisher import FisherMap, FisherMapDecodeError, FisherMapNotFoundError
from lightning_fisher.peft_factory import find_fisher_map, fisher_map_path, load_map


class Data:
    def __init__(self, dataset_dir):
        self.dataset_dir = dataset_dir


@pytest.fixture
def saved_map(tmp_path):
    model = CollidingNet()
    fmap = FisherMap.from_scores({name: 1.0 for name in linear_names(model)}, model, rank=4, rank_min=1, rank_max=8)
    fmap.save(tmp_path / "data")
    return tmp_path / "data", fmap


def test_path_rule_explicit_then_dataset_dir_then_datamodule(tmp_path):
    file = tmp_path / "maps" / "mine.json"
    assert fisher_map_path(file, tmp_path / "a", Data(tmp_path / "b")) == file
    assert fisher_map_path(tmp_path / "out", tmp_path / "a") == tmp_path / "out" / "fisher_map.json"
    assert fisher_map_path(None, tmp_path / "a", Data(tmp_path / "b")) == tmp_path / "a" / "fisher_map.json"
    assert fisher_map_path(None, None, Data(str(tmp_path / "b"))) == tmp_path / "b" / "fisher_map.json"
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)))  # no dataset_dir: skipped
    assert fisher_map_path(None, None, loader) is None
    assert fisher_map_path() is None


def test_find_loads_from_a_folder_and_forgives_only_a_folder_without_a_map(saved_map, tmp_path):
    folder, fmap = saved_map
    assert find_fisher_map(dataset_dir=folder) == fmap
    assert find_fisher_map(datamodule=Data(folder)) == fmap
    assert find_fisher_map(fmap) is fmap
    assert load_map(folder) == fmap and load_map(fmap) is fmap
    assert find_fisher_map(dataset_dir=tmp_path / "empty") is None  # merely looked for: flat LoRA
    with pytest.raises(FisherMapNotFoundError, match="empty/fisher_map.json: no fisher map here"):
        find_fisher_map(tmp_path / "empty", dataset_dir=folder)  # named explicitly: must exist
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "fisher_map.json").write_text("{")
    with pytest.raises(FisherMapDecodeError, match="not valid JSON"):
        find_fisher_map(dataset_dir=tmp_path / "broken")  # found but unreadable: never silently flat


def test_reading_a_map_imports_no_peft():
    """locate, adapter_root and model_check import no PEFT; the first name that needs it loads it."""
    assert_runs_in_fresh_python(
        "import sys\n"
        "from lightning_fisher.peft_factory import find_fisher_map, rebase_names, check_model\n"
        "assert 'peft' not in sys.modules, sorted(m for m in sys.modules if m.startswith('peft'))\n"
        "from lightning_fisher.peft_factory import adapter_ranks\n"
        "assert 'peft' in sys.modules\n"
    )
