"""How long `memplan estimate` takes, against building the model the way
`accelerate estimate-memory` does.

Both sides run in a fresh subprocess, so the figures include interpreter start-up
and imports -- what a user waits for at the prompt:

- memplan: the `memplan` console script, `memplan estimate --model llama2-7b --quant nf4`.
- accelerate: `accelerate/commands/estimate.py::create_empty_model` minus its Hub
  lookup (no network here): `AutoConfig` from the same catalog config.json,
  `AutoModel.from_config(..., torch_dtype=float32)` under `init_empty_weights()`,
  then `calculate_maximum_sizes(model)`.

Usage: python benchmarks/bench_estimate.py [--model llama2-7b] [--runs 10] [--baseline-runs 5]
Prints both medians and the ratio; exits 1 if memplan misses its targets
(median < 0.5 s and >= 5x faster than the baseline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 0.5
TARGET_SPEEDUP = 5.0

BASELINE = """
import sys
import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import calculate_maximum_sizes
from transformers import AutoConfig, AutoModel

config = AutoConfig.from_pretrained(sys.argv[1])
with init_empty_weights():
    model = AutoModel.from_config(config, torch_dtype=torch.float32)
total_size, largest_layer = calculate_maximum_sizes(model)
print(total_size)
"""


def time_command(cmd: list[str], runs: int) -> tuple[float, list[float], str]:
    """Median wall time of `runs` runs (after one untimed warm-up that fills the OS file cache)."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-7b", help="catalog model (default: llama2-7b)")
    parser.add_argument("--runs", type=int, default=10, help="memplan runs (default 10)")
    parser.add_argument("--baseline-runs", type=int, default=5, help="accelerate runs (default 5)")
    args = parser.parse_args()

    exe = shutil.which("memplan")
    if exe is None:
        print("the `memplan` console script is not on PATH; run `pip install -e .` first", file=sys.stderr)
        return 2
    from memplan.model.catalog import catalog

    entry = next((e for e in catalog() if e.name == args.model), None)
    if entry is None:
        print(f"unknown catalog model {args.model!r}", file=sys.stderr)
        return 2

    memplan_cmd = [exe, "estimate", "--model", args.model, "--quant", "nf4"]
    m_median, m_times, _ = time_command(memplan_cmd, args.runs)

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(json.loads(entry.path.read_text())["config"]))
        base_cmd = [sys.executable, "-c", BASELINE, tmp]
        b_median, b_times, b_out = time_command(base_cmd, args.baseline_runs)

    print(f"model: {args.model}")
    print(f"memplan estimate --quant nf4 : median {m_median:.3f} s over {len(m_times)} runs "
          f"(min {min(m_times):.3f}, max {max(m_times):.3f})")
    print(f"accelerate-style meta model  : median {b_median:.3f} s over {len(b_times)} runs "
          f"(min {min(b_times):.3f}, max {max(b_times):.3f}); total_size {int(b_out.split()[-1]):,} bytes fp32")
    ratio = b_median / m_median
    print(f"speed-up: {ratio:.1f}x  (targets: memplan < {TARGET_SECONDS} s, >= {TARGET_SPEEDUP:.0f}x)")
    ok = m_median < TARGET_SECONDS and ratio >= TARGET_SPEEDUP
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
