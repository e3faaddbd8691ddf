"""``lightning-fisher``: the command line.

Subcommands:

- ``analyze``: Fisher analysis of a model on a dataset folder; writes ``fisher_map.json``.
- ``fit`` / ``validate`` / ``test``: LightningCLI training with the map applied at fit start.
- ``show``: a readable table (and optionally a heatmap) of a map.
- ``reallocate``: a stored map with another rank budget or criterion, without a new analysis.
- ``compare``: does the map pay off on your data? Flat vs map fits, side by side.
- ``wizard``: the analysis choices as questions; saves a config ``analyze`` accepts.
- ``demo``: the whole workflow on a real model and real data.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from collections.abc import Sequence
from typing import Callable, Optional

__all__ = ["main"]

USAGE = """usage: lightning-fisher {analyze,fit,validate,test,show,reallocate,compare,wizard,demo} [options]

Fisher-guided LoRA placement and ranks for PyTorch Lightning and PEFT.

subcommands:
  analyze    measure per-module Fisher scores on a dataset folder and write fisher_map.json
  fit        train with LightningCLI; a fisher_map.json in the dataset folder sets the LoRA ranks
  validate   LightningCLI validate, with the same adapters
  test       LightningCLI test, with the same adapters
  show       print a map as a table (--plot writes a heatmap)
  reallocate another rank budget or criterion for a stored map, without a new analysis
  compare    short fits of the map vs flat LoRA at the same parameters, budget by budget (--plot a frontier)
  wizard     answer questions instead of writing a config; saves the YAML and runs analyze
  demo       analyse and fine-tune the real all-MiniLM-L6-v2 on real drug reviews (CPU, minutes)

Run 'lightning-fisher SUBCOMMAND --help' for the options of each.
"""


def _analyze(argv: list[str]) -> int:
    from lightning_fisher.cli.lightning_clis import run_analyze

    return run_analyze(argv)


def _train(subcommand: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from lightning_fisher.cli.lightning_clis import run_trainer_subcommand

        return run_trainer_subcommand(subcommand, argv)

    return run


def _show(argv: list[str]) -> int:
    from lightning_fisher.cli.show import run_show

    return run_show(argv)


def _reallocate(argv: list[str]) -> int:
    from lightning_fisher.cli.reallocate import run_reallocate

    return run_reallocate(argv)


def _compare(argv: list[str]) -> int:
    from lightning_fisher.cli.compare_command import run_compare

    return run_compare(argv)


def _wizard(argv: list[str]) -> int:
    from lightning_fisher.cli.wizard import run_wizard

    return run_wizard(argv)


def _demo(argv: list[str]) -> int:
    from lightning_fisher.cli.demo import run_demo

    return run_demo(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "analyze": _analyze,
    "fit": _train("fit"),
    "validate": _train("validate"),
    "test": _train("test"),
    "show": _show,
    "reallocate": _reallocate,
    "demo": _demo,
    "wizard": _wizard,
    "compare": _compare,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lightning-fisher`` console script."""
    from lightning_fisher.cli.error_reason import error_reason
    from lightning_fisher.cli.interrupts import interrupt_signal, restore_interrupt, signal_name
    from lightning_fisher.cli.quiet import lightning_noise_filtered
    from lightning_fisher.errors import CommandInterrupted, LightningFisherError

    restore_interrupt()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from lightning_fisher import __version__

        print(f"lightning-fisher {__version__}")
        return 0
    command = SUBCOMMANDS.get(args[0])
    if command is None:
        print(f"lightning-fisher: unknown subcommand {args[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    try:
        with lightning_noise_filtered(f"lightning-fisher {args[0]}"):
            return command(args[1:])
    except CommandInterrupted as error:
        print(f"lightning-fisher {args[0]}: {error}", file=sys.stderr)
        return error.exit_code
    except (KeyboardInterrupt, SystemExit) as error:
        # Ctrl-C, or SIGTERM as Lightning reports it (a SystemExit that would exit 0): one line
        # and the shell's status for the signal, not a traceback through whatever was running.
        signal_number = interrupt_signal(error)
        if signal_number is None or os.environ.get("LIGHTNING_FISHER_DEBUG"):
            raise
        print(f"lightning-fisher {args[0]}: interrupted ({signal_name(signal_number)}) before it finished",
              file=sys.stderr)
        return 128 + signal_number
    except (ArgumentError, LightningFisherError, ValueError, ImportError) as error:
        if os.environ.get("LIGHTNING_FISHER_DEBUG"):
            raise
        # Problems with the user's input: the reason says what to do, a traceback or the
        # parser's usage (60 lines for a LightningCLI) would bury it. Parse errors exit 2, as
        # argparse's do; everything else 1.
        print(f"lightning-fisher {args[0]}: error: {error_reason(error)}", file=sys.stderr)
        return 2 if isinstance(error, ArgumentError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
