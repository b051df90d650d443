"""How long a fleet sweep over N takes, against a base revision.

    python benchmarks/bench_fleet.py                    # working tree against the base below
    python benchmarks/bench_fleet.py --base REV --runs 15 --cli-runs 10

The sweep is `memplan plan --model llama2-7b --gpu a10g --rps 5 --sweep-variants
1,10,100,1000,10000`: five plans plus the plans the crossover search bisects through.
Both trees are timed the same way (the base exported with `git archive`, as in
`compare_outputs.py`; PYTHONPATH points at each tree, so the environment is shared):

- library: `sweep_variants` in one process, median of `--runs` calls after one warm-up
  call (imports and file caches excluded): the work the sweep itself does;
- CLI: the whole command in a fresh interpreter, median of `--cli-runs` runs after one
  untimed warm-up, the two trees taking turns: what a user waits for, interpreter
  start-up and imports included (these dominate it).

Prints the medians and ratios; exits 1 if the library sweep is not at least
TARGET_SPEEDUP times faster than the base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare_outputs import ROOT, export

TARGET_SPEEDUP = 3.0
# The last commit before the sweep computed its N-independent parts once.
DEFAULT_BASE = "1856fb8"
_RUN = "import sys; from memplan.cli import main; sys.exit(main(sys.argv[1:]))"
_LIBRARY = """
import statistics, sys, time
try:
    from memplan.serving.fleet import PlanInputs, sweep_variants
except ImportError:  # the flat layout, before the subpackage split
    from memplan.fleet import PlanInputs, sweep as sweep_variants
model, gpu, rps, variants, runs = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
ns = [int(v) for v in variants.split(",")]
inp = PlanInputs(model=model, variants=ns[0], gpu=gpu, rps=rps)
sweep_variants(inp, ns)  # warm-up: lazy imports, catalog and spec caches
times = []
for _ in range(runs):
    start = time.perf_counter()
    sweep_variants(inp, ns)
    times.append(time.perf_counter() - start)
print(" ".join(repr(t) for t in times))
"""


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}


def time_library(tree: Path, args: argparse.Namespace) -> list[float]:
    cmd = [sys.executable, "-c", _LIBRARY, args.model, args.gpu, str(args.rps), args.variants, str(args.runs)]
    out = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, check=True).stdout
    return [float(t) for t in out.split()]


def time_cli(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, list[float]]:
    """CLI wall times per tree, the trees taking turns run by run (so load drifts hit both alike)."""
    cmd = [sys.executable, "-c", _RUN, "plan", "--model", args.model, "--gpu", args.gpu, "--rps", str(args.rps),
           "--sweep-variants", args.variants]
    times: dict[str, list[float]] = {name: [] for name in trees}
    for i in range(args.cli_runs + 1):
        for name, tree in trees.items():
            start = time.perf_counter()
            subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, check=True)
            if i:  # the first round is an untimed warm-up
                times[name].append(time.perf_counter() - start)
    return times


def _line(label: str, times: list[float]) -> str:
    return (f"{label:<34} median {statistics.median(times) * 1e3:8.2f} ms over {len(times)} runs "
            f"(min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=DEFAULT_BASE, help=f"revision to compare against (default {DEFAULT_BASE})")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--gpu", default="a10g")
    ap.add_argument("--rps", type=float, default=5.0)
    ap.add_argument("--variants", default="1,10,100,1000,10000", help="comma list of N (default 1,10,100,1000,10000)")
    ap.add_argument("--runs", type=int, default=15, help="library sweeps per tree (default 15)")
    ap.add_argument("--cli-runs", type=int, default=10, help="CLI runs per tree (default 10)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="memplan-bench-fleet-") as tmp:
        trees = {"base": export(args.base, Path(tmp)), "head": ROOT}
        cli = time_cli(trees, args)
        results = {name: (time_library(tree, args), cli[name]) for name, tree in trees.items()}
    print(f"memplan plan --model {args.model} --gpu {args.gpu} --rps {args.rps:g} --sweep-variants {args.variants}")
    for name, label in (("base", f"base {args.base}"), ("head", "working tree")):
        lib, cli = results[name]
        print(_line(f"{label}: sweep_variants", lib))
        print(_line(f"{label}: CLI (fresh interpreter)", cli))
    lib_ratio = statistics.median(results["base"][0]) / statistics.median(results["head"][0])
    cli_ratio = statistics.median(results["base"][1]) / statistics.median(results["head"][1])
    print(f"speed-up: library {lib_ratio:.1f}x, CLI {cli_ratio:.2f}x  (target: library >= {TARGET_SPEEDUP:.0f}x)")
    ok = lib_ratio >= TARGET_SPEEDUP
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
