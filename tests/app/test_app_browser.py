"""End to end: the app served by `streamlit run` on localhost and driven in real headless
Chromium (Debian's `chromium` package at /usr/bin/chromium) through Playwright's Python client.
Skipped, with the reason, where either is missing; CI installs both."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright's Python client (pip install playwright)")

from memplan.model.catalog import load_model  # noqa: E402
from memplan.commands.app import streamlit_argv  # noqa: E402
from memplan.training.estimate import estimate  # noqa: E402
from memplan.training.setup import Setup  # noqa: E402
from memplan.units import format_bytes  # noqa: E402

# The fine-tune page's starting inputs (app/views/fine_tune.py), restated.
DEFAULT = Setup(model="llama2-7b", method="lora", quant="nf4", double_quant=True, lora_rank=16, lora_targets=("q_proj", "v_proj"),
                seq_len=1024, batch_size=4, grad_checkpointing=True, optimizer="adamw", attention="sdpa")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(streamlit_argv(port=port, headless=True), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not come up on {url}:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def page(server: str) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1440, "height": 1200})
            tab.set_default_timeout(60_000)
            tab.goto(server)
            yield tab
        finally:
            browser.close()


def metric(page, label: str):
    return page.locator('[data-testid="stMetric"]', has_text=label).locator('[data-testid="stMetricValue"]')


def chart_total_bytes(page) -> int:
    """The stacked bar's segments as the browser's plotly holds them, summed."""
    return page.evaluate("""() => document.querySelector('.js-plotly-plot').data
        .filter(t => t.type === 'bar').reduce((s, t) => s + t.customdata[0], 0)""")


def test_changing_the_batch_redraws_the_chart_with_the_library_numbers(page, tmp_path: Path) -> None:
    expect = sync_api.expect
    page.locator(".js-plotly-plot").first.wait_for()
    before = estimate(DEFAULT).memory.peak
    expect(metric(page, "Peak memory")).to_have_text(format_bytes(before))
    assert chart_total_bytes(page) == before

    after = estimate(Setup(**{**DEFAULT.to_dict(), "lora_targets": DEFAULT.lora_targets, "batch_size": 8})).memory.peak
    box = page.get_by_label("Batch size (sequences)")
    box.fill("8")
    box.press("Enter")
    expect(metric(page, "Peak memory")).to_have_text(format_bytes(after))
    page.wait_for_function(f"""() => document.querySelector('.js-plotly-plot').data
        .filter(t => t.type === 'bar').reduce((s, t) => s + t.customdata[0], 0) === {after}""")
    assert page.locator('[data-testid="stException"]').count() == 0
    shot = tmp_path / "fine_tune.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_a_bad_upload_in_the_browser_is_one_clear_error(page, tmp_path: Path) -> None:
    page.locator(".js-plotly-plot").first.wait_for()
    page.get_by_text("my config.json").click()
    bad = tmp_path / "config.json"
    bad.write_text("def evil(): import os\n")
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(bad))
    alert = page.locator('[data-testid="stAlertContentError"]')
    sync_api.expect(alert).to_contain_text("config.json is not valid JSON (line 1, column 1")
    assert page.locator('[data-testid="stException"]').count() == 0

    good = tmp_path / "tiny.json"
    good.write_text(json.dumps(load_model("tinyllama-1.1b").config))
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(good))
    sync_api.expect(page.get_by_role("heading", name="Fine-tune tiny")).to_be_visible()
    page.locator(".js-plotly-plot").first.wait_for()
