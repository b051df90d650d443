"""`memplan plan`: formats, sweeps, launch settings, overrides and one-line errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.paths import data_dir

BASE = ["plan", "--model", "llama2-7b", "--variants", "100", "--gpu", "a10g", "--rps", "5"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_table_puts_the_strategies_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *BASE)
    assert status == 0 and err == ""
    header = next(line for line in out.splitlines() if "full_finetune" in line)
    assert header.split() == ["full_finetune", "lora", "lorax", "vllm_multi_lora"]
    for label in ("GPUs", "$/hour", "$/month", "training, one-time", "storage", "cold start", "adapter swap", "adapters resident"):
        assert any(line.startswith(label) for line in out.splitlines()), label


def test_json_has_the_promised_keys(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *BASE, "--format", "json")
    d = json.loads(out)
    assert status == 0 and set(d["strategies"]) == {"full_finetune", "lora", "lorax", "vllm_multi_lora"}
    for s in d["strategies"].values():
        assert {"gpus", "usd_per_month", "storage_bytes", "training_usd"} <= set(s)
        assert isinstance(s["storage_bytes"], int)
    assert d["assumptions"]["decode_bandwidth_efficiency"]["value"] == 0.6
    assert d["assumptions"]["gpu_usd_per_hour"]["value"] == 1.006


def test_csv_has_one_row_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *BASE, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and [r["strategy"] for r in rows] == ["full_finetune", "lora", "lorax", "vllm_multi_lora"]


def test_sweep_prints_the_table_over_n_and_the_crossovers(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "plan", "--model", "llama2-7b", "--gpu", "a10g", "--rps", "5", "--sweep-variants", "1,10,100,1000,10000")
    assert status == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:6]] == ["1", "10", "100", "1,000", "10,000"]
    assert any(line.startswith("crossover: lorax is cheaper than full_finetune") for line in lines)
    status, out, _ = run(capsys, "plan", "--model", "llama2-7b", "--gpu", "a10g", "--rps", "5", "--sweep-variants", "1,100", "-f", "json")
    d = json.loads(out)
    assert d["variants"] == [1, 100] and d["crossovers"] and "assumptions" in d


def test_emit_lorax_launcher_flags(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *BASE, "--emit", "lorax")
    assert status == 0 and "lorax-launcher" in out
    for flag in ("--adapter-memory-fraction 0.1", "--max-active-adapters 100", "--max-batch-total-tokens", "--model-id meta-llama/Llama-2-7b-hf"):
        assert flag in out
    status, out, _ = run(capsys, *BASE, "--emit", "lorax", "--quant", "nf4", "-f", "json")
    assert json.loads(out)["flags"]["--quantize"] == "bitsandbytes-nf4"


def test_emit_vllm_serve_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *BASE, "--emit", "vllm", "-f", "json")
    d = json.loads(out)
    assert status == 0 and d["argv"][:3] == ["vllm", "serve", "meta-llama/Llama-2-7b-hf"]
    flags = d["flags"]
    assert "--enable-lora" in flags and flags["--max-lora-rank"] == "8" and flags["--max-model-len"] == "1152"
    assert int(flags["--max-cpu-loras"]) >= int(flags["--max-loras"]) >= 1
    assert flags["--gpu-memory-utilization"] == "0.9"


def test_price_override_and_storage_price(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, *BASE, "--price", "a10g=2", "--storage-price", "0", "-f", "json")
    d = json.loads(out)
    for s in d["strategies"].values():
        assert s["usd_per_hour"] == pytest.approx(2.0 * s["gpus"])
        assert s["storage_usd_per_month"] == 0
    assert d["assumptions"]["gpu_usd_per_hour"] == {"value": 2.0, "unit": "USD per a10g-hour", "source": "user override"}


def test_set_overrides_an_assumption(capsys: pytest.CaptureFixture[str]) -> None:
    _, base, _ = run(capsys, *BASE, "-f", "json")
    _, fast, _ = run(capsys, *BASE, "-f", "json", "--set", "decode_bandwidth_efficiency=0.9")
    b, f = json.loads(base), json.loads(fast)
    assert f["assumptions"]["decode_bandwidth_efficiency"] == {"value": 0.9, "unit": "fraction of datasheet memory bandwidth",
                                                               "source": "user override"}
    assert f["strategies"]["lorax"]["replica"]["requests_per_s"] > b["strategies"]["lorax"]["replica"]["requests_per_s"]


def test_own_gpu_catalog(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    raw = json.loads((data_dir() / "gpus.json").read_text())
    raw["gpus"] = [dict(g, usd_per_hour=9.0) for g in raw["gpus"] if g["key"] == "a10g"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    status, out, _ = run(capsys, *BASE, "--gpu-catalog", str(path), "-f", "json")
    assert status == 0 and json.loads(out)["assumptions"]["gpu_usd_per_hour"]["value"] == 9.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "0"], "--variants must be a positive integer"),
        (["--variants", "-5"], "--variants must be a positive integer"),
        (["--rps", "0"], "--rps must be a positive number"),
        (["--rps", "-2"], "--rps must be a positive number"),
        (["--gpu", "a100"], "unknown GPU 'a100'; did you mean"),
        (["--price", "a10g=cheap"], "--price 'a10g=cheap' must look like GPU=USD_PER_HOUR"),
        (["--price", "a10g"], "must look like GPU=USD_PER_HOUR"),
        (["--set", "mfu=0.4"], "unknown assumption 'mfu'"),
        (["--set", "training_mfu"], "--set 'training_mfu' must look like NAME=VALUE"),
        (["--sweep-variants", "1,0"], "--sweep-variants must be positive integers"),
        (["--max-cpu-loras", "2", "--max-loras", "4"], "--max-cpu-loras (2) must be at least --max-loras (4)"),
        (["--max-lora-rank", "4", "--lora-rank", "8"], "--max-lora-rank (4) must hold --lora-rank (8)"),
        (["--utilization", "0"], "--utilization must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    argv = list(BASE)
    for i in range(0, len(args), 2):
        flag = args[i]
        if flag in argv:
            argv[argv.index(flag) + 1] = args[i + 1]
        else:
            argv += args[i:i + 2]
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("memplan: error: ") and message in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"gpus": []}', "non-empty 'gpus' list"),
        ('{"gpus": [{"key": "a10g"}]}', "is missing"),
        ('{"storage_usd_per_gb_month": "free", "gpus": [{"key": "a10g", "name": "A10G", "memory_bytes": 1, '
         '"usable_bytes": 24000000000, "bandwidth_bytes_per_s": 600000000000, "bf16_tflops": 70}]}', "storage_usd_per_gb_month must be a number of USD per GB-month from 0"),
        ('{"gpus": [{"key": "a10g", "name": "A10G", "memory_bytes": 1, "usable_bytes": 24000000000, '
         '"bandwidth_bytes_per_s": 600000000000, "bf16_tflops": "fast"}]}', "bf16_tflops must be a positive number"),
    ],
)
def test_malformed_catalog_file_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           content: str, message: str) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(content)
    status, out, err = run(capsys, *BASE, "--gpu-catalog", str(path))
    assert status == 2 and out == "" and err.count("\n") == 1 and message in err


# ---- the plan picks the hardware; vLLM multi-LoRA is a strategy of its own ------------------------------

NO_GPU = ["plan", "--model", "llama2-7b", "--variants", "100", "--rps", "5"]


def test_without_gpu_every_strategy_is_on_its_cheapest_catalog_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *NO_GPU)
    assert status == 0 and err == ""
    header = next(line for line in out.splitlines() if "full_finetune" in line)
    assert header.split() == ["full_finetune", "lora", "lorax", "vllm_multi_lora"]
    assert any(line.startswith("runner-up") for line in out.splitlines())
    status, out, _ = run(capsys, *NO_GPU, "--format", "json")
    d = json.loads(out)
    catalog = json.loads((data_dir() / "gpus.json").read_text())["gpus"]
    for name, choice in d["choices"].items():
        # Every catalog GPU at every tensor-parallel degree vLLM and LoRAX take (1, 2, 4, 8) is listed,
        # priced or with the reason it cannot serve.
        assert {(c["gpu"], c["tp"]) for c in choice["candidates"]} == {(g["key"], tp) for g in catalog for tp in (1, 2, 4, 8)}
        priced = [c for c in choice["candidates"] if "reason" not in c]
        assert all(c["reason"] for c in choice["candidates"] if "usd_per_month" not in c)
        cheapest = min(c["usd_per_month"] for c in priced)
        assert choice["chosen"]["usd_per_month"] == cheapest == d["strategies"][name]["usd_per_month"]
        assert d["strategies"][name]["gpu"] == choice["chosen"]["gpu"]
        assert choice["runner_up"]["usd_per_month"] >= cheapest


def test_repeated_gpu_restricts_the_choice(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *NO_GPU, "--gpu", "a10g", "--gpu", "h100", "--format", "json")
    d = json.loads(out)
    assert status == 0
    for choice in d["choices"].values():
        assert {c["gpu"] for c in choice["candidates"]} == {"a10g", "h100"}
    assert {"gpu_usd_per_hour[a10g]", "gpu_usd_per_hour[h100]"} <= set(d["assumptions"])


def test_one_gpu_lists_no_choices(capsys: pytest.CaptureFixture[str]) -> None:
    # One --gpu keeps the output of a single-GPU plan: no 'choices', no per-strategy 'gpu'.
    status, out, _ = run(capsys, *BASE, "--format", "json")
    d = json.loads(out)
    assert status == 0 and "choices" not in d and "gpu" not in d["strategies"]["lorax"]


def test_engine_flag_is_deprecated_and_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *BASE, "--engine", "vllm")
    assert status == 0 and "--engine is deprecated" in err and "vllm_multi_lora" in out


def test_emit_vllm_uses_the_given_slots_rounded_to_vllms_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *BASE, "--emit", "vllm", "--max-loras", "4", "--max-lora-rank", "12",
                         "--max-cpu-loras", "20", "--format", "json")
    flags = json.loads(out)["flags"]
    # vllm/config/lora.py: max_lora_rank must be one of 8, 16, 32, ...: 12 becomes 16.
    assert status == 0 and (flags["--max-loras"], flags["--max-lora-rank"], flags["--max-cpu-loras"]) == ("4", "16", "20")
