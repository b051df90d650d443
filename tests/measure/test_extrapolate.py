"""Per-layer extrapolation of --layers runs (memplan.measure.extrapolate, `memplan validate --extrapolate`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.measure.extrapolate import depth_fits, depth_frame
from memplan.measure.records import read_records

ROOT = Path(__file__).resolve().parents[2]
H100 = ROOT / "profiles" / "cuda-h100.jsonl"


def thirteen_b() -> list[dict]:
    return [r for r in read_records([H100]) if r["setup"]["model"] == "llama2-13b" and r.get("layers") in (4, 8)]


def test_llama2_13b_from_4_and_8_layers_matches_the_full_depth_estimate() -> None:
    # profiles/cuda-h100.jsonl: Llama-2-13B nf4+dq QLoRA measured on the H100 with --layers 4 and 8.
    records = thirteen_b()
    assert sorted(r["layers"] for r in records) == [4, 8]
    fit = next(f for f in depth_fits(records) if f.metric == "steady_peak_bytes")
    by_depth = {r["layers"]: r["measured"]["steady_peak_bytes"] for r in records}
    assert fit.full_depth == 40  # Llama-2-13B's num_hidden_layers
    assert fit.per_layer_bytes == (by_depth[8] - by_depth[4]) / 4
    assert fit.extrapolated_bytes == round(by_depth[4] + 36 * fit.per_layer_bytes)
    assert abs(fit.error_vs_predicted) < 0.03  # the estimator at full depth against the measured line
    assert fit.measured_full_bytes is None and fit.extrapolation_error is None


def synthetic(depths: tuple[int | None, ...], value) -> list[dict]:
    """Copies of a real 13B record with `steady_peak_bytes` set by hand per depth."""
    base = thirteen_b()[0]
    out = []
    for d in depths:
        r = copy.deepcopy(base)
        r["layers"] = d
        r["measured"]["steady_peak_bytes"] = value(d)
        r["measured"]["nvml_peak_bytes"] = None
        out.append(r)
    return out


def test_three_depths_fit_a_line_and_a_full_depth_run_checks_it() -> None:
    # 1 GB fixed + 100 MB per layer, with the 6-layer point 8 MB high: the least-squares line
    # through (2, 1.2e9), (4, 1.4e9), (6, 1.608e9) has slope 0.816e9 / 8 = 102 MB and intercept
    # 1.402667e9 - 4 * 102e6 = 0.994667 GB (worked by hand), so 40 layers -> 5.074667 GB; the
    # full-depth run measured 5.0 GB; residuals +1.33, -2.67, +1.33 MB.
    records = synthetic((2, 4, 6, None), lambda d: 5_000_000_000 if d is None else 1_000_000_000 + d * 100_000_000 + (8_000_000 if d == 6 else 0))
    [fit] = depth_fits(records)
    assert fit.depths == (2, 4, 6)
    assert fit.per_layer_bytes == pytest.approx(102_000_000)
    assert fit.extrapolated_bytes == 5_074_666_667
    assert fit.measured_full_bytes == 5_000_000_000
    assert fit.extrapolation_error == pytest.approx(0.0149333, rel=1e-5)
    assert fit.max_residual_bytes == pytest.approx(2_666_667, abs=1)


def test_one_depth_or_failed_runs_give_no_fit() -> None:
    records = synthetic((4,), lambda d: 10**9)
    assert depth_fits(records) == []
    records = synthetic((4, 8), lambda d: 10**9)
    records[1]["outcome"] = "oom"
    assert depth_frame(records).empty


def test_cli_prints_the_table_and_csv(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["validate", "--extrapolate", str(H100)]) == 0
    out = capsys.readouterr().out
    assert "llama2-13b lora nf4+dq" in out and "L4,8 -> 40" in out
    assert main(["validate", "--extrapolate", "-f", "json", str(H100)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["metric"] for r in rows} == {"steady_peak_bytes", "nvml_peak_bytes"}
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    assert main(["validate", "--extrapolate", str(empty)]) == 2  # no records at all: say so, exit 2
    assert "no profile records in" in capsys.readouterr().err
    one_depth = tmp_path / "one.jsonl"  # records, but none measured at two truncated depths
    one_depth.write_text(next(line for line in H100.read_text().splitlines() if '"layers":null' in line) + "\n")
    assert main(["validate", "--extrapolate", str(one_depth)]) == 0
    assert "no setup was measured at two or more truncated depths" in capsys.readouterr().out
