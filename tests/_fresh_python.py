"""Run a snippet in a fresh interpreter: what a module imports can only be seen before anything else did."""

import subprocess
import sys


def assert_runs_in_fresh_python(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
