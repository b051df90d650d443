"""Run the CPU validation matrix (tests/measure/validation_matrix.py) through the real profiler
and print predicted vs measured per component, with relative errors.

    python benchmarks/validate_cpu.py [--out reports/validation_cpu.csv] [--records profiles/cpu-validation.jsonl] [--regression] [--workers 2]

The ledger (every live tensor storage, counted by the profiler) is the ground truth.
tests/measure/test_validation_cpu.py runs the same function and asserts the thresholds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "measure"))


def run_matrix(records_path: Path, *, regression_only: bool = False, workers: int = 2) -> list[dict[str, Any]]:
    """Profile the matrix (or its regression subset), `workers` runs at a time, resuming from
    `records_path`; the latest record of each setup, in matrix order."""
    import json

    from validation_matrix import matrix, regression

    from memplan.measure.profiler.campaign import Job, run_campaign
    from memplan.measure.profiler.device import collect_env
    from memplan.measure.records import read_records

    jobs = [Job(setup=s, layers=None, steps=3) for s in (regression() if regression_only else matrix())]
    env = collect_env("cpu")
    run_campaign(jobs, out=records_path, env=env, resume=True, timeout_s=600, workers=workers)  # one checkpoint cache per campaign
    latest = {json.dumps(r["setup"], sort_keys=True): r for r in read_records([records_path])}
    keys = [json.dumps(j.setup.to_dict(), sort_keys=True) for j in jobs]
    return [latest[k] for k in keys if k in latest]


def report(records: list[dict[str, Any]], csv_path: Path | None) -> "Any":
    from memplan.measure.compare import compare_records
    from memplan.measure.stats import error_stats
    from memplan.training.setup import Setup

    labels = {r["id"]: Setup.from_dict(r["setup"]).label(layers=r.get("layers")) for r in records}
    frame = compare_records(records)
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv_path, index=False)
    peak = frame[frame.component == "peak"]
    for _, row in peak.sort_values("rel_error", key=abs, ascending=False).iterrows():
        print(f"{labels[row['id']]:<78} pred {row['predicted_bytes'] / 2**20:9.2f} MiB  meas {row['measured_bytes'] / 2**20:9.2f} MiB  {100 * row['rel_error']:+6.2f}%")
    st = error_stats(peak.rel_error)
    if st is not None:
        print(f"steady-state peak over {st.count} runs: median |error| {100 * st.median_abs:.2f}%, max {100 * st.max_abs:.2f}%")
    for comp in ("weights", "adapters", "gradients", "optimizer_states", "activations"):
        st = error_stats(frame[frame.component == comp].rel_error)
        if st is not None:
            print(f"{comp:<17} max |error| {100 * st.max_abs:.3f}% over {st.count} runs")
    return frame


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=Path, default=ROOT / "profiles" / "cpu-validation.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "validation_cpu.csv")
    ap.add_argument("--regression", action="store_true", help="Only the regression subset CI runs (validation_matrix.REGRESSION).")
    ap.add_argument("--workers", type=int, default=2, help="Runs side by side (default 2).")
    args = ap.parse_args()
    records = run_matrix(args.records, regression_only=args.regression, workers=args.workers)
    report(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
