"""The whole profiling path on the CPU with a tiny Llama: a real campaign through
`memplan profile` (one subprocess per run) over the six acceptance setups.

Reference values come from outside the profiler: the core's `weight_bytes`,
PEFT's LoRA shapes r x (in + out), torch.optim.AdamW's state layout, and a
model loaded here through transformers and counted storage by storage.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from memplan.model.catalog import load_model  # noqa: E402
from memplan.cli import main  # noqa: E402
from memplan.model.lora import plan_lora  # noqa: E402
from memplan.measure.records import read_records  # noqa: E402
from memplan.training.setup import Setup  # noqa: E402
from memplan.model.storage import weight_bytes  # noqa: E402

pytestmark = pytest.mark.slow

from validation_matrix import PROFILE_CASES as CASES  # noqa: E402  (name -> setup fields beyond the grid defaults)
PHASES = ("load", "setup", "forward", "backward", "optimizer", "step2_forward", "step2_backward", "step2_optimizer")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, cpu_campaign) -> dict:
    """The six setups were measured in the session's shared campaign (tests/measure/conftest.py);
    `memplan profile --grid` over the same records file then resumes: it re-runs none of them
    (an errored one would run again) and prints the measured summary and the comparison."""
    root = tmp_path_factory.mktemp("profile")
    model = cpu_campaign.profile_model
    grid = {"defaults": {"model": str(model), "device": "cpu", "seq_len": 24, "batch_size": 2},
            "grids": list(CASES.values())}
    (root / "grid.json").write_text(json.dumps(grid))
    out = cpu_campaign.out
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["profile", "--grid", str(root / "grid.json"), "--steps", "2", "--out", str(out), "--compare"])
    records = [r for r in read_records(out) if r["setup"]["model"] == str(model)]
    by_case = {}
    for name, fields in CASES.items():
        want = Setup(model=str(model), device="cpu", seq_len=24, batch_size=2, **fields).to_dict()
        by_case[name] = next(r for r in records if r["setup"] == want)
    return {"status": status, "records": records, "by_case": by_case, "model": str(model), "printed": printed.getvalue()}


def test_every_setup_ran_ok(campaign: dict) -> None:
    assert campaign["status"] == 0
    printed = campaign["printed"]  # the measured summary, then predicted vs measured per run
    assert printed.count(" ok ") >= len(CASES) and printed.count("predicted") == len(CASES)
    assert all(c in printed for c in ("weights", "adapters", "gradients", "optimizer_states", "activations", "peak"))
    assert len(campaign["records"]) == len(CASES)
    for name, r in campaign["by_case"].items():
        assert r["outcome"] == "ok", (name, r["error"])
        assert tuple(r["phases"]) == PHASES
        for p in r["phases"].values():
            assert p["ledger_peak_bytes"] >= p["ledger_bytes"] > 0
            assert sum(p["ledger_by_category"].values()) == p["ledger_bytes"]
        assert {"torch", "transformers", "peft", "bitsandbytes", "device_name", "hostname"} <= set(r["env"])


@pytest.mark.parametrize("case", list(CASES))
def test_ledger_weight_bytes_match_the_core_prediction(campaign: dict, case: str) -> None:
    r = campaign["by_case"][case]
    s = r["setup"]
    predicted = weight_bytes(load_model(campaign["model"]), s["quant"], double_quant=s["double_quant"],
                             compute_dtype=s["compute_dtype"]).total
    assert abs(r["measured"]["weights_bytes"] - predicted) <= 0.001 * predicted


def test_ledger_weight_bytes_match_a_model_loaded_here(campaign: dict, tmp_path: Path) -> None:
    """Independent count: load the same nf4 + double-quant model through transformers in this
    process and add up its distinct storages (tests/conftest.py::storage_bytes)."""
    import torch
    from conftest import build_model, storage_bytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = json.loads(Path(campaign["model"]).read_text())
    build_model(cfg, dtype="bf16").save_pretrained(tmp_path)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=qcfg, device_map={"": "cpu"})
    assert campaign["by_case"]["nf4-dq-lora"]["measured"]["weights_bytes"] == storage_bytes(model)


def test_adapters_gradients_and_optimizer_state(campaign: dict) -> None:
    spec = load_model(campaign["model"])
    lora_params = plan_lora(spec, 8, None).trainable_parameters  # r x (in + out) per adapted linear
    for name in ("bf16-lora", "int8-lora", "nf4-lora", "nf4-dq-lora"):
        m = campaign["by_case"][name]["measured"]
        assert m["trainable_parameters"] == lora_params
        assert m["trainable_bytes"] == 4 * lora_params  # PEFT autocast_adapter_dtype: fp32 adapters
        assert m["gradients_bytes"] == m["trainable_bytes"]
        # torch AdamW: exp_avg + exp_avg_sq like the parameter, plus a 0-d fp32 `step` per tensor on the CPU.
        assert m["optimizer_state_bytes"] == 2 * m["trainable_bytes"] + 4 * m["trainable_tensors"]
    full = campaign["by_case"]["bf16-full"]["measured"]
    assert full["trainable_parameters"] == spec.total_parameters
    assert full["gradients_bytes"] == 2 * spec.total_parameters
    assert full["optimizer_state_bytes"] == 4 * spec.total_parameters + 4 * full["trainable_tensors"]


def test_peak_breakdown_adds_up_and_checkpointing_saves_activations(campaign: dict) -> None:
    for r in campaign["by_case"].values():
        m = r["measured"]
        assert m["steady_peak_bytes"] == m["steady_peak_ledger_bytes"]  # CPU: the ledger is the measurement
        assert sum(m["breakdown_at_peak"].values()) == m["steady_peak_ledger_bytes"]
        assert m["breakdown_at_peak"]["parameters"] >= m["weights_bytes"]
        assert m["steady_peak_phase"].startswith("step2_")
    on = campaign["by_case"]["bf16-lora-checkpointing"]["measured"]
    off = campaign["by_case"]["bf16-lora"]["measured"]
    assert on["activations_bytes"] < off["activations_bytes"] / 2
    assert on["steady_peak_bytes"] < off["steady_peak_bytes"]
    assert on["weights_bytes"] == off["weights_bytes"]


def test_quantized_weights_are_smaller(campaign: dict) -> None:
    w = {name: r["measured"]["weights_bytes"] for name, r in campaign["by_case"].items()}
    # (double quantization only pays off on large matrices: each quantized linear keeps its own
    # 1 KiB nested code table, so on this tiny model nf4 + dq is not smaller than nf4)
    assert max(w["nf4-lora"], w["nf4-dq-lora"]) < w["int8-lora"] < w["bf16-lora"] == w["bf16-full"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "mixtral", "gemma2", "phi3", "gpt2", "bert"])
def test_every_family_loads_to_the_predicted_weight_bytes(family: str, tiny_configs: dict, tmp_path: Path) -> None:
    """In-process (no subprocess) NF4 + double-quant load and one step of every supported family."""
    from memplan.measure.profiler.run import profile_setup

    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_configs[family]))
    setup = Setup(model=str(path), device="cpu", quant="nf4", double_quant=True, seq_len=16,
                  attention="eager" if family == "gemma2" else "sdpa")  # default targets (phi3: memplan's)
    record = profile_setup(setup, steps=1)
    assert record["outcome"] == "ok", record["error"]
    spec = load_model(str(path))
    predicted = weight_bytes(spec, "nf4", double_quant=True).total
    assert abs(record["measured"]["weights_bytes"] - predicted) <= 0.001 * predicted
    assert record["measured"]["trainable_parameters"] == plan_lora(spec, 8, None).trainable_parameters
