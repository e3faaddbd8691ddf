"""Sharded models: FSDP2 through Lightning's ModelParallelStrategy, two CPU processes on gloo.

One launch of ``scripts/sharded.py`` (module fixture) analyses with both criteria and fits with
``AdaptiveLoRA``; each test compares what it wrote with one unsharded process here.

Which sample lands in which half depends on its position in each process's stream. Lightning
gives a training loader a shuffling ``DistributedSampler`` seeded by ``PL_GLOBAL_SEED``
(``analyze`` seeds 0), so rank r reads that sampler's permutation for rank r, and its k-th
sample lands in half k % 2. The one-process reference reads rank 0's stream, then rank 1's
(each 48 samples, an even number): every sample keeps its half, and the noise floors, not
only the means, must agree.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_fisher import AllocationSettings, FisherMap, analyze

SCRIPT = Path(__file__).parent / "scripts" / "sharded.py"
# The same float64 per-sample values, summed in another order (per process, then across).
TOLERANCE = 1e-9


def _platform_problem():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "torch.distributed with the gloo backend is not built into this torch"
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"FSDP2 (fully_shard) or Lightning's ModelParallelStrategy is missing: {error}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_platform_problem() is not None, reason=str(_platform_problem()))]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}
    assert set(ranks) == {0, 1}
    return out, ranks


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import sharded as module
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def one_process(script, criterion, output):
    dataset = script.data()
    x, y = dataset.tensors
    streams = [list(DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)) for rank in (0, 1)]
    order = torch.tensor(streams[0] + streams[1])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[order], y[order]), batch_size=script.BATCH, shuffle=False
    )
    allocation = AllocationSettings(rank=4, rank_min=1, rank_max=16, criterion=criterion)
    return analyze(script.Task(), loader, output=output, allocation=allocation, convergence_patience=10_000,
                   min_batches=0, max_batches=None, trainer_kwargs=dict(accelerator="cpu", devices=1))


def test_sharded_trace_scores_equal_one_process(sharded, script, tmp_path):
    out, ranks = sharded
    reference = one_process(script, "trace", tmp_path)
    for seen in (ranks[0]["trace"], ranks[1]["trace"]):
        # the analysed task was sharded and wrapped for activation checkpointing
        assert "encoder.2._checkpoint_wrapped_module.weight" in seen["analysed"]["sharded"]
        assert seen["world_size"] == 2 and seen["samples"] == 96 and seen["batches"] == 6
        assert set(seen["scores"]) == set(reference.scores) == {"encoder.0", "encoder.2", "head"}
        for name, value in reference.scores.items():
            assert seen["scores"][name] == pytest.approx(value, rel=TOLERANCE), name
        assert seen["ranks"] == reference.ranks
        # the user's names and global shapes: the same model as unsharded and unwrapped
        assert seen["fingerprint"] == reference.model.fingerprint
    written = FisherMap.load(out / "trace")
    assert written.scores == ranks[0]["trace"]["scores"] and written.analysis.world_size == 2


def test_sharded_spectra_equal_one_process(sharded, script, tmp_path):
    _, ranks = sharded
    reference = one_process(script, "spectrum", tmp_path)
    assert ranks[0]["spectrum"] == ranks[1]["spectrum"]  # all-reduced once, at the end
    seen = ranks[0]["spectrum"]
    for module in reference.modules:
        assert seen["sigma_sq"][module.name] == pytest.approx(module.sigma_sq, rel=TOLERANCE), module.name
        assert seen["floors"][module.name] == pytest.approx(module.noise_floor, rel=TOLERANCE), module.name
    assert seen["ranks"] == reference.ranks


def test_sharded_fit_injects_the_maps_ranks_and_exports_an_adapter_for_the_unsharded_base(sharded, script):
    import peft

    from lightning_fisher.peft_factory import adapter_ranks

    out, ranks = sharded
    fisher_map = FisherMap.load(out / "trace")
    expected = {name.removeprefix("encoder."): r for name, r in fisher_map.ranks.items() if name.startswith("encoder.")}
    for seen in ranks.values():
        fit = seen["fit"]
        assert fit["adapter_ranks"] == expected and fit["steps"] == 6
        # injected before sharding: the adapter weights were sharded with their layers
        assert "encoder.2._checkpoint_wrapped_module.lora_A.default.weight" in fit["sharded"]
        assert "encoder.0.lora_B.default.weight" in fit["sharded"]
    assert ranks[0]["fit"]["trainable"] == ranks[1]["fit"]["trainable"]
    assert ranks[0]["fit"]["output"] == ranks[1]["fit"]["output"]

    loaded = peft.PeftModel.from_pretrained(script.Task().encoder, str(out / "adapter"))
    assert adapter_ranks(loaded) == expected
    trained = {key.replace("._checkpoint_wrapped_module", ""): v for key, v in ranks[0]["fit"]["trainable"].items()}
    lora = {name.removeprefix("base_model.model."): p for name, p in loaded.named_parameters() if "lora_" in name}
    assert set(lora) == set(trained)
    for name, parameter in lora.items():
        assert parameter.detach().flatten().tolist() == trained[name], name
    probe = torch.linspace(-1, 1, 18, dtype=torch.float64).reshape(3, 6)
    with torch.no_grad():
        output = loaded(probe)
    assert output.flatten().tolist() == pytest.approx(ranks[0]["fit"]["output"], rel=1e-12, abs=1e-12)
    assert not torch.allclose(output, script.Task().encoder(probe))  # the adapter changed the model
