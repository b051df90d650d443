"""Run the CPU validation matrix (tests/measure/validation_matrix.py) through the real profiler
and print predicted vs measured per component, with relative errors.

    python benchmarks/validate_cpu.py [--out reports/validation_cpu.csv] [--records profiles/cpu-validation.jsonl]

The ledger (every live tensor storage, counted by the profiler) is the ground truth.
tests/measure/test_validation_cpu.py runs the same function and asserts the thresholds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "measure"))


def run_matrix(records_path: Path) -> list[dict[str, Any]]:
    from validation_matrix import matrix

    from memplan.measure.profiler.campaign import Job, run_campaign
    from memplan.measure.profiler.device import collect_env
    from memplan.measure.records import read_records

    jobs = [Job(setup=s, layers=None, steps=3) for s in matrix()]
    env = collect_env("cpu")
    run_campaign(jobs, out=records_path, env=env, resume=True, timeout_s=600)
    wanted = {j.setup.to_dict().__repr__() for j in jobs}
    return [r for r in read_records([records_path]) if repr(r["setup"]) in wanted]


def report(records: list[dict[str, Any]], csv_path: Path | None) -> "Any":
    from memplan.measure.compare import compare_records

    frame = compare_records(records)
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv_path, index=False)
    peak = frame[frame.component == "peak"]
    for _, row in peak.sort_values("rel_error", key=abs, ascending=False).iterrows():
        name = Path(row["model"]).name
        targets = row["lora_targets"] if isinstance(row["lora_targets"], str) and row["lora_targets"] else "default"
        lora = f" r{row['lora_rank']} {targets}" if row["method"] == "lora" else ""
        label = f"{name} {row['method']} {row['quant']}{'+dq' if row['double_quant'] else ''}{lora} s{row['seq_len']} b{row['batch_size']}{' gc' if row['grad_checkpointing'] else ''} {row['optimizer']} {row['attention']}{' ' + row['autocast'] + '-autocast' if row['autocast'] != 'none' else ''}"
        print(f"{label:<78} pred {row['predicted_bytes'] / 2**20:9.2f} MiB  meas {row['measured_bytes'] / 2**20:9.2f} MiB  {100 * row['rel_error']:+6.2f}%")
    errs = [abs(e) for e in peak.rel_error]
    print(f"steady-state peak over {len(errs)} runs: median |error| {100 * statistics.median(errs):.2f}%, max {100 * max(errs):.2f}%")
    for comp in ("weights", "adapters", "gradients", "optimizer_states", "activations"):
        sub = frame[(frame.component == comp) & frame.rel_error.notna()]
        if len(sub):
            print(f"{comp:<17} max |error| {100 * sub.rel_error.abs().max():.3f}% over {len(sub)} runs")
    return frame


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=Path, default=ROOT / "profiles" / "cpu-validation.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "validation_cpu.csv")
    args = ap.parse_args()
    records = run_matrix(args.records)
    report(records, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
