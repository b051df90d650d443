"""`memplan.planning.sweep`: every row equals the single-setup estimate for the same inputs, the
columns and dtypes are the documented ones, exports round-trip, and `memplan sweep`
is a thin CLI over it."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from memplan.cli import main
from memplan.training.estimate import estimate
from memplan.training.fit import fit_on
from memplan.serving.fleet import PlanInputs, plan
from memplan.hardware.gpus import gpu_catalog
from memplan.training.search import cheapest_gpu, smallest_gpu
from memplan.training.setup import Setup
from memplan.planning.sweep import ADAPTER_DTYPES, MEMORY_FIELDS, PEAK_PARTS, column_dtypes, read_sweep, sweep, write_sweep
from memplan.units import format_bytes

# 3 families (gemma2: eager attention by default; gpt2: learned positions), every
# method/format/option crossing that collapses or is refused, both devices.
GRID: dict[str, Any] = dict(
    model=["llama2-7b", "gemma2-9b", "gpt2"], method=["full", "lora"], quant=["bf16", "nf4"], double_quant=[False, True],
    lora_targets=["default", "all-linear"], seq_len=[512, 2048], batch_size=2, grad_checkpointing=[False, True],
    optimizer=["adamw", "paged_adamw_8bit"], device=["cuda", "cpu"],
)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return sweep(**GRID)


def setup_of(row: dict[str, Any]) -> Setup:
    """The Setup a row describes, read from its columns as documented."""
    lora = row["method"] == "lora"
    targets = row["lora_targets"] if lora else "default"
    return Setup(
        model=row["model"], method=row["method"], quant=row["quant"], double_quant=bool(row["double_quant"]),
        compute_dtype="bf16" if pd.isna(row["compute_dtype"]) else row["compute_dtype"], lora_rank=int(row["lora_rank"]) if lora else 8,
        lora_targets=None if targets == "default" else tuple(targets.split(",")),
        lora_dropout=float(row["lora_dropout"]) if lora else 0.0, seq_len=int(row["seq_len"]), batch_size=int(row["batch_size"]),
        grad_checkpointing=bool(row["grad_checkpointing"]), optimizer=row["optimizer"], attention=row["attention"],
        device=row["device"], prepare_kbit_training=bool(row["prepare_kbit_training"]), autocast=row["autocast"],
    )


def test_rows_equal_single_setup_estimates(frame: pd.DataFrame) -> None:
    catalog = gpu_catalog()
    assert len(frame) > 100
    for row in frame.to_dict("records"):
        setup = setup_of(row)
        est = estimate(setup)  # the single-setup path: its own model load, no sweep caches
        m = est.memory
        assert row["total_parameters"] == est.total_parameters
        assert row["trainable_parameters"] == est.trainable_parameters
        for f in MEMORY_FIELDS:
            expected = est.weight_storage.quant_state if f == "quant_state" else getattr(m, f)
            assert row[f"{f}_bytes"] == expected, (f, setup)
        assert row["peak_phase"] == m.peak_phase
        for p in PEAK_PARTS:
            assert row[f"peak_breakdown_bytes.{p}"] == est.peak_parts.get(p, 0)  # a layout's own parts: 0 on one GPU
        for d in ADAPTER_DTYPES:
            if setup.method == "lora":
                assert row[f"adapter_file_bytes.{d}"] == est.adapter_file_bytes[d]
            else:
                assert pd.isna(row[f"adapter_file_bytes.{d}"])
        if setup.device == "cuda":
            for g in catalog.gpus:
                fit = fit_on(est, g)
                assert (row[f"fits.{g.key}"], row[f"headroom_bytes.{g.key}"]) == (fit.fits, fit.headroom_bytes)
            small, cheap = smallest_gpu(setup, catalog), cheapest_gpu(setup, catalog)
            assert (None if pd.isna(row["smallest_gpu"]) else row["smallest_gpu"]) == (small.key if small else None)
            assert (None if pd.isna(row["cheapest_gpu"]) else row["cheapest_gpu"]) == (cheap.key if cheap else None)
            assert (None if pd.isna(row["cheapest_usd_per_hour"]) else row["cheapest_usd_per_hour"]) == (cheap.usd_per_hour if cheap else None)
        else:
            assert all(pd.isna(row[f"fits.{g.key}"]) and pd.isna(row[f"headroom_bytes.{g.key}"]) for g in catalog.gpus)
            assert pd.isna(row["smallest_gpu"]) and pd.isna(row["cheapest_gpu"])


def test_row_count_collapses_and_refusals() -> None:
    # full: bf16 (double_quant, compute_dtype and rank do not apply: 1 row); nf4 x 2 double_quant x
    # 2 compute_dtype refused (rank does not apply: 4 combinations); lora: bf16 x 2 ranks (double_quant
    # and compute_dtype collapsed) + nf4 x 2 double_quant x 2 compute_dtype x 2 ranks = 2 + 8.
    f = sweep(model="llama2-7b", method=["full", "lora"], quant=["bf16", "nf4"], double_quant=[False, True], lora_rank=[8, 16],
              compute_dtype=["bf16", "fp16"])
    assert len(f) == 11
    assert list(f.attrs["refused"].values()) == [4]
    assert "full fine-tuning cannot train an nf4 base" in next(iter(f.attrs["refused"]))
    full = f[f["method"] == "full"].iloc[0]
    assert pd.isna(full["lora_rank"]) and pd.isna(full["lora_targets"]) and math.isnan(full["lora_dropout"])
    assert not full["double_quant"] and pd.isna(full["compute_dtype"])
    assert sorted(f.loc[f["quant"] == "nf4", "double_quant"].tolist()) == [False] * 4 + [True] * 4
    assert f.loc[f["quant"] == "bf16", "compute_dtype"].isna().all()


def test_autocast_applies_to_fp32_bases_only() -> None:
    # fp32 x {none, bf16, fp16} = 3 rows; bf16 and nf4 collapse autocast to none: 1 row each.
    f = sweep(model="llama2-7b", quant=["fp32", "bf16", "nf4"], autocast=["none", "bf16", "fp16"])
    assert len(f) == 5 and f["autocast"].dtype == "category"
    assert sorted(f.loc[f["quant"] == "fp32", "autocast"].tolist()) == ["bf16", "fp16", "none"]
    assert (f.loc[f["quant"] != "fp32", "autocast"] == "none").all()
    for row in f.to_dict("records"):
        assert row["peak_bytes"] == estimate(setup_of(row)).memory.peak


def test_refused_combinations_are_counted_by_reason(frame: pd.DataFrame) -> None:
    refused = frame.attrs["refused"]
    # gpt2 has 1,024 learned positions: its seq_len 2048 rows are refused, never estimated.
    assert not ((frame["model"] == "gpt2") & (frame["seq_len"] == 2048)).any()
    assert any("exceeds gpt2's 1024 learned positions" in r for r in refused)
    assert (frame.loc[frame["model"] == "gemma2-9b", "attention"] == "eager").all()  # transformers' choice for gemma2
    assert (frame.loc[frame["model"] != "gemma2-9b", "attention"] == "sdpa").all()


def test_explicit_sdpa_for_gemma2_is_refused_per_row() -> None:
    f = sweep(model=["gemma2-9b", "llama2-7b"], attention="sdpa")
    assert f["model"].tolist() == ["llama2-7b"]
    assert list(f.attrs["refused"]) == ["gemma2 has no SDPA attention in transformers 5.x; use --attention eager (its default) or flash"]


def test_peak_parts_sum_to_the_peak(frame: pd.DataFrame) -> None:
    parts = frame[[f"peak_breakdown_bytes.{p}" for p in PEAK_PARTS]].sum(axis=1)
    assert (parts == frame["peak_bytes"]).all()


def test_dtypes_are_the_documented_ones(frame: pd.DataFrame) -> None:
    documented = column_dtypes(list(frame.columns))
    assert {c: str(t) for c, t in frame.dtypes.items()} == documented
    for c in ("model", "method", "quant", "lora_targets", "optimizer", "attention", "device", "peak_phase", "smallest_gpu"):
        assert isinstance(frame[c].dtype, pd.CategoricalDtype), c
    assert frame["peak_bytes"].dtype == "int64" and frame["seq_len"].dtype == "int64"
    assert frame["lora_rank"].dtype == "Int64" and frame["fits.a10g"].dtype == "boolean"
    # categories in order of first appearance
    assert list(frame["model"].cat.categories) == ["llama2-7b", "gemma2-9b", "gpt2"]


def layout_setup_of(row: dict[str, Any]) -> Setup:
    """A layout row's Setup, read from its columns as documented (fsdp_version NA off FSDP)."""
    from dataclasses import replace

    version = 1 if pd.isna(row["fsdp_version"]) else int(row["fsdp_version"])
    return replace(setup_of(row), gpus=int(row["gpus"]), gpus_per_node=int(row["gpus_per_node"]), parallel=row["parallel"],
                   fsdp_version=version, offload=row["offload"], quant_storage=row["quant_storage"])


