"""The reason for a failed command, in one line: what ``lightning-fisher SUBCOMMAND: error:`` prints.

jsonargparse wraps what went wrong in layers: ``Parser key "model":``, "Does not validate
against any of the Union subtypes", the alternatives it tried, a ``Namespace`` dump. The real
reason is further down, in the message or in the chain of exceptions (``__cause__`` /
``__context__``). The rule, in order:

1. an error of this library anywhere in the chain (a missing dataset folder, a bad setting):
   its own message, which already names the file or field and says what to do;
2. an exception raised in the user's own code (importing their model file, building their
   model): the exception, and the file and line of the last traceback frame in that code;
3. otherwise the first informative line of the message, after the option it concerns.

Nothing here imports Lightning or jsonargparse.
"""

from __future__ import annotations

import re
import sysconfig
import traceback
from pathlib import Path
from typing import Optional

from lightning_fisher.errors import LightningFisherError

__all__ = ["error_reason", "user_frame"]

# Lines of a jsonargparse message that repeat the machinery, not the reason.
_NOISE = (
    "Does not validate against any",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value",
    "Expected a path but",
    "Not a valid subclass",
)
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*')
_GIVEN = (re.compile(r"class_path='([^']+)'"), re.compile(r"Given value: (\S+)"))
_SUBCOMMAND_PREFIX = re.compile(r"\b(?:fit|validate|test|predict)\.")
_PACKAGE = Path(__file__).resolve().parents[1]
_EXAMPLES = _PACKAGE / "examples"
_REQUIRED_MODEL = re.compile(r"arguments are required: (\w+\.)?model$")


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: Optional[BaseException] = error
    while current is not None and all(current is not e for e in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _library_paths() -> tuple[Path, ...]:
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    return tuple({Path(p).resolve() for p in (sysconfig.get_paths().get(n) for n in names) if p})


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<"):
        return False  # <frozen importlib._bootstrap>, <string>
    path = Path(filename).resolve()
    if path.is_relative_to(_PACKAGE) and not path.is_relative_to(_EXAMPLES):
        return False
    parts = set(path.parts)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not any(path.is_relative_to(library) for library in _library_paths())


def user_frame(error: BaseException) -> Optional[traceback.FrameSummary]:
    """The last frame of ``error``'s traceback that lies in the user's own code, if any.

    The user's code is every file outside the Python installation, its site-packages and this
    package (the examples of this package count as user code: they are models like yours).
    """
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    for frame in reversed(frames):
        if _is_user_file(frame.filename):
            return frame
    return None


def _first_line(message: str) -> str:
    key = _PARSER_KEY.match(message)
    body = message[key.end():] if key else message
    lines = [line.strip().lstrip("-").strip() for line in body.splitlines()]
    kept = [line for line in lines if line and not any(marker in line for marker in _NOISE)]
    reason = kept[0] if kept else (lines[0] if lines else "")
    if reason.endswith(":") and len(kept) > 1:  # "Problem with given class_path 'x.M':" + its reason
        reason += " " + kept[1]
    if "arguments are required" in reason:
        reason = _SUBCOMMAND_PREFIX.sub("", reason)  # "fit.model": the option is --model
    if _REQUIRED_MODEL.search(reason):
        reason += " (--model my_pkg.MyModule, or model: in a --config file)"
    return f"{key.group(1)}: {reason}" if key else reason


def _in_user_code(error: BaseException, frame: traceback.FrameSummary, top_message: str) -> str:
    # Module-level code runs only on import (Python 3.11+ hides importlib's own frames).
    importing = any(f.name == "<module>" for f in traceback.extract_tb(error.__traceback__))
    given = next((m for m in (p.search(top_message) for p in _GIVEN) if m), None)
    what = given.group(1) if given else Path(frame.filename).name
    where = f"{frame.filename}, line {frame.lineno}, in {frame.name}"
    doing = f"importing {what} failed" if importing else f"{what} raised"
    return f"{doing}: {type(error).__name__}: {error} ({where})"


def error_reason(error: BaseException) -> str:
    """The reason ``error`` happened, as the command line prints it (see the module docstring).

    Args:
        error: the exception that ended the command.
    """
    chain = _chain(error)
    own = next((e for e in chain if isinstance(e, LightningFisherError)), None)
    if own is not None:
        return str(own)
    root = chain[-1]
    frame = user_frame(root)
    if frame is not None:
        return _in_user_code(root, frame, str(error))
    return _first_line(str(error)) or type(error).__name__
