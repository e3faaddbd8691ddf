"""Values as the command line, a config file and the wizard give them: a class by its path, a comma
list, text typed as a value of a type annotation."""

from __future__ import annotations

import importlib
import os
import typing
from typing import Any

import yaml

from lightning_fisher.cli.error_reason import user_frame

__all__ = ["comma_list", "import_class", "parse_typed", "type_name"]


def import_class(class_path: str) -> Any:
    """The object ``module.Name`` names (a class path such as ``my_pkg.MyModule``).

    Raises:
        ValueError: the path has no module part, the module fails to import (any error in the
            user's module: the message names it and the line of the user's code that raised),
            or it has no such attribute.
    """
    module_name, dot, name = class_path.rpartition(".")
    if not dot or not module_name or not name:
        raise ValueError(f"{class_path!r}: give the full class path, module.ClassName (e.g. my_pkg.MyModule)")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any error in the user's module: reported, not raised as it is
        frame = user_frame(error)
        where = f" ({frame.filename}, line {frame.lineno}, in {frame.name})" if frame else ""
        raise ValueError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}{where}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {name!r}") from None


def comma_list(value: Any) -> list[str]:
    """``"a, b"``, ``["a", "b"]`` or a single value -> ``["a", "b"]``: items stripped, empty ones dropped."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    return [text for text in (str(item).strip() for item in items) if text]


def type_name(annotation: Any) -> str:
    """A type as a question or message shows it, e.g. ``int``, ``Optional[int]`` or ``linear/cosine``."""
    if annotation is None:
        return "any YAML value"
    if typing.get_origin(annotation) is typing.Literal:
        return "/".join(str(value) for value in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


_TRUE, _FALSE, _NONE = ("true", "yes", "y"), ("false", "no", "n"), ("none", "null", "~")


def parse_typed(text: str, annotation: Any) -> Any:
    """Text typed by a user as a value of ``annotation``, or ``ValueError`` saying what was expected.

    ``int``, ``float``, ``bool`` (true/false, yes/no), ``str`` and paths (kept as text),
    ``Literal[...]`` (one of its values), ``Optional[X]`` (``none`` or an X); anything else,
    or no annotation, is read as a YAML value (``[1, 2]``, ``{a: 1}``).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if text.lower() in _NONE:
            return None
        rest = [a for a in args if a is not type(None)]
        return parse_typed(text, rest[0] if len(rest) == 1 else typing.Union[tuple(rest)])
    if origin is typing.Literal:
        for value in args:
            if text == str(value):
                return value
        raise ValueError(f"{text!r} is not one of: {', '.join(str(v) for v in args)}")
    if annotation is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{text!r}: answer true or false")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {'a whole number' if annotation is int else 'a number'}") from None
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, os.PathLike)):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{text!r} is not a YAML value: {error}") from None
