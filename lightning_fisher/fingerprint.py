"""Model identity: a hash of parameter names and shapes, and a diff for when two models differ."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from torch import nn

from lightning_fisher.module_names import named_parameters

__all__ = ["model_fingerprint", "parameter_shapes", "shape_differences"]


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{parameter name: shape}`` of a model, in registration order.

    Names are the user's (no wrapper components, :mod:`lightning_fisher.module_names`) and
    shapes are global: a sharded ``DTensor`` parameter reports its full shape, so a model has
    the same fingerprint wrapped, sharded or not.
    """
    return {name: tuple(p.shape) for name, p in named_parameters(model)}


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
