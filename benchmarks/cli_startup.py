"""Start-up time of the command line, measured against ``python -c "import torch"`` in the same run.

Every command the user runs first pays for its imports. ``lightning-fisher --help`` and
``lightning-fisher show MAP`` need torch (the map module uses it) but not PEFT, Lightning,
torchmetrics or transformers; the target is at most 1.5x the time of importing torch alone.

Each round runs every command once, in a shuffled order, as a fresh process; the table gives the
median over rounds and each command's ratio to ``import torch``, paired per round.

    python benchmarks/cli_startup.py [--rounds 11] [--output benchmarks/results/cli_startup.md]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch import nn

from lightning_fisher import FisherMap
from lightning_fisher.data.atomic_io import write_text_atomic

TARGET = 1.5


def _example_map(folder: Path) -> Path:
    """A map of a 40-layer MLP (about 12 KB of JSON), the size of a small real map."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)])
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    scores = {name: float(i + 1) for i, name in enumerate(names)}
    return FisherMap.from_scores(scores, model, rank=8, rank_min=2, rank_max=32).save(folder)


def _commands(map_file: Path) -> dict[str, list[str]]:
    cli = shutil.which("lightning-fisher") or str(Path(sys.executable).with_name("lightning-fisher"))
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "lightning-fisher --help": [cli, "--help"],
        "lightning-fisher show MAP": [cli, "show", str(map_file)],
        "import check: show loads no PEFT, Lightning, torchmetrics, transformers": [
            sys.executable, "-c",
            "import sys, lightning_fisher.cli.show; "
            "assert not {'peft', 'lightning', 'transformers', 'torchmetrics'} & set(sys.modules), 'heavy import'",
        ],
    }


def _time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--output", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        commands = _commands(_example_map(Path(scratch)))
        baseline = next(iter(commands))
        for command in commands.values():  # warm the file cache; a failing command stops here
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        rng = random.Random(0)
        for _ in range(args.rounds):
            order = list(commands)
            rng.shuffle(order)
            for name in order:
                seconds[name].append(_time(commands[name]))

    lines = [
        f"| command | median s | ratio to `import torch` (median of per-round ratios) | target <= {TARGET}x |",
        "|---|---|---|---|",
    ]
    for name, values in seconds.items():
        if name.startswith("import check"):
            continue
        ratio = statistics.median(v / b for v, b in zip(values, seconds[baseline]))
        verdict = "-" if name == baseline else ("met" if ratio <= TARGET else "NOT met")
        lines.append(f"| `{name}` | {statistics.median(values):.2f} | {ratio:.2f}x | {verdict} |")
    lines.append("")
    lines.append(f"{args.rounds} rounds, shuffled order, fresh processes; `show` and its imports load no PEFT, "
                 "Lightning, torchmetrics or transformers (checked in the same run).")
    table = "\n".join(lines)
    print(table)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.output, f"# CLI start-up\n\n`python benchmarks/cli_startup.py`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
