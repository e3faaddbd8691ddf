"""A LightningModule class named by its path, read without building the model: what its ``__init__``
requires, whether it takes ``checkpoint_dir`` (the ``--checkpoint-dir`` convention), whether it has a
``timestep_sampler`` (the timestep focus applies only then). The wizard asks its questions from these.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from lightning_fisher.cli.values import import_class
from lightning_fisher.wording import a_or_an

__all__ = [
    "accepts_checkpoint_dir", "has_timestep_sampler", "parse_model_class", "required_init_arguments",
    "requires_checkpoint_dir",
]


def parse_model_class(text: str) -> str:
    """Check that ``text`` names an importable ``LightningModule`` subclass; return the class path."""
    from lightning.pytorch import LightningModule

    model_class = import_class(text)
    if not (isinstance(model_class, type) and issubclass(model_class, LightningModule)):
        raise ValueError(f"{text} is {a_or_an(type(model_class).__name__)}, not a LightningModule subclass")
    return text


def _init_parameters(class_path: str) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(import_class(class_path).__init__).parameters)
    except (TypeError, ValueError):
        return {}


def accepts_checkpoint_dir(class_path: str) -> bool:
    """Whether the model's ``__init__`` takes ``checkpoint_dir``."""
    return "checkpoint_dir" in _init_parameters(class_path)


def requires_checkpoint_dir(class_path: str) -> bool:
    """Whether ``checkpoint_dir`` is an argument of the model's ``__init__`` without a default."""
    parameter = _init_parameters(class_path).get("checkpoint_dir")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def required_init_arguments(class_path: str) -> dict[str, Any]:
    """``{name: annotation}`` of the model's ``__init__`` arguments without a default, but ``checkpoint_dir``.

    Annotations are resolved (``from __future__ import annotations`` leaves strings); one that
    cannot be resolved is ``None``.
    """
    try:
        hints = typing.get_type_hints(import_class(class_path).__init__)
    except Exception:  # a name only the type checker sees
        hints = {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: hints.get(name)
        for name, parameter in _init_parameters(class_path).items()
        if name not in ("self", "checkpoint_dir") and parameter.kind in kinds and parameter.default is inspect.Parameter.empty
    }


def has_timestep_sampler(class_path: str) -> bool:
    """Whether the model has a ``timestep_sampler``.

    A class attribute, or the name in the source of the class or a base class of the user's (where
    ``__init__`` or ``setup`` sets ``self.timestep_sampler``). When no source can be read, the
    answer is yes: asking about the timestep focus then is harmless, skipping it wrongly is not.
    """
    from lightning.pytorch import LightningModule

    model_class = import_class(class_path)
    if hasattr(model_class, "timestep_sampler"):
        return True
    readable = False
    for klass in model_class.__mro__:
        if klass is LightningModule:
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        readable = True
        if "timestep_sampler" in source:
            return True
    return not readable
