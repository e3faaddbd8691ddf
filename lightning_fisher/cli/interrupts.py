"""Ctrl-C and SIGTERM on the command line: one line and the shell's status (130 / 143), no traceback.

Lightning turns both into a ``SystemExit`` while a Trainer runs: Ctrl-C into ``sys.exit(1)``
(after its "Detected KeyboardInterrupt" line), SIGTERM into ``SIGTERMException``, a
``SystemExit`` with no code, which would end the process with status 0, as if it had succeeded.
:func:`interrupt_signal` tells those apart from a real exit; :func:`quiet_interrupt_while_starting`
covers the seconds before ``main`` runs, while the console script still imports torch.
Nothing here imports Lightning.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Optional

__all__ = ["interrupt_signal", "quiet_interrupt_while_starting", "restore_interrupt", "signal_name"]

_STARTING_LINE = "lightning-fisher: interrupted while starting; nothing was done\n"


def interrupt_signal(error: BaseException) -> Optional[int]:
    """The signal behind ``error`` when it is an interruption (Ctrl-C, or SIGTERM as Lightning reports it), else ``None``."""
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(error, SystemExit):
        if type(error).__name__ == "SIGTERMException":  # lightning.pytorch.utilities.exceptions
            return signal.SIGTERM
        if isinstance(error.__context__, KeyboardInterrupt):  # Lightning's sys.exit(1) on Ctrl-C
            return signal.SIGINT
    return None


def signal_name(signal_number: int) -> str:
    """``Ctrl-C`` for SIGINT, else the signal's name (``SIGTERM``)."""
    return "Ctrl-C" if signal_number == signal.SIGINT else signal.Signals(signal_number).name


def _starting_interrupted(signum: int, frame: Optional[FrameType]) -> None:
    sys.stderr.write(_STARTING_LINE)
    sys.stderr.flush()
    # Nothing has been done yet, and unwinding an import of torch half-way is what prints the
    # long traceback this handler exists to avoid.
    os._exit(128 + signum)


def quiet_interrupt_while_starting() -> None:
    """Until :func:`restore_interrupt`: Ctrl-C prints one line and exits 130 (set by the package on import, console script only)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _starting_interrupted)


def restore_interrupt() -> None:
    """Ctrl-C raises ``KeyboardInterrupt`` again (``main`` then turns it into one line)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _starting_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
