"""Is this the model the map was made for? The fingerprint first, then a readable difference.

The map records the analysed model's fingerprint (a hash of parameter names and shapes, see
:mod:`lightning_fisher.analysis.fingerprint`) and every candidate module's weight shape. When the
fingerprints differ, the candidate shapes say where: a module the map adapts that is missing
cannot be applied at all; a shape that differs or a difference outside the candidates may be
deliberate (a new head), so ``strict=False`` lets the map be applied anyway. This module
imports no PEFT.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_fisher.analysis.candidates import weight_shape
from lightning_fisher.errors import CandidateSelectionError, ModelMismatchError
from lightning_fisher.analysis.fingerprint import model_fingerprint, parameter_count, shape_differences
from lightning_fisher.fisher_map.map import FisherMap
from lightning_fisher.analysis.module_names import named_modules

__all__ = ["check_model", "model_differences"]

# More would bury the message; the count says how many there are.
_MAX_LINES = 20


def model_differences(fisher_map: FisherMap, model: nn.Module) -> list[str]:
    """Readable lines for how ``model`` differs from the one ``fisher_map`` was made for; empty if it does not.

    Args:
        fisher_map: the map, with the analysed model's fingerprint and candidate shapes.
        model: the model the map is about to be applied to, with names as in the analysis.
    """
    if fisher_map.model.fingerprint == model_fingerprint(model):
        return []
    modules = dict(named_modules(model))
    expected = {record.name: tuple(record.shape) for record in fisher_map.modules}
    actual = {}
    for name in expected:
        if name in modules:
            try:
                actual[name] = tuple(weight_shape(modules[name]))
            except CandidateSelectionError:
                actual[name] = ()  # no longer a module the map could adapt
    lines = shape_differences(expected, actual)
    if not lines:
        lines.append(
            f"every candidate module matches, but other parameters differ (map made on a "
            f"{fisher_map.model.class_name} with {fisher_map.model.num_parameters:,} parameters, this "
            f"{type(model).__name__} has {parameter_count(model):,})"
        )
    return lines


def check_model(
    fisher_map: FisherMap, model: nn.Module, *, strict: bool = True, strict_option: str = "strict=False"
) -> Optional[str]:
    """Refuse a map made for another model; with ``strict=False``, return the warning to show instead.

    Args:
        fisher_map: the map about to be applied.
        model: the model it is applied to (names as in the analysis).
        strict: a difference is an error; ``False`` returns it as a message, unless modules the
            map adapts are missing (then it cannot be applied).
        strict_option: how the caller turns ``strict`` off where it is set, for the error's
            advice (the command line spells it ``--adaptive_lora.strict false``).

    Returns:
        ``None`` when the model is the map's; else, with ``strict=False``, the warning text.

    Raises:
        ModelMismatchError: naming the map file and each difference (at most 20 lines).
    """
    lines = model_differences(fisher_map, model)
    if not lines:
        return None
    where = f" {fisher_map.path}" if fisher_map.path else ""
    found = (
        f"fisher map{where} was made for another model ({len(lines)} difference(s)):\n  "
        + "\n  ".join(lines[:_MAX_LINES])
        + ("\n  ..." if len(lines) > _MAX_LINES else "")
    )
    if strict:
        raise ModelMismatchError(
            found + f"\nRe-run the analysis for this model, or pass {strict_option} to apply it anyway."
        )
    if any(line.startswith("missing in model") for line in lines):
        raise ModelMismatchError(found + "\nModules the map adapts are missing; cannot apply it.")
    return found + "\nApplied anyway (strict is off); re-run the analysis for this model for a map made for it."
