"""The renderers of `memplan.planning.render*`, checked against the library results they render.

Expected values come from the library objects (`Estimate`, `Plan`, `VariantSweep`, records)
or are written out by hand; none is produced by the renderer under test. The CLI tests at
the end check that the commands print exactly what the renderers return (the commands are
a thin layer: flags -> library -> renderer -> echo).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest

from memplan.cli import main
from memplan.hardware.gpus import gpu_catalog
from memplan.model.catalog import catalog, load_model
from memplan.planning.labels import PART_LABELS, PLAN_DEFAULTS, choices_text, fit_verdict, layout_text
from memplan.planning.render import render_estimate
from memplan.planning.render_fit import render_fit, render_models
from memplan.planning.render_plan import csv_text, launch_script, render_launch, render_plan, render_sweep
from memplan.planning.render_sweep import refused_lines, render_sweep_table
from memplan.planning.render_validate import outcome_line, render_comparison, render_records, text_table
from memplan.serving.fleet import PlanInputs, plan, sweep_variants
from memplan.serving.launch import launch_settings
from memplan.training.estimate import estimate
from memplan.training.search import cheapest_gpu, fit_answer, limits_on, smallest_gpu
from memplan.training.setup import Setup

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles" / "cuda-h100.jsonl"
GIB = 2**30  # written out here, not imported from memplan.units


@pytest.fixture(scope="module")
def est():
    return estimate(Setup(model="llama2-7b", quant="nf4", double_quant=True, lora_rank=16, seq_len=1024, batch_size=2))


@pytest.fixture(scope="module")
def one_plan():
    return plan(PlanInputs(model="llama2-7b", variants=50, gpu="a10g", rps=3.0))


# ---- estimate -------------------------------------------------------------------------------------


def test_estimate_json_bytes_are_the_estimate_fields(est) -> None:
    payload = json.loads(render_estimate(est, "json"))
    mem = payload["memory_bytes"]
    # Every Memory field the JSON names is the field itself, to the byte.
    for name in ("weights", "adapters", "gradients", "optimizer_states", "optimizer_paged", "activations", "logits",
                 "transients", "overhead", "allocated_peak", "peak"):
        assert mem[name] == getattr(est.memory, name), name
    assert mem["weights_and_adapters"] == est.memory.weights + est.memory.adapters
    assert mem["activations_and_logits"] == est.memory.activations + est.memory.logits
    assert payload["peak_phase"] == est.memory.peak_phase
    assert payload["parameters"]["total"] == est.total_parameters
    assert payload["parameters"]["trainable"] == est.trainable_parameters
    assert payload["setup"]["quant"] == "nf4" and payload["setup"]["lora_rank"] == 16
    assert payload["fits_on"], "a 7B QLoRA setup fits on some catalog GPU"


def test_estimate_json_with_gpu_reports_headroom(est) -> None:
    gpu = gpu_catalog().get("a10g")
    d = json.loads(render_estimate(est, "json", gpu=gpu))["gpu"]
    assert d["name"] == "a10g"
    assert d["usable_bytes"] == gpu.usable_bytes
    assert d["headroom_bytes"] == gpu.usable_bytes - est.memory.peak
    assert d["fits"] is (est.memory.peak <= gpu.usable_bytes)


def test_estimate_csv_has_the_documented_columns(est) -> None:
    gpu = gpu_catalog().get("a10g")
    rows = list(csv.DictReader(io.StringIO(render_estimate(est, "csv", gpu=gpu))))
    assert len(rows) == 1
    row = rows[0]
    columns = list(row)
    assert columns[0] == "model"
    setup_columns = [c for c in columns if c.startswith("setup.")]
    assert setup_columns == [f"setup.{f.name}" for f in fields(Setup)]
    assert {"parameters.total", "parameters.trainable", "memory_bytes.peak", "peak_phase"} <= set(columns)
    assert [c for c in columns if c.startswith("gpu.")] == ["gpu.name", "gpu.usable_bytes", "gpu.headroom_bytes", "gpu.fits"]
    assert int(row["memory_bytes.peak"]) == est.memory.peak
    assert int(row["memory_bytes.gradients"]) == est.memory.gradients
    assert int(row["parameters.total"]) == est.total_parameters
    assert row["setup.model"] == "llama2-7b"


def test_estimate_table_lists_the_peak_parts_in_gib(est) -> None:
    text = render_estimate(est, "table")
    gib = {}
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?)\s+(\d+\.\d\d)(\s+\d+%)?$", line)
        if m:
            gib[m.group(1)] = float(m.group(2))
    assert abs(gib["peak"] - est.memory.peak / GIB) <= 0.005
    assert abs(gib["weights (base)"] - est.peak_parts["weights"] / GIB) <= 0.005
    assert abs(gib["optimizer states"] - est.peak_parts["optimizer_states"] / GIB) <= 0.005
    # The listed parts add up to the peak (each rounded to 0.01 GiB).
    parts = [v for k, v in gib.items() if k != "peak"]
    assert abs(sum(parts) - gib["peak"]) <= 0.005 * len(parts) + 1e-9
    assert "fits on: " in text


def test_part_labels_cover_the_estimate_parts(est) -> None:
    assert set(est.peak_parts) <= set(PART_LABELS)


# ---- fit and models ---------------------------------------------------------------------------------


def test_fit_json_and_table_name_the_library_gpus() -> None:
    setup = Setup(model="llama2-7b", quant="nf4")
    cat = gpu_catalog()
    small, cheap = smallest_gpu(setup, cat), cheapest_gpu(setup, cat)
    g = cat.get("a10g")
    lim = limits_on(setup, g)
    ans = fit_answer(setup, cat, gpu=g)
    d = json.loads(render_fit(ans, "json"))
    assert d["smallest_gpu"] == small.key and d["cheapest_gpu"] == cheap.key
    assert d["cheapest_usd_per_hour"] == cheap.usd_per_hour
    assert d["peak_bytes"] == estimate(setup).memory.peak
    assert "clusters" not in d  # one A10G holds it: no cluster search
    assert d["limits"] == {"gpu": "a10g", "usable_bytes": g.usable_bytes, "fits_as_given": lim.fits_as_given,
                           "max_batch_size": lim.max_batch_size, "max_seq_len": lim.max_seq_len, "max_lora_rank": lim.max_lora_rank,
                           "gpus": 1, "parallel": "none"}
    text = render_fit(ans, "table")
    assert f"smallest GPU that fits: {small.key} (" in text
    assert f"  largest batch size (seq 512): {lim.max_batch_size}" in text.splitlines()
    assert "multi-GPU sharding is not modelled" not in text


def test_fit_past_one_gpu_lists_every_layout_with_its_fewest_gpus() -> None:
    from memplan.training.clusters import fewest_gpus

    setup, cat = Setup(model="llama2-70b", method="full"), gpu_catalog()
    h100 = cat.get("h100")
    ans = fit_answer(setup, cat, gpu=h100)
    expected = fewest_gpus(setup, h100)
    d = json.loads(render_fit(ans, "json"))
    assert d["smallest_gpu"] is None and d["clusters"]["gpu"] == "h100" and d["clusters"]["ranked_by"] == "fewest_gpus"
    rows = d["clusters"]["layouts"]
    assert [(r["parallel"], r["fsdp_version"] or 1) for r in rows] == [(f.parallel, f.fsdp_version) for f in expected]
    for r, f in zip(rows, expected):
        c = f.fewest.get("h100")
        assert r["gpus"] == (c.gpus if c else None) and r["peak_bytes_per_gpu"] == (c.peak_bytes if c else None)
        if c:
            assert r["usd_per_hour"] == c.gpus * h100.usd_per_hour and r["headroom_bytes"] == h100.usable_bytes - c.peak_bytes
    assert d["limits"]["gpus"] == expected[0].fewest["h100"].gpus and d["limits"]["parallel"] == expected[0].parallel
    text = render_fit(ans, "table").splitlines()
    assert text[0].startswith("no single catalog GPU fits this setup: ")
    for f in expected:
        c = f.fewest.get("h100")
        row = next(line for line in text if line.startswith("  " + layout_text(f.parallel, f.fsdp_version) + " "))
        assert (f"{c.gpus} x h100" in row) if c else ("none up to 1,024 GPUs" in row)
    assert any(line.startswith(f"on {expected[0].fewest['h100'].gpus} x h100 (") for line in text)


def test_fit_says_which_layouts_got_a_float_quant_storage() -> None:
    setup, cat = Setup(model="llama2-70b", quant="nf4", lora_targets="all-linear", grad_checkpointing=True), gpu_catalog()
    text = render_fit(fit_answer(setup, cat, gpu=cat.get("rtx3090")), "table")
    assert "--quant-storage bf16 set for " in text and "ZeRO-3" in text.split("--quant-storage bf16 set for ")[1]


def test_fit_verdict_words() -> None:
    assert (fit_verdict(True), fit_verdict(False)) == ("fits", "does not fit")


def test_models_json_counts_are_the_specs() -> None:
    entries = catalog()
    rows = json.loads(render_models([(e, load_model(e.name)) for e in entries], "json"))
    assert [r["name"] for r in rows] == [e.name for e in entries]
    for r in rows:
        spec = load_model(r["name"])
        assert r["parameters"] == spec.total_parameters and r["active_parameters"] == spec.active_parameters
    table = render_models([(e, load_model(e.name)) for e in entries], "table").splitlines()
    assert table[0].split() == ["name", "architecture", "params", "active", "hf_id"]
    assert len(table) == len(entries) + 1


# ---- fleet plans --------------------------------------------------------------------------------------


def test_plan_json_is_the_plan(one_plan) -> None:
    d = json.loads(render_plan(one_plan, "json"))
    assert set(d["strategies"]) == set(one_plan.strategies)
    for name, s in one_plan.strategies.items():
        assert d["strategies"][name]["usd_per_month"] == pytest.approx(s.usd_per_month, rel=1e-12)
        assert d["strategies"][name]["storage_bytes"] == s.storage_bytes
    assert d["checkpoint_bytes"] == one_plan.checkpoint_bytes


def test_plan_csv_has_one_row_per_strategy(one_plan) -> None:
    rows = list(csv.DictReader(io.StringIO(render_plan(one_plan, "csv"))))
    assert [r["strategy"] for r in rows] == list(one_plan.strategies)
    assert {"variants", "strategy", "gpus", "usd_per_month", "storage_bytes"} <= set(rows[0])
    for r in rows:
        s = one_plan.strategies[r["strategy"]]
        assert int(r["variants"]) == 50
        assert float(r["usd_per_month"]) == pytest.approx(s.usd_per_month, rel=1e-9)
        assert int(float(r["storage_bytes"])) == s.storage_bytes


def test_plan_table_has_a_column_per_strategy(one_plan) -> None:
    lines = render_plan(one_plan, "table").splitlines()
    assert lines[0].startswith("llama2-7b: 50 variants, 3 req/s overall (uniform)")
    header = next(line for line in lines if line.strip().split() == list(one_plan.strategies))
    assert header
    gpus_row = next(line for line in lines if line.startswith("GPUs "))
    assert len(gpus_row.split()) == 1 + len(one_plan.strategies)


def test_plan_prices_a_70b_full_fine_tune_on_a_cluster() -> None:
    # No single GPU holds it: the training line and the JSON name the cluster's count and layout.
    p = plan(PlanInputs(model="llama2-70b", variants=10, gpu="h100", rps=1.0, train_gpu="h100"))
    t = p.training["full"]
    assert t.gpus is not None and t.gpus > 1 and t.parallel != "none"
    line = next(x for x in render_plan(p, "table").splitlines() if x.startswith("training (full): "))
    assert f"priced on {t.gpus} x h100 under " in line and f"({t.hours:.2f} h on {t.gpus} x h100)" in line
    d = json.loads(render_plan(p, "json"))["training_per_variant"]["full"]
    assert (d["gpus"], d["parallel"], d["gpu"]) == (t.gpus, t.parallel, "h100")
    assert d["usd"] == pytest.approx(t.gpus * t.hours * gpu_catalog().get("h100").usd_per_hour)


def test_variant_sweep_table_and_csv() -> None:
    ns = [1, 10, 100]
    sw = sweep_variants(PlanInputs(model="llama2-7b", variants=1, gpu="a10g", rps=3.0), ns)
    lines = render_sweep(sw, "table").splitlines()
    assert lines[0].split()[0] == "variants"
    assert [line.split()[0] for line in lines[1:4]] == ["1", "10", "100"]
    crossover_lines = [line for line in lines if line.startswith("crossover")]
    assert len(crossover_lines) == max(1, len(sw.crossovers))
    rows = list(csv.DictReader(io.StringIO(render_sweep(sw, "csv"))))
    assert len(rows) == len(ns) * len(sw.plans[0].strategies)


def test_launch_script_and_json(one_plan) -> None:
    launch = launch_settings(one_plan, "lorax")
    text = render_launch(launch, "a10g", "table")
    first, rest = text.split("\n", 1)
    assert first == f"# {launch.replicas} replica(s) of {launch.tp} x a10g, each:"
    assert rest == launch.command()
    assert launch_script(launch, "a10g") == text
    assert json.loads(render_launch(launch, "a10g", "json"))["engine"] == "lorax"


def test_csv_text() -> None:
    assert csv_text([{"a": 1, "b": "x,y"}, {"a": 2, "b": None}]) == 'a,b\n1,"x,y"\n2,'


# ---- grid sweeps ---------------------------------------------------------------------------------------


def test_sweep_table_shows_varying_columns_and_gib() -> None:
    frame = pd.DataFrame({
        "model": ["m", "m"], "quant": ["bf16", "nf4"], "seq_len": [512, 512],
        "peak_bytes": [2 * GIB, 3 * GIB // 2], "smallest_gpu": ["a10g", None], "cheapest_gpu": ["t4", "t4"],
    })
    assert render_sweep_table(frame).splitlines() == [
        "model  quant  peak      smallest GPU  cheapest GPU",
        "m      bf16   2.00 GiB  a10g          t4",
        "m      nf4    1.50 GiB  -             t4",
    ]
    assert render_sweep_table(frame.iloc[0:0]) == "no setup of the grid was accepted by the estimator"


def test_refused_lines() -> None:
    frame = pd.DataFrame({"model": ["m"], "fleet_error": [None]})
    frame.attrs["refused"] = {"a reason": 2, "another": 5}
    assert refused_lines(frame) == [
        "note: the estimator refused 7 combinations of the grid:",
        "  5 x another",
        "  2 x a reason",
    ]


# ---- measured runs ---------------------------------------------------------------------------------------


def test_text_table_alignment() -> None:
    assert text_table(["name", "n"], [["a", "1"], ["bbb", "22"]]) == "name   n\na      1\nbbb   22"


def test_outcome_line() -> None:
    record = {"outcome": "ok", "measured": {"steady_peak_bytes": 3 * GIB}, "duration_s": 12.4}
    assert outcome_line(record) == "ok    steady peak 3.00 GiB (12 s)"
    oom = {"outcome": "oom", "oom": {"phase": "backward"}, "duration_s": 3.0}
    assert outcome_line(oom) == "oom   in phase backward (3 s)"


@pytest.mark.skipif(not PROFILES.is_file(), reason="no profile records in the checkout")
def test_records_and_comparison_renderings() -> None:
    from memplan.measure.compare import compare_records
    from memplan.measure.records import read_records

    records = read_records([PROFILES])[:5]
    assert json.loads(render_records(records, "json")) == json.loads(json.dumps(records))
    rows = list(csv.DictReader(io.StringIO(render_records(records, "csv"))))
    assert len(rows) == len(records)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    table = render_records(records, "table").splitlines()
    assert table[0].split()[:2] == ["run", "outcome"] and len(table) == len(records) + 1
    assert render_records([], "table") == "no records"

    frame = compare_records(records)
    d = json.loads(render_comparison(frame, "json"))
    assert len(d) == len(frame)
    assert [r["predicted_bytes"] for r in d] == [int(v) for v in frame["predicted_bytes"]]
    assert next(csv.reader(io.StringIO(render_comparison(frame, "csv")))) == list(frame.columns)


# ---- shared labels ------------------------------------------------------------------------------------------


def test_plan_defaults_are_planinputs_defaults() -> None:
    inp = PlanInputs(model="llama2-7b", variants=1, rps=1.0)
    for name, value in PLAN_DEFAULTS.items():
        assert getattr(inp, name) == value, name
    assert PLAN_DEFAULTS["prompt_tokens"] == 1024 and "engine" not in PLAN_DEFAULTS


def test_plan_flags_default_to_plan_defaults() -> None:
    from memplan.commands.plan import plan_command

    defaults = {p.name: p.default for p in plan_command.params}
    for name in ("popularity", "zipf_exponent", "prompt_tokens", "output_tokens", "utilization", "quant", "lora_rank",
                 "train_quant", "scale_to_zero", "dataset_tokens", "epochs"):
        assert defaults[name] == PLAN_DEFAULTS[name], name


def test_choices_text() -> None:
    assert choices_text(("a", "b")) == "a | b"
    assert choices_text(("a", "b"), ", ") == "a, b"


# ---- the commands print what the renderers return ------------------------------------------------------------


def test_estimate_command_prints_the_renderer(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["estimate", "--model", "llama2-7b", "--quant", "nf4", "--seq-len", "1024", "--gpu", "a10g"]
    for fmt in ("table", "json", "csv"):
        assert main([*args, "--format", fmt]) == 0
        out = capsys.readouterr().out
        setup = Setup(model="llama2-7b", quant="nf4", seq_len=1024)
        assert out == render_estimate(estimate(setup), fmt, gpu=gpu_catalog().get("a10g")) + "\n"


def test_plan_command_prints_the_renderer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama2-7b", "--gpu", "a10g", "--rps", "3", "--variants", "50", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(render_plan(plan(PlanInputs(model="llama2-7b", variants=50, gpu="a10g", rps=3.0)), "json"))
