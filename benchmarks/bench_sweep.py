"""How fast is `memplan.planning.sweep`? A 100,000-setup grid, timed end to end.

    python benchmarks/bench_sweep.py              # the 100,000-setup grid
    python benchmarks/bench_sweep.py --quick      # 1,600 setups, a smoke run
    python benchmarks/bench_sweep.py --profile    # also the top functions by own time (cProfile)

The grid: 4 models x 5 base formats x 5 ranks x 2 target sets x 10 sequence lengths x
5 batch sizes x 2 checkpointing x 5 optimizers = 100,000 LoRA/QLoRA setups, every one
accepted by the estimator, each checked against every catalog GPU. Reports the
wall time of `sweep(...)` (grid checks, every estimate, fits, the DataFrame) and
setups per second. Target (issue 7): 100,000 setups in under 5 s on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import sys
import time

GRID = dict(
    model=["llama2-7b", "mistral-7b", "llama3-8b", "qwen2.5-7b"],
    quant=["bf16", "fp16", "int8", "nf4", "fp4"],
    lora_rank=[8, 16, 32, 64, 128],
    lora_targets=["default", "all-linear"],
    seq_len=[128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192],
    batch_size=[1, 2, 4, 8, 16],
    grad_checkpointing=[False, True],
    optimizer=["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"],
)
QUICK = dict(GRID, seq_len=[512, 2048], batch_size=[1, 4], optimizer=["adamw"])


def _load() -> str:
    try:
        import os

        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1,600-setup grid")
    parser.add_argument("--profile", action="store_true", help="print the hot spots (cProfile, own time)")
    args = parser.parse_args()

    from memplan.planning.sweep import sweep

    grid = QUICK if args.quick else GRID
    sweep(**dict(grid, model=grid["model"][:1], seq_len=[512], batch_size=[1]))  # warm imports and caches
    start, cpu_start = time.perf_counter(), time.process_time()
    frame = sweep(**grid)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    n = len(frame)
    refused = sum(frame.attrs["refused"].values())
    print(f"python {platform.python_version()} on {platform.machine()}, memplan sweep")
    print(f"{n:,} setups ({refused:,} refused) x {sum(c.startswith('fits.') for c in frame.columns)} GPUs "
          f"in {wall:.2f} s: {n / wall:,.0f} setups/s ({1e6 * wall / n:.1f} us per setup)")
    # On a shared machine the wall time includes waiting for a core; the CPU time does not.
    print(f"CPU time {cpu:.2f} s: {n / cpu:,.0f} setups/s per core; load average {_load()}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        sweep(**grid)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
