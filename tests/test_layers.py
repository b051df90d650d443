"""The layering contracts of pyproject.toml's [tool.importlinter], checked by import-linter itself.

Lower layers never import higher ones (model <- training <- serving/measure <- planning <- cli),
and nothing on the estimator's import path imports torch, transformers, bitsandbytes or peft.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli")
ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status = importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert status == importlinter_cli.EXIT_STATUS_SUCCESS, out
    assert "0 broken" in out


def test_every_subpackage_states_its_job() -> None:
    for init in sorted((ROOT / "memplan").glob("*/__init__.py")):
        doc = init.read_text().strip()
        assert doc.startswith('"""'), f"{init.parent.name}/__init__.py has no docstring stating its job"
