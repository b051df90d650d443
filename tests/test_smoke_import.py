"""The estimator's import path stays free of torch (startup speed is a feature)."""

import subprocess
import sys


def test_cli_import_does_not_pull_torch() -> None:
    code = "import sys, memplan.cli, memplan.training.estimate; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
