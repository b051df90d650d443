"""The training-memory model against the profiler's CPU ledger: >= 40 real runs.

Ground truth is the ledger (every live tensor storage of a real transformers +
PEFT + bitsandbytes step, measured in this test). Thresholds from the issue:
weights within 0.1%; steady-state peak within 3% on every run and a median of at
most 1%; each category the ledger attributes within 5%. The comparison table is
printed and kept as reports/validation_cpu.csv.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "measure"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frame(tmp_path_factory, pytestconfig):
    import validate_cpu
    from conftest import REPORTS

    records_path = tmp_path_factory.mktemp("validation") / "cpu.jsonl"
    records = validate_cpu.run_matrix(records_path)
    failed = [(r["setup"]["model"], r.get("error") or r.get("oom")) for r in records if r["outcome"] != "ok"]
    assert not failed, f"profiled runs failed: {failed}"
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        result = validate_cpu.report(records, ROOT / "reports" / "validation_cpu.csv")
    pytestconfig.stash[REPORTS]["CPU validation: estimate vs ledger (reports/validation_cpu.csv)"] = table.getvalue()
    return result


def test_matrix_is_large_enough(frame) -> None:
    assert frame[frame.component == "peak"].shape[0] >= 40


def test_weights_within_0_1_percent(frame) -> None:
    w = frame[frame.component == "weights"]
    assert w.rel_error.abs().max() <= 0.001, w.loc[w.rel_error.abs().idxmax()].to_dict()


def test_steady_peak_within_3_percent_median_1_percent(frame) -> None:
    p = frame[frame.component == "peak"]
    worst = p.loc[p.rel_error.abs().idxmax()]
    assert worst.rel_error.__abs__() <= 0.03, worst.to_dict()
    assert statistics.median(p.rel_error.abs()) <= 0.01


@pytest.mark.parametrize("component", ["adapters", "gradients", "optimizer_states", "activations"])
def test_each_category_within_5_percent(frame, component) -> None:
    c = frame[(frame.component == component) & frame.rel_error.notna()]
    assert len(c), f"the ledger attributed no {component}"
    worst = c.loc[c.rel_error.abs().idxmax()]
    assert abs(worst.rel_error) <= 0.05, worst.to_dict()
