"""memplan.training.device_terms: the fitted CUDA constants and how they are loaded.

Reference values: data/device_terms.json read here with `json` (not through the module),
or a user terms file written here (via $MEMPLAN_DEVICE_TERMS, memplan.paths.TERMS_ENV),
and the NVML context size measured in profiles/cuda-h100.jsonl. The overhead formula is
written out from the module docstring's definitions.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import memplan.training.device_terms as dt
from memplan.errors import ConfigError
from memplan.paths import TERMS_ENV, data_dir, profiles_dir
from memplan.training.device_terms import DeviceTerms, device_terms


@pytest.fixture
def terms_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point the user's terms file (memplan.paths.TERMS_ENV) at a path in tmp_path, with a fresh cache."""
    path = tmp_path / "device_terms.json"
    monkeypatch.setenv(TERMS_ENV, str(path))
    dt.device_terms.cache_clear()
    yield path
    dt.device_terms.cache_clear()


def test_cuda_terms_are_the_shipped_file_without_a_user_file(terms_at: Path) -> None:
    raw = json.loads((data_dir() / "device_terms.json").read_text())["cuda"]
    t = device_terms("cuda")
    assert t.device == "cuda"
    assert t.cuda_context_bytes == raw["cuda_context_bytes"]
    assert t.workspace_bytes == raw["workspace_bytes"]
    assert t.allocator_fraction == raw["allocator_fraction"]
    assert t.source == raw["source"]


def test_cuda_context_is_the_measured_one(terms_at: Path) -> None:
    # Every committed H100 record measured the same NVML context before any tensor.
    recs = [json.loads(line) for line in (profiles_dir() / "cuda-h100.jsonl").read_text().splitlines() if line.strip()]
    measured = [r["measured"]["cuda_context_bytes"] for r in recs if (r.get("measured") or {}).get("cuda_context_bytes")]
    assert measured
    assert device_terms("cuda").cuda_context_bytes == int(statistics.median(measured)) == 543_162_368


def test_cpu_has_no_device_terms() -> None:
    # The CPU ledger counts tensor storages exactly: nothing to add (module docstring).
    t = device_terms("cpu")
    assert (t.cuda_context_bytes, t.workspace_bytes, t.allocator_fraction) == (0, 0, 0.0)
    assert t.allocated_extra_bytes() == 0 and t.overhead_bytes(10**12) == 0


@pytest.mark.parametrize("allocated", [0, 1, 12_345_678_901])
def test_overhead_formula(allocated: int) -> None:
    t = DeviceTerms(device="cuda", cuda_context_bytes=500, workspace_bytes=70, allocator_fraction=0.25)
    # NVML = context + workspace + allocator slack on (modelled allocated + workspace).
    assert t.overhead_bytes(allocated) == 500 + 70 + int(0.25 * (allocated + 70))
    assert t.allocated_extra_bytes() == 70


def test_a_user_file_replaces_the_shipped_terms(terms_at: Path) -> None:
    terms_at.write_text(json.dumps({"cuda": {"cuda_context_bytes": 1, "workspace_bytes": 2, "allocator_fraction": 0.5,
                                             "source": "mine"}}))
    assert device_terms("cuda") == DeviceTerms(device="cuda", cuda_context_bytes=1, workspace_bytes=2,
                                               allocator_fraction=0.5, source="mine")
    assert device_terms("cpu") == DeviceTerms(device="cpu")  # the CPU never has terms


def test_user_file_without_a_cuda_entry_gives_zero_terms(terms_at: Path) -> None:
    terms_at.write_text(json.dumps({"rocm": {"cuda_context_bytes": 1}}))
    assert device_terms("cuda") == DeviceTerms(device="cuda")


def test_partial_entry_defaults_the_rest(terms_at: Path) -> None:
    terms_at.write_text(json.dumps({"cuda": {"cuda_context_bytes": "1234", "allocator_fraction": 0.5}}))
    t = device_terms("cuda")
    assert (t.cuda_context_bytes, t.workspace_bytes, t.allocator_fraction, t.source) == (1234, 0, 0.5, "")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", json.dumps({"cuda": {"workspace_bytes": "lots"}})])
def test_malformed_user_file_is_a_config_error(terms_at: Path, text: str) -> None:
    terms_at.write_text(text)
    with pytest.raises(ConfigError, match="run `memplan calibrate` again or delete it"):
        device_terms("cuda")


def test_estimate_charges_the_terms_on_cuda_only(terms_at: Path) -> None:
    from memplan.training.estimate import estimate
    from memplan.training.setup import Setup

    cpu = estimate(Setup(model="tinyllama-1.1b", device="cpu"))
    gpu = estimate(Setup(model="tinyllama-1.1b", device="cuda"))
    assert cpu.memory.overhead == 0 and cpu.memory.peak == cpu.memory.allocated_peak
    t = device_terms("cuda")
    modelled = gpu.memory.peak - gpu.memory.overhead
    assert gpu.memory.overhead == t.cuda_context_bytes + t.workspace_bytes + int(t.allocator_fraction * (modelled + t.workspace_bytes))
    assert gpu.memory.allocated_peak == modelled + t.workspace_bytes
