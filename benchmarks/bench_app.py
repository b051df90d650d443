"""Server-side re-render time of every page of the web app, for catalog models.

    python benchmarks/bench_app.py [--repeat 7] [--json]

Each figure is the wall time of one `AppTest.run()` after one widget change: the whole
page script (library calls, plotly figures, tables) plus Streamlit's serialization of
the elements and AppTest's parsing of them, so it bounds what the server spends per
interaction. The browser's drawing time is not included. Changes use fresh values,
so nothing the page caches (the fleet sweep) is reused unless the row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from streamlit.testing.v1 import AppTest

from memplan.planning import appdata

ENTRY = str(Path(__file__).resolve().parent.parent / "app" / "memplan_app.py")


def app_on(page: str | None) -> AppTest:
    at = AppTest.from_file(ENTRY, default_timeout=120)
    at.run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    if at.exception:
        raise SystemExit(f"{page}: {at.exception[0].message}")
    return at


def timed(at: AppTest, change: Callable[[AppTest, int], Any], repeat: int) -> list[float]:
    out = []
    for i in range(repeat):
        change(at, i)
        t0 = time.perf_counter()
        at.run()
        out.append(time.perf_counter() - t0)
        if at.exception or at.error:
            raise SystemExit(f"benchmark run failed: {(at.exception or at.error)[0].value if at.error else at.exception[0].message}")
    return out


def calibration_folder() -> str:
    """40 CUDA and 40 CPU records with fixed measurements, for the calibration page."""
    from memplan.measure.records import append_record, new_record
    from memplan.training.setup import Setup

    folder = Path(tempfile.mkdtemp(prefix="memplan-bench-"))
    for device, name in (("cuda", "NVIDIA A10G"), ("cpu", "bench CPU")):
        for i in range(40):
            setup = Setup(model="tinyllama-1.1b", quant=("nf4", "bf16", "int8")[i % 3], seq_len=128 * (1 + i % 8),
                          batch_size=1 + i % 2, device=device, attention="sdpa")
            measured = {"steady_peak_bytes": (1 + i) * 50_000_000, "nvml_peak_bytes": (1 + i) * 50_000_000 + 400_000_000,
                        "cuda_context_bytes": 400_000_000, "weights_bytes": 300_000_000}
            append_record(folder / f"{device}.jsonl", new_record(setup=setup, layers=2, steps=3,
                                                                 env={"device_type": device, "device_name": name},
                                                                 outcome="ok", measured=measured))
    return str(folder)


def scenarios(repeat: int) -> list[tuple[str, str, list[float]]]:
    rows: list[tuple[str, str, list[float]]] = []
    models = ["mistral-7b", "llama3-8b", "qwen2.5-7b", "tinyllama-1.1b", "llama2-13b", "phi3-mini", "gemma2-9b", "llama2-7b"]

    at = app_on(None)
    rows.append(("fine-tune", "batch size", timed(at, lambda a, i: a.number_input(key="ft_batch_size").set_value(5 + i), repeat)))
    rows.append(("fine-tune", "sequence length", timed(at, lambda a, i: a.number_input(key="ft_seq_len").set_value(1500 + 100 * i), repeat)))
    rows.append(("fine-tune", "catalog model", timed(at, lambda a, i: a.selectbox(key="ft_model").set_value(models[i % len(models)]), repeat)))
    rows.append(("fine-tune", "GPU", timed(at, lambda a, i: a.selectbox(key="ft_gpu").set_value(("a100-80gb", "l4", "h100")[i % 3]), repeat)))
    rows.append(("fine-tune", "no change (rerun)", timed(at, lambda a, i: None, repeat)))

    at = app_on("fleet")
    rows.append(("fleet", "N (sweep cached)", timed(at, lambda a, i: a.number_input(key="fleet_variants").set_value(200 + 37 * i), repeat)))
    rows.append(("fleet", "requests/s (new sweep)", timed(at, lambda a, i: a.number_input(key="fleet_rps").set_value(6.0 + i), repeat)))
    rows.append(("fleet", "N = 100,000 (sweep cached)", timed(at, lambda a, i: a.number_input(key="fleet_variants").set_value(100_000 - i), repeat)))

    folder = calibration_folder()
    os.environ[appdata.PROFILES_ENV] = folder
    at = app_on(None)
    at.switch_page("views/calibration.py")
    t0 = time.perf_counter()
    at.run()  # the page's first run reads and re-estimates every record
    rows.append(("calibration", "80 records (first read)", [time.perf_counter() - t0]))
    at.selectbox(key="cal_kind").set_value("cuda: NVIDIA A10G").run()
    rows.append(("calibration", "component (records cached)", timed(
        at, lambda a, i: a.selectbox(key="cal_component").set_value(("weights", "peak", "device_peak")[i % 3]), repeat)))

    shutil.rmtree(folder, ignore_errors=True)

    at = app_on("report")
    rows.append(("report", "batch sizes (72-row grid)", timed(at, lambda a, i: a.multiselect(key="rep_batches").set_value([1, 2 + i % 6]), repeat)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = scenarios(args.repeat)
    if args.json:
        print(json.dumps([{"page": p, "change": c, "median_ms": 1000 * statistics.median(t), "max_ms": 1000 * max(t), "runs": len(t)}
                          for p, c, t in rows], indent=2))
        return
    print(f"python {platform.python_version()} on {platform.machine()}, {sys.platform}; ms per server-side re-render")
    print(f"{'page':<12} {'widget changed':<30} {'median':>8} {'max':>8} {'runs':>5}")
    for page, change, t in rows:
        print(f"{page:<12} {change:<30} {1000 * statistics.median(t):>8.0f} {1000 * max(t):>8.0f} {len(t):>5}")


if __name__ == "__main__":
    main()