LAYOUT_GRID: dict[str, Any] = dict(
    model="llama2-70b", method=["full", "lora"], quant=["bf16", "nf4"], gpus=[1, 2, 16], parallel=["none", "ddp", "fsdp", "zero3"],
    fsdp_version=[1, 2], offload=["none", "params_and_optimizer"], quant_storage=["uint8", "bf16"], gpu=["h100", "rtx3090"],
)


@pytest.fixture(scope="module")
def layouts() -> pd.DataFrame:
    return sweep(**LAYOUT_GRID)


def test_layout_rows_equal_the_per_gpu_estimate(layouts: pd.DataFrame) -> None:
    catalog = gpu_catalog()
    assert len(layouts) > 20 and set(layouts["parallel"]) == {"none", "ddp", "fsdp", "zero3"}
    for row in layouts.to_dict("records"):
        setup = layout_setup_of(row)
        est = estimate(setup)
        assert row["peak_bytes"] == est.memory.peak  # per GPU under the layout
        sh = est.sharding
        assert (row["host_per_gpu_bytes"], row["host_per_node_bytes"]) == ((sh.host_per_gpu, sh.host_per_node) if sh else (0, 0))
        assert sum(row[f"peak_breakdown_bytes.{p}"] for p in PEAK_PARTS) == row["peak_bytes"]
        for key in ("h100", "rtx3090"):
            assert row[f"fits.{key}"] == fit_on(est, catalog.get(key)).fits
        if not pd.isna(row["cheapest_gpu"]):  # the job's GPUs per hour: gpus x one GPU's catalog price
            assert row["cheapest_usd_per_hour"] == pytest.approx(setup.gpus * catalog.get(row["cheapest_gpu"]).usd_per_hour)
        assert row["offload"] == "none" or row["host_per_node_bytes"] > 0


