"""`memplan report`: one self-contained HTML file whose charts render in headless
Chromium without errors and without any network request."""

from __future__ import annotations

import base64
import gzip
import importlib
import json
import re
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

from memplan.cli import main
from memplan.planning.grid import parse_grid
from memplan.measure.records import append_record, new_record
from memplan.errors import MemplanError
from memplan.planning.report import CHART_IDS, memplan_version, write_report
from memplan.training.setup import Setup
from memplan.units import GIB, format_usd

GRID = {"model": ["llama2-7b", "gpt2"], "method": ["full", "lora"], "quant": ["bf16", "nf4"], "seq_len": [256, 512, 1024],
        "gpu": ["t4", "a10g", "a100-80gb"], "variants": [1, 10, 100], "rps": 2.0, "serve_gpu": "a10g"}
CHROMIUM = Path("/usr/bin/chromium")
# Flags for a sandbox-less CI container; no background traffic of Chromium's own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def profiles(tmp_path: Path) -> Path:
    """Three measured-looking CUDA records and one CPU record (the numbers are test data, not claims)."""
    folder = tmp_path / "profiles"
    env = {"device_name": "test GPU", "torch": "2.13.0"}
    for i, (device, seq) in enumerate([("cuda", 256), ("cuda", 512), ("cuda", 1024), ("cpu", 256)]):
        setup = Setup(model="llama2-7b", quant="nf4", seq_len=seq, device=device)
        measured = {"weights_bytes": 3_900_000_000, "trainable_bytes": 16_777_216, "gradients_bytes": 16_777_216,
                    "optimizer_state_bytes": 33_554_432, "activations_bytes": (1 + i) * GIB, "steady_peak_bytes": (5 + i) * GIB}
        if device == "cuda":
            measured.update(nvml_peak_bytes=(6 + i) * GIB, cuda_context_bytes=500_000_000)
        append_record(folder / f"{device}.jsonl", new_record(setup=setup, layers=None, steps=3, env=env, outcome="ok", measured=measured))
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "report.html"
    write_report(parse_grid(GRID, source="test grid"), out, profiles=profiles(tmp))
    return out, out.read_text(encoding="utf-8")


def test_report_is_self_contained(report: tuple[Path, str]) -> None:
    _, text = report
    assert text.startswith("<!DOCTYPE html>")
    # plotly.js once for all charts, gzipped and base64-encoded; every chart is a JSON block beside its div.
    packed = re.findall(r'<script type="application/octet-stream" id="memplan-plotlyjs">([A-Za-z0-9+/=]+)</script>', text)
    assert len(packed) == 1
    library = gzip.decompress(base64.b64decode(packed[0])).decode("utf-8")
    assert library == get_plotlyjs()
    assert len(re.findall(r"\* plotly\.js v\d", library)) == 1
    assert "plotly.js v" not in text and "Plotly.newPlot" in text  # not also inlined per figure
    figures = re.findall(r'<script type="application/json" class="memplan-figure" data-div="([^"]+)">(.*?)</script>', text, re.S)
    assert sorted(div for div, _ in figures) == sorted(CHART_IDS.values())
    for _, data in figures:
        assert set(json.loads(data)) <= {"data", "layout"}
    # Size: the packed library (about 2 MB) and the charts' own data, not 4.8 MB of plotly.js per page or per chart.
    assert len(text.encode("utf-8")) < len(packed[0]) + 400_000
    outside_js = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*(src|href)=", outside_js)
    assert "<script src" not in text


