"""Predicted vs measured: pairing, relative error, truncated models, the validate CLI,
and the committed GPU records checked against published counts (REFERENCE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.model.catalog import load_model, with_layers
from memplan.cli import main
from memplan.measure.compare import compare_record, compare_records
from memplan.training.estimate import estimate
from memplan.measure.records import append_record, new_record, read_records
from memplan.training.setup import Setup

ENV = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "transformers": "5.23.0",
       "peft": "0.21.2", "bitsandbytes": "0.50.2"}
SETUP = Setup(model="llama2-7b", quant="nf4", double_quant=True, lora_targets=("q_proj", "v_proj"))


def _record(setup: Setup = SETUP, *, layers: int | None = None, outcome: str = "ok", measured: dict | None = None,
            model_info: dict | None = None) -> dict:
    return new_record(setup=setup, layers=layers, steps=3, env=ENV, outcome=outcome, measured=measured or {},
                      model_info=model_info)


MEASURED = {"weights_bytes": 3_000_000_000, "trainable_bytes": 16 * 2**20, "gradients_bytes": 16 * 2**20,
            "optimizer_state_bytes": 32 * 2**20, "activations_bytes": 2 * 2**30, "steady_peak_bytes": 6 * 2**30,
            "nvml_peak_bytes": 7 * 2**30}


def test_rows_pair_each_component_with_its_measurement() -> None:
    rows = {r["component"]: r for r in compare_record(_record(measured=MEASURED))}
    assert list(rows) == ["weights", "adapters", "gradients", "optimizer_states", "activations", "peak", "device_peak"]
    mem = estimate(SETUP).to_dict()["memory_bytes"]
    assert rows["weights"]["predicted_bytes"] == mem["weights"]
    assert rows["peak"]["predicted_bytes"] == mem["allocated_peak"]  # what torch's allocator should report
    assert rows["device_peak"]["predicted_bytes"] == mem["peak"]
    for component, key in (("weights", "weights_bytes"), ("peak", "steady_peak_bytes"), ("device_peak", "nvml_peak_bytes")):
        r = rows[component]
        assert r["measured_bytes"] == MEASURED[key]
        assert r["rel_error"] == pytest.approx(r["predicted_bytes"] / MEASURED[key] - 1)
    assert rows["adapters"]["measured_bytes"] == 16 * 2**20
    assert rows["peak"]["lora_targets"] == "q_proj,v_proj" and rows["peak"]["quant"] == "nf4"


def test_half_the_prediction_is_plus_100_percent() -> None:
    mem = estimate(SETUP).to_dict()["memory_bytes"]
    rows = {r["component"]: r for r in compare_record(_record(measured={"weights_bytes": mem["weights"] // 2}))}
    assert rows["weights"]["rel_error"] == pytest.approx(1.0, abs=1e-9)
    assert rows["gradients"]["measured_bytes"] is None and rows["gradients"]["rel_error"] is None


def test_truncated_and_full_fine_tuning_records() -> None:
    full = Setup(model="llama2-7b", method="full", quant="bf16", device="cpu")
    rows = {r["component"]: r for r in compare_record(_record(full, layers=2, measured={"weights_bytes": 1}))}
    assert "adapters" not in rows and "device_peak" not in rows
    two_layers = estimate(full, model=with_layers(load_model("llama2-7b"), 2)).to_dict()["memory_bytes"]
    assert rows["weights"]["predicted_bytes"] == two_layers["weights"]
    assert two_layers["weights"] < estimate(full).to_dict()["memory_bytes"]["weights"]


def test_embedded_config_is_used_when_the_model_path_is_gone(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 256}
    setup = Setup(model=str(tmp_path / "gone" / "config.json"), device="cpu")
    rec = _record(setup, measured={"weights_bytes": 1}, model_info={"name": "tiny", "num_layers": 2, "config": cfg})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    expected = estimate(Setup(model=str(path), device="cpu")).to_dict()["memory_bytes"]["weights"]
    assert compare_record(rec)[0]["predicted_bytes"] == expected


def test_failed_runs_are_left_out() -> None:
    frame = compare_records([_record(measured=MEASURED), _record(outcome="oom"), _record(outcome="error")])
    assert set(frame["component"]) >= {"weights", "peak"} and frame["id"].nunique() == 1


def test_validate_cli_table_csv_and_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "runs.jsonl"
    append_record(path, _record(measured=MEASURED))
    append_record(path, _record(outcome="oom", measured={"weights_bytes": 3_000_000_000}))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "peak" in out and "%" in out
    assert main(["validate", str(path), "--format", "csv"]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("id,label,model,") and len(rows) == 7
    assert main(["validate", str(path), "--measured"]) == 0
    out = capsys.readouterr().out
    assert "oom" in out and "ok" in out
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2


def _gpu_records() -> list[dict]:
    from memplan.paths import profiles_dir

    files = sorted(profiles_dir().glob("cuda-*.jsonl"))
    return [r for r in read_records(files) if r["outcome"] == "ok"] if files else []


def test_committed_llama2_7b_gpu_runs_match_published_counts() -> None:
    """REFERENCE.md: Llama-2-7B LoRA r=8 on q_proj,v_proj trains 4,194,304 parameters; the
    ledger's weight bytes after load match the core's weight_bytes within 0.1% (issue 3)."""
    from memplan.model.storage import weight_bytes

    records = [r for r in _gpu_records() if r["setup"]["model"] == "llama2-7b" and r["layers"] is None]
    if not records:
        pytest.skip("no committed Llama-2-7B GPU records")
    spec = load_model("llama2-7b")
    for r in records:
        s = r["setup"]
        if s["method"] == "lora" and s["lora_rank"] == 8 and s["lora_targets"] == ["q_proj", "v_proj"]:
            assert r["measured"]["trainable_parameters"] == 4_194_304
        predicted = weight_bytes(spec, s["quant"], double_quant=s["double_quant"], compute_dtype=s["compute_dtype"]).total
        assert abs(r["measured"]["weights_bytes"] - predicted) <= 0.001 * predicted
