"""The package's shape: public names, and a core that does not load Lightning."""

from _fresh_python import assert_runs_in_fresh_python

import lightning_fisher

CORE_MODULES = [
    "lightning_fisher.analysis.accumulator",
    "lightning_fisher.allocation.trace_rule",
    "lightning_fisher.analysis.entry",
    "lightning_fisher.analysis.files",
    "lightning_fisher.analysis.session",
    "lightning_fisher.data.atomic_io",
    "lightning_fisher.analysis.candidates",
    "lightning_fisher.analysis.collector",
    "lightning_fisher.compare.plan",
    "lightning_fisher.compare.results",
    "lightning_fisher.analysis.fingerprint",
    "lightning_fisher.fisher_map.map",
    "lightning_fisher.fisher_map.backup",
    "lightning_fisher.fisher_map.summary",
    "lightning_fisher.data.natural_sort",
    "lightning_fisher.fisher_map.patterns",
    "lightning_fisher.analysis.per_sample_norms",
    "lightning_fisher.analysis.plain_loop",
    "lightning_fisher.analysis.processes",
    "lightning_fisher.peft_factory",
    "lightning_fisher.peft_factory.export",
    "lightning_fisher.peft_factory.flat",
    "lightning_fisher.peft_factory.quantized",
    "lightning_fisher.peft_factory.verify",
    "lightning_fisher.report",
    "lightning_fisher.report.frontier",
    "lightning_fisher.report.grid",
    "lightning_fisher.report.plot",
    "lightning_fisher.report.table",
    "lightning_fisher.analysis.stability",
    "lightning_fisher.data.tensor_folder",
    "lightning_fisher.analysis.timesteps",
    "lightning_fisher.wording",
]


def test_public_names_import():
    for name in lightning_fisher.__all__:
        assert getattr(lightning_fisher, name) is not None, name
    from lightning_fisher import AdaptiveLoRA, FisherMap, allocate_ranks, lora_config_from_fisher_map, verify_adapter_ranks  # noqa: F401


def test_core_does_not_import_lightning():
    code = (
        "import sys\n"
        f"import {', '.join(CORE_MODULES)}\n"
        "import lightning_fisher\n"
        "from lightning_fisher import FisherMap, FisherCollector, allocate_ranks, analyze, lora_config_from_fisher_map, save_adapter\n"
        "loaded = sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')))\n"
        "assert not loaded, loaded\n"
        "from lightning_fisher import AdaptiveLoRA\n"
        "assert 'lightning.pytorch' in sys.modules\n"
    )
    assert_runs_in_fresh_python(code)


def test_reading_and_showing_a_map_imports_no_peft_lightning_or_torchmetrics():
    # `lightning-fisher show` and `--help` only read a map: PEFT (seconds to import) stays out
    # until a name that needs it is used.
    code = (
        "import sys\n"
        "import lightning_fisher\n"
        "from lightning_fisher import FisherMap, AllocationSettings, allocate_ranks\n"
        "from lightning_fisher.peft_factory import fisher_map_path\n"
        "import lightning_fisher.fisher_map.summary, lightning_fisher.report, lightning_fisher.cli\n"
        "heavy = {'peft', 'lightning', 'torchmetrics', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "from lightning_fisher import lora_config_from_fisher_map\n"
        "assert 'peft' in sys.modules\n"
    )
    assert_runs_in_fresh_python(code)


def test_the_map_modules_import_no_circle():
    """The map object uses its records, codec and summaries; those read the records only (issue: codec and
    summary typed against ``FisherMap`` while ``fisher_map.map`` imported them). Every import counts, those
    under ``TYPE_CHECKING`` and inside functions too."""
    import ast
    from pathlib import Path

    folder = Path(lightning_fisher.__file__).parent / "fisher_map"
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in names:
        tree = ast.parse((folder / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {t.split(".")[2] for t in targets if t.startswith("lightning_fisher.fisher_map.")
                      and t.split(".")[2] in names}
        graph[name] = found - {name}
    assert graph["map"] >= {"codec", "records", "summary"}  # the map is built on them
    visiting, done = set(), set()

    def visit(node, trail):
        assert node not in visiting, " -> ".join([*trail, node])
        if node in done:
            return
        visiting.add(node)
        for other in sorted(graph[node]):
            visit(other, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(names):
        visit(name, [])
