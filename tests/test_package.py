"""The package's shape: public names, and a core that does not load Lightning."""

from _fresh_python import assert_runs_in_fresh_python

import lightning_fisher

CORE_MODULES = [
    "lightning_fisher.accumulator",
    "lightning_fisher.allocation",
    "lightning_fisher.analysis_entry",
    "lightning_fisher.analysis_files",
    "lightning_fisher.analysis_session",
    "lightning_fisher.atomic_io",
    "lightning_fisher.candidates",
    "lightning_fisher.collector",
    "lightning_fisher.compare_plan",
    "lightning_fisher.compare_results",
    "lightning_fisher.fingerprint",
    "lightning_fisher.fisher_map",
    "lightning_fisher.map_backup",
    "lightning_fisher.map_summary",
    "lightning_fisher.natural_sort",
    "lightning_fisher.patterns",
    "lightning_fisher.per_sample_norms",
    "lightning_fisher.plain_analysis",
    "lightning_fisher.processes",
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
    "lightning_fisher.stability",
    "lightning_fisher.tensor_folder",
    "lightning_fisher.timesteps",
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
        "import lightning_fisher.map_summary, lightning_fisher.report, lightning_fisher.cli\n"
        "heavy = {'peft', 'lightning', 'torchmetrics', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "from lightning_fisher import lora_config_from_fisher_map\n"
        "assert 'peft' in sys.modules\n"
    )
    assert_runs_in_fresh_python(code)