def test_layout_options_collapse_where_they_do_not_apply(layouts: pd.DataFrame) -> None:
    assert layouts.loc[layouts["parallel"] != "fsdp", "fsdp_version"].isna().all()  # FSDP only
    assert set(layouts.loc[layouts["parallel"] == "fsdp", "fsdp_version"]) == {1, 2}
    assert (layouts.loc[layouts["quant"] == "bf16", "quant_storage"] == "uint8").all()  # nf4/fp4 only
    key = ["method", "quant", "gpus", "parallel", "fsdp_version", "offload", "quant_storage"]
    assert not layouts[key].astype(str).duplicated().any()  # a collapsed option never doubles a row
    assert layouts["gpus_per_node"].tolist() == [min(g, 8) for g in layouts["gpus"]]


def test_impossible_layouts_are_left_out_and_counted(layouts: pd.DataFrame) -> None:
    refused = layouts.attrs["refused"]
    assert not ((layouts["gpus"] > 1) & (layouts["parallel"] == "none")).any()
    assert any("needs a layout" in r for r in refused)
    # a uint8 4-bit base cannot be flattened by FSDP / ZeRO-3; offload needs FSDP or ZeRO
    flat = layouts["parallel"].isin(["fsdp", "zero3"]) & (layouts["quant"] == "nf4")
    assert (layouts.loc[flat, "quant_storage"] == "bf16").all() and flat.any()
    assert any("cannot flatten a uint8 4-bit base" in r for r in refused)
    assert not (layouts["parallel"].isin(["none", "ddp"]) & (layouts["offload"] != "none")).any()
    for reason in refused:
        assert "\n" not in reason


def test_more_gpus_never_need_more_memory_per_gpu_under_zero3(layouts: pd.DataFrame) -> None:
    # ZeRO-3 partitions parameters, gradients and optimizer states over the GPUs (arXiv:1910.02054).
    z = layouts[(layouts["parallel"] == "zero3") & (layouts["offload"] == "none")]
    for _, g in z.groupby(["method", "quant"], observed=True):
        peaks = g.sort_values("gpus")["peak_bytes"].tolist()
        assert peaks == sorted(peaks, reverse=True) and len(peaks) == 3


