"""How big and how fast is `memplan report`, and how long does `.xlsx` export take?

    python benchmarks/bench_report.py                 # examples/grid.yaml, 5 runs of each
    python benchmarks/bench_report.py --runs 3 --grid my-grid.yaml

Prints, with the median (and range) of `--runs` runs:
- the report's size in bytes (`memplan.planning.report.write_report` on the grid);
- its load time in headless Chromium (Debian's /usr/bin/chromium through Playwright's Python
  client): from navigation to every plotly chart drawn (`.main-svg` in each chart div),
  with the network blocked (the file must need none);
- the time `memplan.planning.sweep.write_sweep` takes to write the same sweep as .xlsx, and as
  .csv for scale.
The load time is skipped, with the reason, without Chromium or Playwright.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _median(xs: list[float], unit: str = "s") -> str:
    return f"median {statistics.median(xs):.2f} {unit} (min {min(xs):.2f}, max {max(xs):.2f}, {len(xs)} runs)"


def load_times(path: Path, runs: int) -> list[float] | str:
    """Seconds from navigation to every chart drawn, one per run (a fresh page each time)."""
    if not CHROMIUM.is_file():
        return "skipped: no /usr/bin/chromium (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "skipped: no Playwright (pip install playwright)"
    from memplan.planning.report import CHART_IDS

    times = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for _ in range(runs):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:", "blob:")) else r.abort())
                n = page.evaluate("() => 0")  # the page is live before the clock starts
                start = time.perf_counter()
                page.goto(path.as_uri(), wait_until="load")
                n = page.evaluate("ids => ids.filter(id => document.getElementById(id)).length", list(CHART_IDS.values()))
                page.wait_for_function(
                    "n => document.querySelectorAll('.plotly-graph-div .main-svg').length >= n", arg=n, timeout=120_000)
                times.append(time.perf_counter() - start)
                page.close()
        finally:
            browser.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=ROOT / "examples" / "grid.yaml")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from memplan.planning.grid import load_grid
    from memplan.planning.report import write_report
    from memplan.planning.sweep import sweep_grid, write_sweep

    grid = load_grid(args.grid)
    print(f"python {platform.python_version()} on {platform.machine()}, grid {args.grid.name}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.html"
        build = []
        for _ in range(args.runs):
            start = time.perf_counter()
            size, _frame = write_report(grid, out)
            build.append(time.perf_counter() - start)
        print(f"report: {size:,} bytes ({size / 2**20:.2f} MiB); written in {_median(build)}")
        loads = load_times(out, args.runs)
        print(f"page load in Chromium (every chart drawn): {loads if isinstance(loads, str) else _median(loads)}")

        frame = sweep_grid(grid)
        for suffix in (".xlsx", ".csv"):
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                write_sweep(frame, Path(tmp) / f"sweep{suffix}")
                times.append(time.perf_counter() - start)
            print(f"{suffix} export of {len(frame):,} rows x {len(frame.columns)} columns: {_median(times)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
