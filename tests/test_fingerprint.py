"""Model identity: parameter names and logical shapes, their hash, and the diff shown when two models differ."""

import hashlib

import torch
from torch import nn

from lightning_fisher.analysis.fingerprint import model_fingerprint, parameter_count, parameter_shapes, shape_differences


def net():
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))


def test_shapes_and_count_in_registration_order():
    assert list(parameter_shapes(net()).items()) == [("0.weight", (3, 2)), ("0.bias", (3,)), ("2.weight", (1, 3))]
    assert parameter_count(net()) == 6 + 3 + 3


def test_the_fingerprint_is_the_documented_hash_of_sorted_names_and_shapes():
    expected = hashlib.sha256(b"0.bias:3\n0.weight:3,2\n2.weight:1,3\n").hexdigest()
    assert model_fingerprint(net()) == "sha256:" + expected


def test_the_fingerprint_ignores_values_and_dtype_but_not_shapes():
    trained = net().to(torch.float64)
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    assert model_fingerprint(trained) == model_fingerprint(net())
    wider = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1, bias=False))
    assert model_fingerprint(wider) != model_fingerprint(net())


def test_shape_differences_name_each_side():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    actual = {"a": (2, 3), "b": (5,), "d": (7, 7)}
    assert shape_differences(expected, actual) == [
        "shape differs: b map [4] vs model [5]",
        "missing in model: c [1]",
        "not in map: d [7, 7]",
    ]
    assert shape_differences(expected, {"a": [2, 3], "b": [4], "c": [1]}) == []  # lists from JSON compare as tuples


def test_a_packed_weight_counts_at_its_logical_shape():
    # what a quantized layer looks like: the weight tensor is packed, the layer's sizes are the real ones
    packed = net()
    packed[0].weight = nn.Parameter(torch.zeros(3, 1, dtype=torch.uint8), requires_grad=False)
    assert parameter_shapes(packed)["0.weight"] == (3, 2)
    assert parameter_shapes(packed)["0.bias"] == (3,)  # other parameters keep their own shape
    assert model_fingerprint(packed) == model_fingerprint(net())
    assert parameter_count(packed) == parameter_count(net())