def test_cost_panels_have_clean_log_ticks_and_distinguishable_lines(report: tuple[Path, str]) -> None:
    _, text = report
    data = dict(re.findall(r'<script type="application/json" class="memplan-figure" data-div="([^"]+)">(.*?)</script>', text, re.S))
    fig = json.loads(data[CHART_IDS["cost"]])
    yaxes = [v for k, v in fig["layout"].items() if k.startswith("yaxis")]
    for axis in yaxes:  # labelled values only: decades, or 1-2-5 steps on a short range
        assert axis["type"] == "log" and axis["tickvals"]
        assert all(f"{v:.0e}"[0] in "125" for v in axis["tickvals"]), axis["tickvals"]
        assert axis["ticktext"] == [format_usd(v) for v in axis["tickvals"]]
    traces = {t["name"]: t for t in fig["data"] if t.get("showlegend", True)}
    full, lora = traces["full_finetune"], traces["lora"]
    # The two often coincide: they differ in width, dash and marker symbol, so both stay visible.
    assert full["line"]["width"] > 2 * lora["line"]["width"]
    assert full["line"].get("dash", "solid") != lora["line"].get("dash", "solid")
    assert full["marker"]["symbol"] != lora["marker"]["symbol"]
    assert "where lines coincide, both are drawn" in text


def test_report_sections(report: tuple[Path, str]) -> None:
    _, text = report
    for heading in ("Summary per model", "Peak memory against sequence length", "Which GPU does it fit on?",
                    "Cost per month against the number of variants", "Accuracy on measured runs", "Assumptions"):
        assert f"<h2>{heading}</h2>" in text
    assert "<h3>llama2-7b</h3>" in text and "<h3>gpt2</h3>" in text
    for div in CHART_IDS.values():
        assert f'id="{div}"' in text
    assert f"memplan {memplan_version()}" in text
    assert "4 records in profiles (4 ran to completion)" in text
    assert "full fine-tuning cannot train an nf4 base" in text  # the refused combinations are listed
    assert "NVIDIA A10G" in text  # the GPUs with their dated prices


def test_report_without_profiles_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "profiles"
    empty.mkdir()
    out = tmp_path / "r.html"
    assert main(["report", "-m", "llama2-7b", "-s", "512,1024", "--profiles", str(empty), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    text = out.read_text(encoding="utf-8")
    assert "No profiles yet." in text
    assert f'id="{CHART_IDS["calibration"]}"' not in text
    assert "No fleet inputs in the grid" in text and f'id="{CHART_IDS["cost"]}"' not in text


def test_report_refuses_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.import_module("memplan.training.estimate"), "estimate", lambda *a, **k: pytest.fail("estimated"))
    assert main(["report", "-m", "llama2-7b", "--out", str(tmp_path / "r.pdf")]) == 2
    assert "the report is an HTML file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    assert main(["report", "-m", "llama2-7b", "--profiles", str(bad), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1 is not a valid profile record" in err
    assert not (tmp_path / "r.html").exists()


def test_report_when_the_estimator_refuses_everything(tmp_path: Path) -> None:
    # A page without a single row would look like an answer (issue 15): refused, with the reasons, and nothing written.
    out = tmp_path / "r.html"
    with pytest.raises(MemplanError, match="refused the only combination of the grid.*exceeds gpt2's 1024 learned positions"):
        write_report(parse_grid({"model": "gpt2", "seq_len": 4096}), out, profiles=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_report_opens_in_headless_chromium(report: tuple[Path, str]) -> None:
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium: apt-get install chromium (see the CI set-up)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    path, _ = report
    problems: list[str] = []
    requests: list[str] = []

    def route(r: object) -> None:
        url = r.request.url  # type: ignore[attr-defined]
        if url.startswith(("file://", "data:", "blob:")):
            r.continue_()  # type: ignore[attr-defined]
        else:
            requests.append(url)
            r.abort()  # type: ignore[attr-defined]

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", route)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(path.as_uri(), wait_until="load")
            expected = sorted(CHART_IDS.values())
            page.wait_for_function(
                "n => document.querySelectorAll('.plotly-graph-div .main-svg').length >= n", arg=len(expected), timeout=30_000)
            rendered = page.evaluate(
                "Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => "
                "[d.id, d.querySelectorAll('.main-svg').length > 0 && d.querySelectorAll('.trace, .hm, .heatmaplayer image').length > 0,"
                " d.getBoundingClientRect().height])")
        finally:
            browser.close()
    assert sorted(r[0] for r in rendered) == expected
    assert all(drawn and height > 100 for _, drawn, height in rendered), rendered
    assert problems == []
    assert requests == []
