"""The CUDA path of the profiler on a tiny model. Needs a CUDA GPU; skipped elsewhere."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_configs: dict) -> str:
    path = tmp_path_factory.mktemp("gpu-model") / "config.json"
    path.write_text(json.dumps(tiny_configs["llama"]))
    return str(path)


@pytest.mark.parametrize("quant, double_quant", [("bf16", False), ("nf4", True)])
def test_cuda_run_records_allocator_and_nvml(tiny_model: str, quant: str, double_quant: bool) -> None:
    from memplan.model.catalog import load_model
    from memplan.measure.profiler.run import profile_setup
    from memplan.training.setup import Setup
    from memplan.model.storage import weight_bytes

    setup = Setup(model=tiny_model, quant=quant, double_quant=double_quant, seq_len=64, batch_size=2, device="cuda")
    record = profile_setup(setup, steps=2)
    assert record["outcome"] == "ok", record["error"]
    m = record["measured"]
    predicted = weight_bytes(load_model(tiny_model), quant, double_quant=double_quant).total
    assert abs(m["weights_bytes"] - predicted) <= 0.001 * predicted
    # The allocator hands out blocks of at least 512 bytes, so it sees at least what the ledger sees.
    assert m["steady_peak_bytes"] >= m["steady_peak_ledger_bytes"] > 0
    for phase in ("load", "setup", "forward", "backward", "optimizer", "step2_forward", "step2_backward", "step2_optimizer"):
        p = record["phases"][phase]
        assert p["max_allocated_bytes"] >= p["allocated_bytes"]
        assert p["reserved_bytes"] >= p["allocated_bytes"]
        assert p["nvml_used_bytes"] > 0
    assert m["cuda_context_bytes"] is None or m["cuda_context_bytes"] > 0
    assert record["env"]["device_total_memory_bytes"] > 0 and record["env"]["cuda_version"]
