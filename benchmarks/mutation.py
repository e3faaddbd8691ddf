"""Mutation testing of the core: how many small planted bugs the tests of each module catch.

Uses mutmut 3 (``pip install -e ".[mutation]"``; never installed by CI). mutmut copies the
package into ``mutants/``, plants every mutation at once behind a switch (a "trampoline" per
function), records which tests reach which function, and then runs, per mutant, only those
tests in a forked process: a module takes minutes, not hours, and the working tree is never
edited. Each module runs in its own scratch folder, ``.mutation/<module>/`` (git-ignored), with
the test files listed for it in :data:`MODULES`, so one module's run neither waits for the
whole suite nor disturbs another checkout.

A mutant *survives* when every test that reaches it still passes. Survivors listed in
``benchmarks/mutation_equivalent.txt`` (one a line: the mutant's name, then why it cannot change
behaviour) are left out of the kill rate and listed apart. The kill rate is
``killed / (killed + survived + no tests + timeout + suspicious)``: a mutant no selected test
reaches ("no tests") counts against it. ``raise`` and ``warnings.warn`` statements are not
mutated unless ``--mutate-messages`` (:data:`MESSAGE_PATTERNS`).

mutmut leaves decorated functions alone (``@property``, ``@contextlib.contextmanager``, a
function wrapped by ``@other_spellings``...): it cannot set up its switch under a decorator.
So that their code is tested too, the scratch folder holds a copy of the package in which
the files to mutate have such functions *undecorated*: the decorator lines are blanked and
``name = decorator(name)`` is written on the blank line after the function, which is the same
object at run time and keeps every line number. Functions it cannot rewrite that way
(``@x.setter``, ``@overload``, ``@abstractmethod``, a cache, no blank line after) stay unmutated,
and the report lists them.

    python benchmarks/mutation.py                       # every module in MODULES, in order
    python benchmarks/mutation.py --module allocation --module stability
    python benchmarks/mutation.py --module criteria --max-children 1
    python benchmarks/mutation.py --report              # rewrite mutation.md from mutation.json only

Results: printed, and ``benchmarks/results/mutation.md`` (with ``mutation.json``, which keeps
the modules not run this time), both written atomically.
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lightning_fisher.data.atomic_io import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutation"
EQUIVALENT_FILE = ROOT / "benchmarks" / "mutation_equivalent.txt"
RESULTS_MD = ROOT / "benchmarks" / "results" / "mutation.md"
RESULTS_JSON = ROOT / "benchmarks" / "results" / "mutation.json"

#: module -> (the source files to mutate, relative to the repository root; the test files that
#: cover them). The test files are the module's own ``tests/test_<module>.py`` plus the others
#: that test it directly; not every file that reaches it, so that a module runs in minutes. An
#: entry starting with ``-`` is a pytest option (``--deselect=FILE::TEST`` leaves out a slow test).
MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "criteria": (
        ("lightning_fisher/allocation/criteria/*.py",),
        ("tests/test_criteria.py", "tests/test_spectrum_stopping.py", "tests/test_stability.py"),
    ),
    "allocation": (
        ("lightning_fisher/allocation/trace_rule.py",),
        ("tests/test_allocation.py", "tests/test_allocation_settings.py"),
    ),
    "spectrum_allocation": (
        ("lightning_fisher/allocation/spectrum_rule.py",),
        ("tests/test_spectrum_allocation.py", "tests/test_spectrum.py"),
    ),
    "stability": (
        ("lightning_fisher/analysis/stability.py",),
        ("tests/test_stability.py", "tests/test_spectrum_stopping.py"),
    ),
    "patterns": (("lightning_fisher/fisher_map/patterns.py",), ("tests/test_patterns.py",)),
    "atomic_io": (("lightning_fisher/data/atomic_io.py",), ("tests/test_atomic_io.py",)),
    "module_names": (("lightning_fisher/analysis/module_names.py",), ("tests/test_module_names.py",)),
    "map_codec": (
        ("lightning_fisher/fisher_map/codec.py",),
        ("tests/test_fisher_map.py", "tests/test_fisher_map_versions.py"),
    ),
    "fingerprint": (
        ("lightning_fisher/analysis/fingerprint.py",),
        ("tests/test_fingerprint.py", "tests/test_module_names.py", "tests/test_peft_factory_model_check.py"),
    ),
    "accumulator": (("lightning_fisher/analysis/accumulator.py",), ("tests/test_accumulator.py",)),
    "candidates": (("lightning_fisher/analysis/candidates.py",), ("tests/test_candidates.py",)),
    "records": (
        ("lightning_fisher/fisher_map/records.py",),
        ("tests/test_records.py", "tests/test_fisher_map.py", "tests/test_fisher_map_versions.py"),
    ),
    "reallocate_show": (
        ("lightning_fisher/cli/reallocate.py", "lightning_fisher/cli/show.py"),
        ("tests/test_reallocate.py", "tests/test_show.py"),
    ),
    "peft_factory": (
        # the logic the peft_factory tests test directly; rollback, step_size, export and record are
        # "peft_factory_fit" below, quantized is "quantized"
        tuple(f"lightning_fisher/peft_factory/{name}.py"
              for name in ("plan", "verify", "adapters", "flat", "injected", "locate", "adapter_root", "model_check")),
        ("tests/test_peft_factory.py", "tests/test_peft_factory_flat.py", "tests/test_peft_factory_locate.py",
         "tests/test_peft_factory_model_check.py"),
    ),
    "peft_factory_fit": (
        # what AdaptiveLoRA calls during a fit, tested directly (tests/test_adaptive_lora.py reaches
        # them through a Lightning fit per test, too slow to run per mutant)
        tuple(f"lightning_fisher/peft_factory/{name}.py" for name in ("rollback", "step_size", "export", "record")),
        ("tests/test_peft_factory_rollback.py", "tests/test_peft_factory_step_size.py",
         "tests/test_peft_factory_export.py", "tests/test_peft_factory_record.py"),
    ),
    "quantized": (
        # real bitsandbytes layers on CPU; test_quantized.py's other tests analyse and fit (minutes)
        ("lightning_fisher/peft_factory/quantized.py",),
        ("tests/test_peft_factory_quantized.py",
         "tests/test_quantized.py::test_quantization_declared_sets_only_the_missing_flags_and_restores_them"),
    ),
    "settings": (
        ("lightning_fisher/allocation/settings.py", "lightning_fisher/analysis/options.py"),
        ("tests/test_allocation_settings.py", "tests/test_option_spellings.py", "tests/test_analysis_options.py"),
    ),
    "timesteps": (
        ("lightning_fisher/analysis/timesteps.py", "lightning_fisher/analysis/scheduler_steps.py"),
        ("tests/test_timestep_focus.py", "tests/test_scheduler_steps.py"),
    ),
    "per_sample_norms": (("lightning_fisher/analysis/per_sample_norms.py",), ("tests/test_per_sample_norms.py",)),
    "collector": (
        ("lightning_fisher/analysis/collector.py",),
        # the real-MiniLM test (5 s a run) checks what the small models' exact tests check: left out for time
        ("tests/test_collector.py", "--deselect=tests/test_collector.py::test_minilm_frozen_matches_batch1_loop"),
    ),
    "spectrum": (
        ("lightning_fisher/analysis/spectrum.py",),
        ("tests/test_spectrum.py", "tests/test_spectrum_stopping.py", "tests/test_spectrum_mutants.py"),
    ),
}

STATUS = {  # mutmut's exit codes (mutmut/stats.py)
    1: "killed", 3: "killed", 37: "killed",
    0: "survived", 5: "no tests", 33: "no tests",
    36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
    34: "skipped", None: "not checked",
}
#: Statements left unmutated unless ``--mutate-messages``: raising an exception and warning. Inside
#: them mutmut can only change the message's wording (``"XX" + text + "XX"``, upper/lower case,
#: ``None``); the tests check messages by their key words (``match=``), not letter by letter, so
#: those mutants would survive without a bug. The conditions that raise or warn are mutated.
MESSAGE_PATTERNS = (r"^\s*raise \w+(\.\w+)*\(", r"^\s*warnings\.warn\(")
COUNTED = ("killed", "survived", "no tests", "timeout", "suspicious")


def read_equivalent(path: Path = EQUIVALENT_FILE) -> dict[str, str]:
    """``{mutant name: reason}`` from the equivalent-mutants file (``#`` starts a comment line)."""
    equivalent: dict[str, str] = {}
    if not path.exists():
        return equivalent
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: {name} has no reason; write why it cannot change behaviour")
        equivalent[name] = reason.strip()
    return equivalent


#: Decorators that stay on their function: mutmut handles the first two itself; a setter needs the
#: property by name while the class body runs; overloads and abstract methods have no body worth
#: mutating; a cache would answer from the value the unmutated function left in the forked process.
KEPT_DECORATORS = re.compile(
    r"^(staticmethod|classmethod|(typing\.)?overload|(abc\.)?abstractmethod|\w+\.(setter|getter|deleter)"
    r"|(functools\.)?(lru_cache|cache|cached_property)(\(.*\))?)$"
)


def undecorated(source: str) -> tuple[str, list[str]]:
    """``source`` with its module- and class-level decorated functions undecorated, line numbers kept.

    ``@a`` / ``@b(x)`` / ``def f`` becomes ``def f`` with the decorator lines blank and
    ``f = a(b(x)(f))`` on the blank line after the body: the same object once the statement
    has run, and a function mutmut mutates. Returns the new text and the ``name (reason)`` of
    each decorated function left as it was.
    """
    import ast

    lines = source.splitlines()
    kept: list[str] = []
    scopes = [ast.parse(source)]
    functions = []
    while scopes:
        scope = scopes.pop()
        for node in scope.body:
            if isinstance(node, ast.ClassDef):
                scopes.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.decorator_list:
                functions.append(node)
    for node in sorted(functions, key=lambda n: n.lineno, reverse=True):
        decorators = [ast.unparse(d) for d in node.decorator_list]
        if any(KEPT_DECORATORS.match(d) for d in decorators):
            if not (len(decorators) == 1 and decorators[0] in ("staticmethod", "classmethod")):
                kept.append(f"{node.name} (@{', @'.join(decorators)})")
            continue
        after = node.end_lineno  # 0-based index of the line after the function
        if after < len(lines) and lines[after].strip():
            kept.append(f"{node.name} (no blank line after it)")
            continue
        indent = lines[node.lineno - 1][: node.col_offset]
        wrapped = node.name
        for decorator in reversed(decorators):
            wrapped = f"({decorator})({wrapped})"
        statement = f"{indent}{node.name} = {wrapped}"
        if after < len(lines):
            lines[after] = statement
        else:
            lines.append(statement)
        first = min(d.lineno for d in node.decorator_list)
        for index in range(first - 1, node.lineno - 1):
            lines[index] = ""
    return "\n".join(lines) + ("\n" if source.endswith("\n") else ""), sorted(kept)


def _mutmut_config(sources: tuple[str, ...], tests: tuple[str, ...], mutate_messages: bool) -> str:
    """The scratch folder's setup.cfg: the project's pytest settings and a [mutmut] section."""
    project = configparser.ConfigParser(interpolation=None)
    project.read(ROOT / "setup.cfg")
    config = configparser.ConfigParser(interpolation=None)
    config["tool:pytest"] = dict(project["tool:pytest"])
    config["tool:pytest"]["addopts"] = "-p no:cacheprovider -x -q"
    config["mutmut"] = {
        "source_paths": "lightning_fisher",
        "only_mutate": "\n" + "\n".join(sources),
        "pytest_add_cli_args_test_selection": "\n" + "\n".join(tests),
        "use_git_change_detection": "false",
        # copied into mutants/ next to the mutated package (tests/ and setup.cfg always are)
        "also_copy": "\n" + "\n".join(e.name for e in _linked() if e.name not in ("lightning_fisher", "tests")),
    }
    if not mutate_messages:
        config["mutmut"]["do_not_mutate_patterns"] = "\n" + "\n".join(MESSAGE_PATTERNS)
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


def _linked() -> list[Path]:
    """What a scratch folder links to: the repository's top level, less hidden and built entries."""
    return [e for e in sorted(ROOT.iterdir())
            if not e.name.startswith(".") and not e.name.endswith(".egg-info") and e.name != "setup.cfg"]


def prepare(module: str, mutate_messages: bool = False) -> Path:
    """A fresh scratch folder for ``module``: links to the package and tests, its own setup.cfg."""
    sources, tests = MODULES[module]
    missing = [t for t in tests if not t.startswith("-") and not (ROOT / t.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"{module}: test files in MODULES do not exist: {missing}")
    folder = SCRATCH / module
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for entry in _linked():  # tests read files at the repository root too (configs/ presets)
        if entry.name == "lightning_fisher":  # a copy: the files to mutate are undecorated in it
            shutil.copytree(entry, folder / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for path in sorted({p for pattern in sources for p in folder.glob(pattern)}):
        path.write_text(undecorated(path.read_text())[0])
    (folder / "setup.cfg").write_text(_mutmut_config(sources, tests, mutate_messages))
    return folder


def unmutated(module: str) -> list[str]:
    """``file: function (why)`` for each decorated function of ``module``'s sources left unmutated."""
    return [f"{path.relative_to(ROOT)}: {name}" for pattern in MODULES[module][0] for path in sorted(ROOT.glob(pattern))
            for name in undecorated(path.read_text())[1]]


def _line_of(path: str, function: str, hunk_start: int, offset: int, removed: list[str]) -> int:
    """The source line a mutant changes: the diff's line in the function, moved to the nearest
    source line with the removed text (decorators shift the diff's count)."""
    lines = (ROOT / path).read_text().splitlines()
    defs = [i for i, text in enumerate(lines, start=1) if re.match(rf"[ \t]*(async[ \t]+)?def {re.escape(function)}\(", text)]
    estimate = (defs[0] if defs else 1) + hunk_start - 1 + offset
    if not removed:
        return estimate
    same = [i for i, text in enumerate(lines, start=1) if text.strip() == removed[0].strip()]
    return min(same, key=lambda i: abs(i - estimate)) if same else estimate


def describe(folder: Path, name: str) -> dict[str, object]:
    """File, line and the changed lines of one mutant, from ``mutmut show``."""
    diff = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=folder, capture_output=True, text=True
    ).stdout
    body = diff.split("@@", 2)[-1].splitlines()[1:] if "@@" in diff else []
    removed = [line[1:] for line in body if line.startswith("-")]
    added = [line[1:] for line in body if line.startswith("+")]
    hunk = re.search(r"^@@ -(\d+)", diff, flags=re.M)
    module_path, _, mangled = name.rpartition(".")
    path = module_path.replace(".", "/") + ".py"
    function = re.sub(r"__mutmut_\d+$", "", mangled)
    function = function.split("ǁ")[-1] if "ǁ" in function else re.sub(r"^x_", "", function)
    offset = next((i for i, text in enumerate(body) if text[:1] in "-+"), 0)
    line = _line_of(path, function, int(hunk.group(1)), offset, removed) if hunk else 0
    return {"name": name, "file": path, "line": line, "from": " / ".join(s.strip() for s in removed),
            "to": " / ".join(s.strip() for s in added)}


def collect(folder: Path, equivalent: dict[str, str]) -> dict[str, object]:
    """Counts and the survivors (with their diffs) of the finished run in ``folder``."""
    counts = {status: 0 for status in (*COUNTED, "equivalent", "skipped", "not checked")}
    survivors, equivalents = [], []
    for meta in sorted((folder / "mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = STATUS.get(code, "suspicious")
            if status in ("survived", "no tests", "timeout", "suspicious") and name in equivalent:
                counts["equivalent"] += 1
                equivalents.append({**describe(folder, name), "reason": equivalent[name]})
                continue
            counts[status] += 1
            if status in ("survived", "no tests", "suspicious"):
                survivors.append({**describe(folder, name), "status": status})
    counted = sum(counts[s] for s in COUNTED)
    return {
        "counts": counts,
        "kill_rate": counts["killed"] / counted if counted else None,
        "survivors": survivors,
        "equivalent": equivalents,
    }


def run_module(module: str, max_children: int, mutate_messages: bool = False) -> dict[str, object]:
    folder = prepare(module, mutate_messages)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
        cwd=folder, env=env, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    (folder / "mutmut.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not list((folder / "mutants").rglob("*.py.meta")):
        raise SystemExit(f"{module}: mutmut failed (exit {proc.returncode}); see {folder / 'mutmut.log'}\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    result = collect(folder, read_equivalent())
    result.update({
        "sources": list(MODULES[module][0]), "messages_mutated": mutate_messages, "unmutated": unmutated(module), "tests": list(MODULES[module][1]), "seconds": round(seconds),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    })
    return result


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "# Mutation testing",
        "",
        "    python benchmarks/mutation.py [--module NAME ...]",
        "",
        "mutmut 3, each module against the test files listed for it in `benchmarks/mutation.py`. "
        "Kill rate = killed / (killed + survived + no tests + timeout); equivalent mutants "
        "(`benchmarks/mutation_equivalent.txt`) are left out of it and listed below. `raise` and "
        "`warnings.warn` statements are not mutated (only their wording could change; "
        "`--mutate-messages` mutates them too). Decorated functions are mutated undecorated (see the "
        "script's docstring); those it cannot rewrite are listed at the end.",
        "",
        "| module | mutants | killed | survived | no tests | timeout | equivalent | kill rate | run time | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for module in [m for m in MODULES if m in results] + [m for m in results if m not in MODULES]:
        r = results[module]
        c = r["counts"]
        total = sum(c[s] for s in COUNTED) + c["equivalent"]
        rate = "-" if r["kill_rate"] is None else f"{100 * r['kill_rate']:.1f} %"
        lines.append(
            f"| `{module}` | {total} | {c['killed']} | {c['survived'] + c['suspicious']} | {c['no tests']} | "
            f"{c['timeout']} | {c['equivalent']} | **{rate}** | {r['seconds']} s | {r['date']} |"
        )
    for title, key in (("Survivors", "survivors"), ("Equivalent mutants (left out of the rate)", "equivalent")):
        lines += ["", f"## {title}", ""]
        rows = [(module, m) for module in results for m in results[module][key]]
        if not rows:
            lines.append("None.")
            continue
        for module, m in rows:
            why = f" ({m['status']})" if key == "survivors" else f": {m['reason']}"
            lines.append(f"- `{m['file']}:{m['line']}` `{m['from']}` -> `{m['to']}` [{m['name']}]{why}")
    lines += ["", "## Decorated functions left unmutated", ""]
    rows = [(module, name) for module in results for name in results[module].get("unmutated", [])]
    lines += [f"- `{name}` ({module})" for module, name in rows] or ["None."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=list(MODULES),
                        help="a module of MODULES (repeatable; default: all, in order)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--mutate-messages", action="store_true",
                        help="also mutate raise / warnings.warn statements (their wording; see MESSAGE_PATTERNS)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/results alone")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite results/mutation.md from results/mutation.json (no mutmut run)")
    args = parser.parse_args(argv)
    if args.report:
        write_text_atomic(RESULTS_MD, markdown(json.loads(RESULTS_JSON.read_text())))
        return 0
    if shutil.which("mutmut") is None and not (Path(sys.executable).parent / "mutmut").exists():
        raise SystemExit('mutmut is not installed: pip install -e ".[mutation]"')

    stored = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    for module in args.module or list(MODULES):
        print(f"{module}: mutating {', '.join(MODULES[module][0])} against {', '.join(MODULES[module][1])} ...",
              flush=True)
        result = run_module(module, args.max_children, args.mutate_messages)
        stored[module] = result
        rate = "-" if result["kill_rate"] is None else f"{100 * result['kill_rate']:.1f} %"
        print(f"{module}: {rate} killed ({result['counts']}) in {result['seconds']} s")
        for m in result["survivors"]:
            print(f"    survived: {m['file']}:{m['line']}  {m['from']!r} -> {m['to']!r}  [{m['name']}]")
        for m in result["equivalent"]:
            print(f"    equivalent: {m['file']}:{m['line']}  {m['from']!r} -> {m['to']!r}: {m['reason']}")
        if not args.no_write:  # after every module: a later failure keeps the finished ones
            write_text_atomic(RESULTS_JSON, json.dumps(stored, indent=1, ensure_ascii=False) + "\n", make_parents=True)
            write_text_atomic(RESULTS_MD, markdown(stored))
    return 0


if __name__ == "__main__":
    sys.exit(main())
