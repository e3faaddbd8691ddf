"""Small helpers for messages people read."""

from __future__ import annotations

from typing import Optional

__all__ = ["plural"]


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
