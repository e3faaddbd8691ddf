"""Command-line spelling: Side-Step's dashed flags on top of jsonargparse's underscored ones."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["normalize_flags"]

# Flags that stand for a nested option of LightningCLI. They are moved to the end of the
# command line, after any --model / --config that decides what they refer to.
ALIASES = {
    "--ignore_fisher_map": "--adaptive_lora.ignore_fisher_map",
    "--checkpoint_dir": "--model.init_args.checkpoint_dir",
}
SWITCHES = {"--adaptive_lora.ignore_fisher_map"}
BOOLEANS = {"true", "false"}


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """``--rank-min 16`` -> ``--rank_min 16``; the aliases above; everything else unchanged.

    Only the flag name is rewritten (``--timestep-focus=0.2,0.5`` keeps its value), and only
    for top-level flags: dotted ones (``--trainer.max_epochs``) are jsonargparse's own.
    ``--ignore-fisher-map`` works as a switch and also takes ``true`` / ``false``.
    """
    args = list(argv)
    out: list[str] = []
    moved: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        flag, equals, value = arg.partition("=")
        if "." not in flag:
            flag = "--" + flag[2:].replace("-", "_")
        if flag not in ALIASES:
            out.append(flag + equals + value)
            continue
        target = ALIASES[flag]
        if not equals:
            if target in SWITCHES and (index >= len(args) or args[index].lower() not in BOOLEANS):
                value = "true"
            elif index < len(args):
                value = args[index]
                index += 1
        moved.append(f"{target}={value}")
    return out + moved
