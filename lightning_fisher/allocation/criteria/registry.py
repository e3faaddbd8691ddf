"""The criteria by name: the one place that maps ``AllocationSettings.criterion`` to a criterion.

As Lightning's ``EarlyStopping.mode_dict`` or PEFT's tuner registry do, everything that depends
on the criterion asks here instead of comparing names. The built-in criteria (``trace``,
``spectrum``) are registered on first look-up; a new one is one module with a
:class:`~lightning_fisher.allocation.criteria.Criterion` subclass and one :func:`register_criterion` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_fisher.allocation.criteria.base import Criterion

__all__ = [
    "STOPPING_METHODS", "criterion_for_stopping_method", "criterion_named", "criterion_names", "is_registered", "register_criterion",
    "unregister_criterion",
]

# name -> "module:class" of the built-in criteria, imported when first asked for (they import
# the allocation modules, which import the settings, which ask the registry for valid names).
_BUILT_IN = {
    "trace": "lightning_fisher.allocation.criteria.trace:TraceCriterion",
    "spectrum": "lightning_fisher.allocation.criteria.spectrum:SpectrumCriterion",
}
_REGISTRY: dict[str, "Criterion"] = {}


def _registry() -> dict[str, "Criterion"]:
    for name, target in _BUILT_IN.items():
        if name not in _REGISTRY:
            module, cls = target.split(":")
            _REGISTRY[name] = getattr(importlib.import_module(module), cls)()
    return _REGISTRY


def register_criterion(criterion: "Criterion") -> "Criterion":
    """Make ``criterion`` selectable as ``AllocationSettings(criterion=criterion.name)``.

    Returns:
        The criterion (so it can be used as ``MY = register_criterion(MyCriterion())``).

    Raises:
        TypeError: not a :class:`~lightning_fisher.allocation.criteria.Criterion`.
        ValueError: a criterion of that name, or with that stopping method, is registered already.
    """
    from lightning_fisher.allocation.criteria.base import Criterion

    if not isinstance(criterion, Criterion):
        raise TypeError(f"register_criterion: expected a Criterion, got {type(criterion).__name__}")
    registry = _registry()
    if criterion.name in registry:
        raise ValueError(f"register_criterion: a criterion named {criterion.name!r} is registered already")
    if criterion.stopping_method in STOPPING_METHODS.values():
        raise ValueError(
            f"register_criterion: stopping method {criterion.stopping_method!r} is {criterion_for_stopping_method(criterion.stopping_method).name!r}'s; "
            "give the new criterion's stopping rule its own name (it is recorded in every map)"
        )
    registry[criterion.name] = criterion
    return criterion


def unregister_criterion(name: str) -> None:
    """Remove a criterion registered with :func:`register_criterion` (the built-ins stay)."""
    if name in _BUILT_IN:
        raise ValueError(f"unregister_criterion: {name!r} is built in")
    _REGISTRY.pop(name, None)


def is_registered(name: str) -> bool:
    """Whether ``name`` selects a criterion (without importing the built-in ones)."""
    return name in _BUILT_IN or name in _REGISTRY


def criterion_names() -> tuple[str, ...]:
    """The registered criteria's names, built-ins first."""
    return tuple(_registry())


def criterion_named(name: str) -> "Criterion":
    """The criterion registered as ``name``.

    Raises:
        KeyError: no such criterion (the message lists the registered ones).
    """
    registry = _registry()
    if name not in registry:
        raise KeyError(f"criterion {name!r} is not registered; registered: {', '.join(registry)}")
    return registry[name]


def criterion_for_stopping_method(method: str) -> "Criterion":
    """The criterion whose stopping rule a map records as ``method``.

    Raises:
        KeyError: no registered criterion stops by that method.
    """
    for criterion in _registry().values():
        if criterion.stopping_method == method:
            return criterion
    raise KeyError(f"no registered criterion stops by {method!r}")


class _StoppingMethods(Mapping):
    """``{criterion name: stopping method}``, read from the registry when asked (never stale)."""

    def __getitem__(self, name: str) -> str:
        return criterion_named(name).stopping_method

    def __iter__(self) -> Iterator[str]:
        return iter(criterion_names())

    def __len__(self) -> int:
        return len(_registry())

    def __repr__(self) -> str:
        return repr(dict(self))


#: ``{criterion: the stopping method recorded in its maps}``.
STOPPING_METHODS: Mapping[str, str] = _StoppingMethods()
