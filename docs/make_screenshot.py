"""Screenshot a page of the app: serve it, open it in headless Chromium, save the page.

    python docs/make_screenshot.py [--page fleet] [--out docs/app.png]

README's docs/app.png is written by tests/app/test_app_browser.py (after it checks the page's numbers
against the library's), so it cannot go stale; this script is for other pages and sizes.

Needs Debian's `chromium` (/usr/bin/chromium) and `pip install playwright` (never `playwright install`).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from memplan.commands.app import streamlit_argv

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", default="", help="URL path of the page: '' (fine-tune), fleet, calibration, report")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "app.png")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=1180)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(streamlit_argv(port=port, headless=True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://localhost:{port}/{args.page}")
            page.locator(".js-plotly-plot, [data-testid='stDataFrame']").locator("visible=true").first.wait_for(timeout=90_000)
            page.wait_for_timeout(1500)  # fonts and plotly's transition
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
