"""memplan.hardware.gpus: the GPU catalog, lookups, price overrides and malformed files.

Reference values: the datasheet / nvidia-smi table in /work/shared/REFERENCE.md ("GPUs"),
typed in here by hand (memory in decimal GB, usable in MiB as nvidia-smi prints it,
bandwidth in GB/s, price in USD per GPU-hour).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.errors import MemplanError, UnknownGPUError
from memplan.hardware.gpus import gpu_catalog, load_gpu_catalog, parse_price_overrides

# REFERENCE.md GPU table: (memory GB, usable MiB, bandwidth GB/s, bf16 dense TFLOP/s, USD/hour).
DATASHEET = {
    "t4": (16, 15_360, 320, 65, 0.526),
    "l4": (24, 23_034, 300, 121, 0.805),
    "a10g": (24, 23_028, 600, 70, 1.006),
    "l40s": (48, 46_068, 864, 362, 1.861),
    "a100-40gb": (40, 40_960, 1_555, 312, 2.745),
    "a100-80gb": (80, 81_920, 2_039, 312, 3.43),
    "h100": (80, 81_559, 3_350, 989, 6.88),
    "h200": (141, 143_771, 4_800, 989, 7.91),
    "b200": (180, 183_359, 8_000, 2_250, 14.24),
    "rtx4090": (24, 24_564, 1_008, 165, 0.69),
    "rtx3090": (24, 24_576, 936, 71, 0.43),
}


@pytest.mark.parametrize("key", sorted(DATASHEET))
def test_builtin_catalog_matches_the_datasheet_table(key: str) -> None:
    mem_gb, usable_mib, bw_gbs, tflops, usd = DATASHEET[key]
    g = gpu_catalog().get(key)
    assert g.memory_bytes == mem_gb * 10**9  # datasheets are decimal GB
    assert g.usable_bytes == usable_mib * 2**20  # nvidia-smi MiB
    assert g.bandwidth_bytes_per_s == bw_gbs * 10**9
    assert g.bf16_tflops == tflops
    assert g.usd_per_hour == pytest.approx(usd)
    assert g.price_provider and g.price_date


def test_catalog_holds_exactly_the_reference_gpus() -> None:
    assert {g.key for g in gpu_catalog().gpus} == set(DATASHEET)
    # AWS S3 Standard, first 50 TB (data/gpus.json storage_source)
    assert gpu_catalog().storage_usd_per_gb_month == pytest.approx(0.023)


def test_h100_usable_matches_the_committed_profile() -> None:
    # profiles/cuda-h100.jsonl env.device_total_memory_bytes (NVML total of the H100 that ran them).
    assert gpu_catalog().get("h100").usable_bytes == 85_520_809_984


@pytest.mark.parametrize("name", ["H100", " h100 ", "NVIDIA H100 SXM 80GB", "nvidia a100 80gb"])
def test_lookup_by_key_or_name_ignores_case_and_spaces(name: str) -> None:
    assert gpu_catalog().get(name).key in ("h100", "a100-80gb")


@pytest.mark.parametrize("typo, suggestion", [("a100-80", "a100-80gb"), ("h10", "h100"), ("rtx409", "rtx4090")])
def test_unknown_gpu_suggests_close_matches(typo: str, suggestion: str) -> None:
    with pytest.raises(UnknownGPUError, match=f"unknown GPU '{typo}'; did you mean .*{suggestion}"):
        gpu_catalog().get(typo)


def test_unknown_gpu_with_nothing_close_lists_the_known_keys() -> None:
    with pytest.raises(UnknownGPUError, match="known: t4, l4, a10g"):
        gpu_catalog().get("zzzzzzzzzz")


def test_unknown_gpu_is_a_memplan_error() -> None:
    assert issubclass(UnknownGPUError, MemplanError)


def test_price_overrides_replace_only_the_named_gpu_and_are_marked() -> None:
    base = gpu_catalog()
    cheap = base.with_prices(parse_price_overrides(["a100-80gb=1.89", "H100=2.99"]))
    assert cheap.get("a100-80gb").usd_per_hour == 1.89
    assert cheap.get("h100").usd_per_hour == 2.99  # REFERENCE.md: RunPod's H100 price
    assert cheap.get("h100").price_provider == "user override"
    assert cheap.get("t4") == base.get("t4")
    assert base.get("a100-80gb").usd_per_hour == 3.43  # the built-in catalog is untouched
    assert [g.key for g in cheap.gpus] == [g.key for g in base.gpus]  # order kept


@pytest.mark.parametrize("item", ["a100-80gb", "a100-80gb=", "=1.0", "a100-80gb=cheap"])
def test_bad_price_override_is_an_error(item: str) -> None:
    with pytest.raises(MemplanError, match="must look like GPU=USD_PER_HOUR"):
        parse_price_overrides([item])


@pytest.mark.parametrize("item", ["a100-80gb=-1", "a100-80gb=0", "a100-80gb=nan", "a100-80gb=inf", "a100-80gb=1e6"])
def test_price_out_of_range_names_the_range(item: str) -> None:
    # A well-formed override with an impossible price says what range a price takes, not that the form is wrong.
    with pytest.raises(MemplanError, match=r"a GPU-hour price must be a positive number of USD up to 1,000"):
        parse_price_overrides([item])


def test_price_override_of_an_unknown_gpu_suggests() -> None:
    with pytest.raises(UnknownGPUError, match="did you mean .*a10g"):
        gpu_catalog().with_prices({"a10": 1.0})


# ---- user catalogs ------------------------------------------------------------------------------


def _entry(**over: object) -> dict:
    e = {"key": "x1", "name": "Example X1", "memory_bytes": 10**10, "usable_bytes": 9 * 2**30,
         "bandwidth_bytes_per_s": 10**12, "bf16_tflops": 100}
    e.update(over)
    return e


def _write(tmp_path: Path, raw: object) -> Path:
    p = tmp_path / "gpus.json"
    p.write_text(json.dumps(raw) if not isinstance(raw, str) else raw)
    return p


def test_user_catalog_defaults_optional_fields(tmp_path: Path) -> None:
    cat = load_gpu_catalog(_write(tmp_path, {"gpus": [_entry()]}))
    g = cat.get("x1")
    assert (g.pcie_gen, g.usd_per_hour, g.price_provider, g.price_date) == (4, 0.0, "", "")
    assert cat.storage_usd_per_gb_month == 0.023 and cat.source.endswith("gpus.json")
    assert cat.gpus_per_node == gpu_catalog().gpus_per_node  # the built-in catalog's node


def test_the_node_size_is_data_with_its_source_and_setups_resolve_to_it(tmp_path: Path) -> None:
    """An 8-GPU server: REFERENCE.md prices AWS p4d/p4de/p5/p5en/p6-b200 per instance / 8."""
    raw = json.loads((Path(__file__).resolve().parents[2] / "data" / "gpus.json").read_text())
    assert raw["gpus_per_node"] == 8 and "/ 8" in raw["gpus_per_node_source"]
    assert gpu_catalog().gpus_per_node == 8
    from memplan.training.setup import Setup

    assert Setup(model="llama2-7b", gpus=32, parallel="fsdp").gpus_per_node == 8
    assert Setup(model="llama2-7b", gpus=4, parallel="fsdp").gpus_per_node == 4  # a node is never bigger than the job
    assert load_gpu_catalog(_write(tmp_path, {"gpus": [_entry()], "gpus_per_node": 4})).gpus_per_node == 4


def test_no_path_is_the_builtin_catalog() -> None:
    assert load_gpu_catalog(None) is gpu_catalog()


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "is not valid JSON"),
        ([], "non-empty 'gpus' list"),
        ({"gpus": []}, "non-empty 'gpus' list"),
        ({"gpus": ["h100"]}, r"gpus\[0\] must be an object"),
        ({"gpus": [{k: v for k, v in _entry().items() if k != "usable_bytes"}]}, r"gpus\[0\] is missing usable_bytes"),
        ({"gpus": [_entry(key=" ")]}, r"gpus\[0\]: GPU ' ': key must be a non-empty string"),
        ({"gpus": [_entry(memory_bytes=-1)]}, r"memory_bytes must be a positive integer"),
        ({"gpus": [_entry(usable_bytes=1.5e10)]}, r"usable_bytes must be a positive integer"),
        ({"gpus": [_entry(pcie_gen=True)]}, r"pcie_gen must be a positive integer"),
        ({"gpus": [_entry(bf16_tflops=0)]}, r"bf16_tflops must be a positive number"),
        ({"gpus": [_entry(usd_per_hour=-2)]}, r"usd_per_hour: a GPU-hour price must be a positive number"),
        ({"gpus": [_entry(), _entry(name="Other")]}, "GPU keys must be unique"),
        ({"gpus": [_entry()], "storage_usd_per_gb_month": "cheap"}, "storage_usd_per_gb_month must be a number of USD per GB-month from 0"),
        ({"gpus": [_entry()], "gpus_per_node": 0}, "gpus_per_node must be a positive integer"),
        ({"gpus": [_entry()], "gpus_per_node": 8.5}, "gpus_per_node must be a positive integer"),
    ],
)
def test_malformed_catalog_is_a_memplan_error(tmp_path: Path, raw: object, message: str) -> None:
    with pytest.raises(MemplanError, match=message):
        load_gpu_catalog(_write(tmp_path, raw))


def test_missing_catalog_file_is_a_memplan_error(tmp_path: Path) -> None:
    with pytest.raises(MemplanError, match="cannot read GPU catalog"):
        load_gpu_catalog(tmp_path / "nope.json")
