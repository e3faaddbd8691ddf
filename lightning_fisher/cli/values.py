"""Values as the command line, a config file and the wizard give them: a class by its path, a comma list."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_fisher.cli.error_reason import user_frame

__all__ = ["comma_list", "import_class"]


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
