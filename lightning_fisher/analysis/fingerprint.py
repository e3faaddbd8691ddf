"""Model identity: a hash of parameter names and shapes, and a diff for when two models differ.

A quantized layer's weight counts at its logical shape (see
:func:`~lightning_fisher.analysis.candidates.weight_shape`), not its packed one: a model quantized to
4 bits has the fingerprint and parameter count of the model it was quantized from, so a map
made on either applies to both. (bitsandbytes even repacks a 4-bit weight on CPU at its first
inference forward; the packed shape is not a stable identity.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import nn

from lightning_fisher.analysis.candidates import is_supported, weight_shape
from lightning_fisher.analysis.module_names import named_parameters

__all__ = ["model_fingerprint", "parameter_count", "parameter_shapes", "shape_differences"]


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of a model, in registration order.

    Names are the user's (no wrapper components, :mod:`lightning_fisher.analysis.module_names`) and
    shapes are logical and global: a quantized weight reports its unpacked shape and a sharded
    ``DTensor`` parameter its full shape, so a model has the same fingerprint quantized,
    wrapped, sharded or not.
    """
    logical = {
        id(module.weight): weight_shape(module)
        for module in model.modules()
        if is_supported(module) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    return {name: logical.get(id(p), tuple(p.shape)) for name, p in named_parameters(model)}


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of a model, a quantized weight counted as the unquantized one."""
    return sum(math.prod(shape) for shape in parameter_shapes(model).values())


def model_fingerprint(model: nn.Module) -> str:
    """``"sha256:<hex>"`` over the sorted parameter names and shapes.

    Dtype, device and values do not enter: the same architecture in bf16 on a GPU has the
    fingerprint it has in fp32 on the CPU, and fine-tuned weights keep it.
    """
    digest = hashlib.sha256()
    for name, shape in sorted(parameter_shapes(model).items()):
        digest.update(f"{name}:{','.join(map(str, shape))}\n".encode())
    return "sha256:" + digest.hexdigest()


def shape_differences(
    expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Readable lines for names missing on either side and shapes that differ."""
    lines = []
    for name, shape in expected.items():
        if name not in actual:
            lines.append(f"missing in model: {name} {list(shape)}")
        elif tuple(actual[name]) != tuple(shape):
            lines.append(f"shape differs: {name} map {list(shape)} vs model {list(actual[name])}")
    for name, shape in actual.items():
        if name not in expected:
            lines.append(f"not in map: {name} {list(shape)}")
    return lines
