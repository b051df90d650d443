"""Sharded ranks against the estimator at any world size (issue 13: world size 4 lives here, not in CI).

    python benchmarks/validate_sharded.py [--gpus 4] [--records reports/sharded-ws4.jsonl] [--zero]

Runs tests/measure/sharded_matrix.py's FSDP/DDP setups (and with --zero its DeepSpeed rows) at the
given world size through the real profiler (one process per rank, gloo) and prints each rank's
predicted and measured steady-state peak. Resumes from --records.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "measure"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--records", type=Path, default=ROOT / "reports" / "sharded-ws4.jsonl")
    ap.add_argument("--zero", action="store_true", help="also the DeepSpeed ZeRO rows (needs deepspeed)")
    args = ap.parse_args(argv)

    from sharded_matrix import fsdp_setups, run_sharded, zero_setups

    from memplan.model.catalog import load_model
    from memplan.training.estimate import estimate

    setups = [dataclasses.replace(s, gpus=args.gpus, gpus_per_node=None) for s in fsdp_setups() + (zero_setups() if args.zero else [])]
    args.records.parent.mkdir(parents=True, exist_ok=True)
    records = run_sharded(setups, out=args.records, checkpoint_dir=args.records.parent / "checkpoints", workers=1)
    wanted = {s.label() for s in setups}
    from memplan.measure.compare import measured_peak_prediction
    from memplan.training.setup import Setup

    errors = []
    print(f"{'setup':<70}{'rank':>5}{'predicted':>12}{'measured':>12}{'error':>9}")
    for r in records:
        s = Setup.from_dict(r["setup"])
        if r.get("rank") is None or s.label() not in wanted:
            continue
        if r["outcome"] != "ok":
            print(f"{s.label()[-70:]:<70}{r['rank']:>5}  {r['outcome']}: {(r.get('error') or r.get('oom') or {}).get('message', '')[:80]}")
            continue
        pred, meas = measured_peak_prediction(estimate(s, model=load_model(s.model))), r["measured"]["steady_peak_bytes"]
        errors.append(abs(pred - meas) / meas)
        print(f"{s.label()[-70:]:<70}{r['rank']:>5}{pred / 2**20:>10.2f}Mi{meas / 2**20:>10.2f}Mi{100 * (pred - meas) / meas:>+8.2f}%")
    if errors:
        print(f"{len(errors)} rank records: median |error| {100 * statistics.median(errors):.2f}%, max {100 * max(errors):.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