def test_the_cli_takes_layout_axes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "-m", "llama2-70b", "--method", "full", "--gpus", "8,16", "--parallel", "zero3,fsdp",
                 "--fsdp-version", "2", "-g", "h100"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["model", "gpus", "parallel", "peak"] and "peak per GPU" in out[0]
    assert len(out) == 1 + 4


def test_column_names_are_stable() -> None:
    f = sweep(model="llama2-7b", quant="nf4", gpu=["a10g", "h100"], variants=[1, 10], rps=1.0, serve_gpu="a10g")
    assert list(f.columns) == [
        "model", "method", "quant", "double_quant", "compute_dtype", "lora_rank", "lora_targets", "lora_dropout", "seq_len",
        "batch_size", "grad_checkpointing", "optimizer", "attention", "device", "prepare_kbit_training",
        "autocast", "recipe", "modules_to_save", "gpus", "gpus_per_node", "parallel", "fsdp_version", "offload", "quant_storage",
        "variants", "rps", "serve_gpu",
        "total_parameters", "trainable_parameters", "weights_bytes", "quant_state_bytes", "adapters_bytes", "gradients_bytes",
        "optimizer_states_bytes", "optimizer_paged_bytes", "activations_bytes", "logits_bytes", "transients_bytes",
        "overhead_bytes", "allocated_peak_bytes", "peak_bytes", "peak_phase",
        "peak_breakdown_bytes.weights", "peak_breakdown_bytes.adapters", "peak_breakdown_bytes.optimizer_states",
        "peak_breakdown_bytes.gradients", "peak_breakdown_bytes.activations", "peak_breakdown_bytes.logits",
        "peak_breakdown_bytes.transients", "peak_breakdown_bytes.overhead", "peak_breakdown_bytes.master_weights",
        "peak_breakdown_bytes.comm_buffers", "peak_breakdown_bytes.gathered", "host_per_gpu_bytes", "host_per_node_bytes",
        "adapter_file_bytes.fp32", "adapter_file_bytes.fp16", "adapter_file_bytes.bf16",
        "fits.a10g", "fits.h100", "headroom_bytes.a10g", "headroom_bytes.h100", "smallest_gpu", "cheapest_gpu",
        "cheapest_usd_per_hour", "gpus.full_finetune", "gpus.lora", "gpus.lorax", "gpus.vllm_multi_lora",
        "usd_per_month.full_finetune", "usd_per_month.lora", "usd_per_month.lorax", "usd_per_month.vllm_multi_lora", "fleet_error",
    ]


def test_llama2_trainable_parameters_match_the_published_count() -> None:
    f = sweep(model="llama2-7b", lora_rank=8, lora_targets="q_proj,v_proj")
    assert f["trainable_parameters"].tolist() == [4_194_304]  # REFERENCE.md: r=8 on q_proj, v_proj
    assert f["total_parameters"].tolist() == [6_738_415_616]


def test_fleet_columns_equal_the_fleet_plan() -> None:
    f = sweep(model="llama2-7b", method=["full", "lora"], quant="bf16", lora_rank=16, variants=[1, 100], rps=2.0,
              serve_gpu="a10g", fleet_options={"popularity": "zipf"})
    assert len(f) == 4 and f["fleet_error"].isna().all()
    for row in f.to_dict("records"):
        lora = row["method"] == "lora"
        kw = dict(lora_rank=16) if lora else {}
        p = plan(PlanInputs(model="llama2-7b", variants=int(row["variants"]), gpu="a10g", rps=2.0, train_quant="bf16",
                            popularity="zipf", **kw))
        for s, r in p.strategies.items():
            if lora or s == "full_finetune":
                assert (row[f"gpus.{s}"], row[f"usd_per_month.{s}"]) == (r.gpus, r.usd_per_month)
            else:  # a full fine-tuning row has no rank: the LoRA strategies do not apply to it
                assert math.isnan(row[f"gpus.{s}"]) and math.isnan(row[f"usd_per_month.{s}"])


def test_fleet_refusal_is_a_column_not_a_lost_row() -> None:
    # gpt2 has 1,024 positions; the fleet's default prompt + output is 1,152 tokens.
    f = sweep(model="gpt2", variants=10, rps=1.0, serve_gpu="a10g")
    assert len(f) == 1
    assert "exceeds gpt2's 1,024 positions" in f["fleet_error"].iloc[0]
    assert f[["gpus.lorax", "usd_per_month.lorax"]].isna().all(axis=None)


