"""Small helpers for messages people read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

__all__ = ["a_or_an", "folders_created", "plural"]


def plural(count: int, noun: str, many: Optional[str] = None) -> str:
    """``1 batch``, ``3 batches``, ``1,024 steps``: the count and the noun that agrees with it.

    Args:
        count: how many.
        noun: the singular (``batch``, ``step``).
        many: the plural when it is not ``noun + "s"`` / ``noun + "es"`` (after s, x, ch, sh).
    """
    if count == 1:
        return f"1 {noun}"
    if many is None:
        many = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{count:,} {many}"


def a_or_an(word: str) -> str:
    """``a Tensor``, ``an int``, ``an OrderedDict``: the word with its indefinite article (by its first letter)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def folders_created(folders: Sequence[Union[str, os.PathLike]]) -> str:
    """`` (created folder a)`` / `` (created folders a, a/b)`` to add after a file written; ``""`` for none."""
    if not folders:
        return ""
    return f" (created folder{'s' if len(folders) > 1 else ''} {', '.join(map(str, folders))})"
