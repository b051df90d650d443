"""memplan.measure.calibrate: fitting the CUDA device terms and the held-out error.

Reference: synthetic records built here whose measured bytes are the estimate plus known
constants (a workspace W, a CUDA context C and an allocator slack fraction F, the three
terms the module docstring defines). Calibration must recover exactly those constants, and
with them the held-out error is zero. The fit/held-out split is recomputed here from its
definition (first byte of sha256(record id) even -> fitting half).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from memplan.errors import ProfileError
from memplan.measure.calibrate import calibrate, write_device_terms
from memplan.model.catalog import load_model, with_layers
from memplan.training.device_terms import DeviceTerms
from memplan.training.estimate import estimate
from memplan.training.setup import Setup

W = 87_590_396  # workspace bytes
C = 543_162_368  # CUDA context: the value every committed H100 record measured
F = 0.0625  # allocator slack fraction (exact in binary, 5 decimals)

SETUPS = [
    Setup(model="llama2-7b", quant=q, seq_len=s, batch_size=b, grad_checkpointing=ck)
    for q in ("bf16", "nf4") for s in (256, 1024) for b in (1, 4) for ck in (False, True)
]


def in_fit_half(record_id: str) -> bool:
    return hashlib.sha256(record_id.encode()).digest()[0] % 2 == 0


def predicted_peak(setup: Setup, layers: int) -> int:
    return estimate(setup, model=with_layers(load_model(setup.model), layers), terms=DeviceTerms(device="cuda")).memory.peak


def synthetic(setup: Setup, rid: str, *, layers: int = 2, workspace: int = W, context: int = C, fraction: float = F) -> dict:
    steady = predicted_peak(setup, layers) + workspace
    return {
        "id": rid, "outcome": "ok", "layers": layers, "setup": setup.to_dict(),
        "measured": {"steady_peak_bytes": steady, "cuda_context_bytes": context,
                     "nvml_peak_bytes": context + steady + int(fraction * steady)},
    }


@pytest.fixture(scope="module")
def records() -> list[dict]:
    recs = [synthetic(s, f"rec-{i}") for i, s in enumerate(SETUPS)]
    halves = {in_fit_half(r["id"]) for r in recs}
    assert halves == {True, False}  # both halves populated, else the test proves little
    return recs


def test_recovers_the_constants_the_records_were_built_with(records: list[dict]) -> None:
    cal = calibrate(records)
    assert cal.terms.device == "cuda"
    assert cal.terms.workspace_bytes == W
    assert cal.terms.cuda_context_bytes == C
    assert cal.terms.allocator_fraction == F


def test_held_out_error_is_zero_when_the_model_is_exact(records: list[dict]) -> None:
    cal = calibrate(records)
    s = cal.summary()
    assert s["held_out_records"] == sum(not in_fit_half(r["id"]) for r in records) > 0
    assert s["fit_records"] + s["held_out_records"] == s["records"] == len(records)
    # slack = int(F x steady) / steady is F to within 1 / steady; the rounding to 5 decimals makes it exact
    assert s["allocated_max_abs_error"] == 0
    assert s["nvml_max_abs_error"] < 1e-9
    for row in cal.rows:
        assert row.used_for_fit == in_fit_half(row.record_id)
        assert row.predicted_allocated == row.measured_allocated


def test_medians_ignore_outliers_in_the_fitting_half(records: list[dict]) -> None:
    # One fitting record with a wild workspace must not move the median of the others.
    recs = list(records)
    idx = next(i for i, r in enumerate(recs) if in_fit_half(r["id"]))
    recs[idx] = synthetic(SETUPS[idx], recs[idx]["id"], workspace=50 * W)
    assert calibrate(recs).terms.workspace_bytes == W


def test_held_out_records_do_not_influence_the_fit(records: list[dict]) -> None:
    recs = [synthetic(SETUPS[i], r["id"], workspace=10 * W, context=3 * C) if not in_fit_half(r["id"]) else r
            for i, r in enumerate(records)]
    cal = calibrate(recs)
    assert (cal.terms.workspace_bytes, cal.terms.cuda_context_bytes) == (W, C)
    # ... but they show up as held-out error: predicted = measured - 9W there
    s = cal.summary()
    assert s["allocated_max_abs_error"] > 0


def test_a_negative_workspace_is_floored_at_zero() -> None:
    recs = [synthetic(s, f"neg-{i}", workspace=-1_000_000) for i, s in enumerate(SETUPS)]
    assert calibrate(recs).terms.workspace_bytes == 0


def test_failed_and_cpu_records_are_ignored(records: list[dict]) -> None:
    noise = [
        dict(synthetic(SETUPS[0], "oom"), outcome="oom"),
        {**synthetic(SETUPS[0], "cpu"), "setup": Setup(model="llama2-7b", device="cpu").to_dict()},
        {**synthetic(SETUPS[0], "nomeasure"), "measured": {}},
    ]
    cal = calibrate(records + noise)
    assert len(cal.rows) == len(records)
    assert {r.record_id for r in cal.rows} == {r["id"] for r in records}


def test_too_few_records_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="at least 2 successful CUDA records.*found 1"):
        calibrate([synthetic(SETUPS[0], "only")])
    with pytest.raises(ProfileError, match="found 0"):
        calibrate([])


def test_write_device_terms_merges_and_keeps_other_devices(tmp_path: Path, records: list[dict]) -> None:
    path = tmp_path / "device_terms.json"
    path.write_text(json.dumps({"rocm": {"cuda_context_bytes": 1}, "cuda": {"stale": True}}))
    cal = calibrate(records)
    assert write_device_terms(cal, path) == path
    raw = json.loads(path.read_text())
    assert raw["rocm"] == {"cuda_context_bytes": 1}
    assert "stale" not in raw["cuda"] and "device" not in raw["cuda"]
    assert (raw["cuda"]["cuda_context_bytes"], raw["cuda"]["workspace_bytes"], raw["cuda"]["allocator_fraction"]) == (C, W, F)
    assert raw["cuda"]["held_out"]["records"] == len(records)
    assert [p.name for p in tmp_path.iterdir()] == ["device_terms.json"]  # no temporary left behind


def test_committed_terms_are_what_calibrate_fits_from_the_committed_records() -> None:
    """data/device_terms.json says it came from `memplan calibrate` over profiles/: it still must.
    (If the estimator changes, rerun `memplan calibrate` and commit the file.)"""
    from memplan.measure.records import read_records
    from memplan.paths import data_dir, profiles_dir

    files = sorted(profiles_dir().glob("cuda-*.jsonl"))
    if not files:
        pytest.skip("no committed CUDA records")
    cal = calibrate(read_records(files))
    committed = json.loads((data_dir() / "device_terms.json").read_text())["cuda"]
    assert cal.terms.cuda_context_bytes == committed["cuda_context_bytes"]  # a direct measurement
    # workspace and slack are medians of residuals: allow 1 MiB / 0.005 of drift from estimator changes
    assert abs(cal.terms.workspace_bytes - committed["workspace_bytes"]) <= 2**20
    assert cal.terms.allocator_fraction == pytest.approx(committed["allocator_fraction"], abs=0.005)


def test_calibrate_and_compare_predict_the_same_bytes_for_every_committed_record() -> None:
    """One record, one prediction: calibrate's allocated/NVML prediction under the fitted terms
    equals what `memplan validate` (compare_record) predicts for the same record under the same
    terms. They share `records.record_spec`; this pins that they also share the peak they read
    (allocated excludes paged optimizer state, the device peak includes it)."""
    from unittest import mock

    from memplan.measure import compare
    from memplan.measure.records import read_records
    from memplan.paths import profiles_dir

    files = sorted(profiles_dir().glob("cuda-*.jsonl"))
    if not files:
        pytest.skip("no committed CUDA records")
    records = read_records(files)
    cal = calibrate(records)
    by_id = {r["id"]: r for r in records}
    real_estimate = estimate

    def with_fitted_terms(setup, *, model=None, terms=None):
        return real_estimate(setup, model=model, terms=cal.terms)

    with mock.patch("memplan.training.estimate.estimate", with_fitted_terms):
        for row in cal.rows:
            parts = {r["component"]: r["predicted_bytes"] for r in compare.compare_record(by_id[row.record_id])}
            assert parts["peak"] == row.predicted_allocated, row.label
            assert parts["device_peak"] == row.predicted_nvml, row.label