def test_progress_callback_reaches_the_total() -> None:
    seen: list[tuple[int, int]] = []
    sweep(model="llama2-7b", seq_len=[256, 512, 1024], progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".xlsx"])
def test_exports_round_trip(tmp_path: Path, suffix: str) -> None:
    f = sweep(model=["llama2-7b", "gpt2"], method=["full", "lora"], quant="bf16", lora_targets=["default", "q_proj,k_proj"],
              device=["cuda", "cpu"], gpu=["a10g", "l40s"], variants=[1, 10], rps=0.5, serve_gpu="l4")
    path = tmp_path / f"sweep{suffix}"
    write_sweep(f, path)
    back = read_sweep(path)
    if suffix == ".xlsx":
        # openpyxl writes floats with 16 significant digits (Excel keeps 15): $ figures to 1e-15;
        # integers (every byte count) stay exact.
        pd.testing.assert_frame_equal(back, f, rtol=1e-15)
        ints = [c for c, t in f.dtypes.items() if str(t) in ("int64", "Int64")]
        pd.testing.assert_frame_equal(back[ints], f[ints], check_exact=True)
    else:
        pd.testing.assert_frame_equal(back, f, check_exact=True)
    # Byte counts above 2**53 would not survive a float: they are written as integers.
    if suffix == ".csv":
        assert pd.read_csv(path)["peak_bytes"].dtype == "int64"


def test_cli_writes_by_extension(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.parquet"
    assert main(["sweep", "-m", "llama2-7b", "-q", "bf16,nf4", "-s", "512,1024", "-g", "a10g", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote 4 rows x 1 GPU to {out}\n"
    f = pd.read_parquet(out)
    assert f["quant"].tolist() == ["bf16", "bf16", "nf4", "nf4"] and f["seq_len"].tolist() == [512, 1024, 512, 1024]


def test_cli_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--model", "llama2-7b", "--quant", "bf16,nf4", "--lora-targets", "q_proj,v_proj",
                 "--lora-targets", "all-linear"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "quant", "lora_targets", "peak", "smallest", "GPU", "cheapest", "GPU"]
    assert len(lines) == 5
    nf4 = estimate(Setup(model="llama2-7b", quant="nf4", lora_targets=("all-linear",)))
    assert lines[4].split()[:3] == ["llama2-7b", "nf4", "all-linear"]
    assert format_bytes(nf4.memory.peak) in lines[4]


def test_cli_refuses_an_unknown_extension_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.import_module("memplan.training.estimate"), "estimate", lambda *a, **k: pytest.fail("estimated"))
    assert main(["sweep", "-m", "llama2-7b", "--out", str(tmp_path / "s.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write .csv, .parquet or .xlsx" in err
    assert main(["sweep", "-m", "llama2-7b", "--out", str(tmp_path / "no" / "s.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "-m", "llama2-7b", "-s", "256,512", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "sweep" in err and "2/2" in err
    assert "2/2" not in out


def test_cli_notes_refused_combinations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "-m", "llama2-7b", "--method", "full,lora", "-q", "nf4"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("note: the estimator refused 1 combination of the grid:\n  1 x full fine-tuning cannot train an nf4 base")


def test_cli_import_stays_light() -> None:
    code = "import sys, memplan.cli; print(sorted(m for m in ('pandas', 'plotly', 'yaml', 'rich', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_xlsx_is_one_typed_sheet_with_a_frozen_header(tmp_path: Path) -> None:
    import openpyxl

    f = sweep(model="llama2-7b", method=["full", "lora"], gpu="a10g")
    path = tmp_path / "s.xlsx"
    write_sweep(f, path)
    sheet = openpyxl.load_workbook(path)["sweep"]
    assert sheet.freeze_panes == "A2" and sheet["A1"].font.b
    header, full, lora = (list(r) for r in sheet.iter_rows(max_row=3, values_only=True))
    assert header == list(f.columns)
    at = header.index
    assert full[at("lora_rank")] is None and lora[at("lora_rank")] == 8  # NA is a blank cell, numbers are numbers
    assert full[at("peak_bytes")] == f["peak_bytes"].iloc[0] and full[at("fits.a10g")] is bool(f["fits.a10g"].iloc[0])
