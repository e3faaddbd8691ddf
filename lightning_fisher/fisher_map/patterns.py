"""PEFT keys that select exactly one module.

PEFT matches configuration keys against module names in two ways:

- ``target_modules`` as a list matches a name equal to an entry or ending in ``"." + entry``;
  as a string it must :func:`re.fullmatch` the full name.
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes tried in order with
  ``re.match(rf"(.*\\.)?({key})$", name)``; the first key that matches wins.

Bare module names are therefore ambiguous: ``dense`` also selects ``pooler.dense``, ``q``
selects ``inner.q``, and an unescaped ``layers.1.q`` (the dot is a regex wildcard) could even
select ``layersX1.q``. The keys built here are anchored and escaped, so each selects its own
module and no other, whatever the other module names are:

- :func:`exact_module_key` gives ``^`` + the escaped full name; the ``^`` can only match at
  the start of the name, so PEFT's optional ``(.*\\.)?`` prefix must be empty.
- :func:`exact_target_regex` gives one full-match alternation of the escaped full names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["exact_keys", "exact_module_key", "exact_target_regex", "peft_patterns"]


def exact_module_key(name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that selects module ``name`` only."""
    return "^" + re.escape(name)


def peft_patterns(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """PEFT's ``target_modules`` (one full-match regex of exactly these modules), ``rank_pattern``
    and ``alpha_pattern`` (one exact key per module), from ``{module: rank}`` and ``{module: alpha}``."""
    return {
        "target_modules": exact_target_regex(ranks),
        "rank_pattern": exact_keys(ranks),
        "alpha_pattern": exact_keys(alphas),
    }


def exact_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{module: value}`` with each name as its exact PEFT key (``rank_pattern``, ``alpha_pattern``)."""
    return {exact_module_key(name): value for name, value in values.items()}


def exact_target_regex(names: Iterable[str]) -> str:
    """A string ``target_modules`` value that full-matches exactly the given module names."""
    names = list(names)
    if not names:
        raise ValueError("names: at least one module name is needed to build target_modules")
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"

