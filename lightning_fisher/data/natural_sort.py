"""Natural order of names: numbers compare as numbers, so ``layer.2`` sorts before ``layer.10``.

One sort key for everything the library lists for people: sample files of a dataset folder
(``sample_2`` before ``sample_10``, padded or not) and the blocks and modules of a report.
"""

from __future__ import annotations

import re

__all__ = ["natural_key"]

_DIGIT_RUNS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key of ``name`` in natural order: ``sorted(names, key=natural_key)``.

    >>> sorted(["b10", "b2", "a", "b02"], key=natural_key)
    ['a', 'b02', 'b2', 'b10']

    Args:
        name: any string.

    Returns:
        A tuple that orders runs of digits by value and other text by code point; equal values
        written differently (``"7"``, ``"007"``) are ordered by the text itself, so the order is
        total and the same on every machine.
    """
    # re.split with a capturing group alternates text, digits, text, ... (text first, maybe
    # empty), so position i always holds the same type and the tuples compare cleanly.
    parts = _DIGIT_RUNS.split(name)
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), name
