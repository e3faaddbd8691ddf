"""Is this the map's model? (peft_factory/model_check.py, using fingerprint.shape_differences)"""

import pytest
from _nets import CollidingNet, linear_names
from torch import nn

from lightning_fisher import FisherMap, ModelMismatchError
from lightning_fisher.analysis.fingerprint import shape_differences
from lightning_fisher.peft_factory import check_model, model_differences


@pytest.fixture
def fmap(tmp_path):
    model = CollidingNet()
    fmap = FisherMap.from_scores({name: 1.0 for name in linear_names(model)}, model, rank=4, rank_min=1, rank_max=8)
    fmap.save(tmp_path)
    return FisherMap.load(tmp_path)


def test_the_same_model_passes(fmap):
    assert model_differences(fmap, CollidingNet()) == []
    assert check_model(fmap, CollidingNet()) is None


def test_differences_name_the_modules(fmap):
    model = CollidingNet()
    model.layers[3].q = nn.Linear(8, 4)
    del model.layers[11]
    assert model_differences(fmap, model) == [
        "shape differs: layers.3.q map [8, 8] vs model [4, 8]",
        "missing in model: layers.11.q [8, 8]",
        "missing in model: layers.11.dense [8, 8]",
    ]
    with pytest.raises(ModelMismatchError, match=r"(?s)fisher_map.json was made for another model \(3 difference.*strict=False"):
        check_model(fmap, model)
    with pytest.raises(ModelMismatchError, match="Modules the map adapts are missing; cannot apply it"):
        check_model(fmap, model, strict=False)


def test_a_new_head_is_a_warning_without_strict(fmap):
    model = CollidingNet(classes=5)
    assert model_differences(fmap, model)[0].startswith("shape differs: head")
    model = CollidingNet()
    model.extra = nn.Linear(2, 2)  # not a candidate of the map: only the fingerprint sees it
    (line,) = model_differences(fmap, model)
    assert line.startswith("every candidate module matches, but other parameters differ (map made on a CollidingNet")
    warning = check_model(fmap, model, strict=False)
    assert "other parameters differ" in warning
    with pytest.raises(ModelMismatchError):
        check_model(fmap, model)


def test_shape_differences_both_ways():
    assert shape_differences({"a": (2, 2), "b": (3,)}, {"a": (2, 3), "c": (1,)}) == [
        "shape differs: a map [2, 2] vs model [2, 3]",
        "missing in model: b [3]",
        "not in map: c [1]",
    ]


def _parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def test_a_module_that_is_no_longer_a_candidate_has_no_shape(fmap):
    model = CollidingNet()
    model.head = nn.Conv2d(8, 3, 1)  # same name, a kind the map could not adapt
    assert model_differences(fmap, model) == ["shape differs: head map [3, 8] vs model []"]


def test_other_parameters_name_both_classes_and_counts(fmap):
    model = CollidingNet()
    model.extra = nn.Linear(2, 2)
    assert model_differences(fmap, model) == [
        f"every candidate module matches, but other parameters differ (map made on a CollidingNet with "
        f"{fmap.model.num_parameters:,} parameters, this CollidingNet has {_parameter_count(model):,})"
    ]
    line = model_differences(fmap, model)[0]
    assert check_model(fmap, model, strict=False) == (
        f"fisher map {fmap.path} was made for another model (1 difference(s)):\n  {line}\n"
        "Applied anyway (strict is off); re-run the analysis for this model for a map made for it.")
    with pytest.raises(ModelMismatchError) as info:
        check_model(fmap, model)
    assert str(info.value) == (f"fisher map {fmap.path} was made for another model (1 difference(s)):\n  {line}\n"
                               "Re-run the analysis for this model, or pass strict=False to apply it anyway.")


def test_a_map_without_a_file_and_the_twenty_line_cut():
    class Many(nn.Module):
        def __init__(self, count, width):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(count))

    for count, cut in ((20, ""), (21, "\n  ...")):
        fmap = FisherMap.from_scores({f"layers.{i}": 1.0 for i in range(count)}, Many(count, 2), rank=1, rank_min=1,
                                     rank_max=2)
        assert fmap.path is None
        lines = model_differences(fmap, Many(count, 3))
        assert len(lines) == count
        message = check_model(fmap, Many(count, 3), strict=False)
        assert message == (f"fisher map was made for another model ({count} difference(s)):\n  "
                           + "\n  ".join(lines[:20]) + cut
                           + "\nApplied anyway (strict is off); re-run the analysis for this model for a map made for it.")
