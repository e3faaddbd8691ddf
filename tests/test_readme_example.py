"""README.md's complete example runs as written (with the example model's pretraining done once per session)."""

import re
import shutil
from pathlib import Path

import pytest

from lightning_fisher import FisherMap

README = Path(__file__).resolve().parent.parent / "README.md"


def example_code() -> str:
    section = README.read_text().split("## A complete example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(pretrained_digits_flow, tmp_path, monkeypatch):
    # prepare_digits_example keeps a checkpoint it finds with the same settings: the session's
    # pretrained model stands in for the minute of pretraining the example starts with
    checkpoint = Path(pretrained_digits_flow)
    (tmp_path / "data" / "digits" / "pretrained").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "data" / "digits" / "pretrained" / checkpoint.name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(example_code(), str(README), "exec"), namespace)
    written = FisherMap.load(tmp_path / "data" / "digits" / "train")
    assert written.ranks == namespace["fisher_map"].ranks and written.budget.mode == "budget"
    assert written.budget.lora_parameters <= written.budget.flat_lora_parameters
    trainer = namespace["trainer"]
    assert trainer.state.finished and trainer.current_epoch == 2
    adapted = {name for name, _ in trainer.lightning_module.named_modules() if name.endswith("lora_A")}
    assert len(adapted) == len(written.ranks)
