"""`memplan estimate` and `memplan models`, through `memplan.cli.main` (no subprocess, no torch).

The CLI is a thin layer: its JSON must equal the library's `estimate(Setup(...)).to_dict()`,
and every bad input must end as one line on stderr with exit status 2.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from conftest import TINY_CONFIGS
from memplan.model.catalog import MAX_CONFIG_BYTES, catalog
from memplan.cli import main
from memplan.training.estimate import estimate
from memplan.hardware.gpus import gpu_catalog
from memplan.training.setup import Setup

MEMORY_KEYS = ("weights", "weights_and_adapters", "gradients", "optimizer_states", "activations", "activations_and_logits", "peak")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    status, out, err = run(capsys, "estimate", *args, "--format", "json")
    assert (status, err) == (0, "")
    return json.loads(out)


def test_default_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "estimate", "--model", "llama2-7b", "--quant", "nf4")
    assert (status, err) == (0, "")
    assert out.startswith("llama2-7b (LlamaForCausalLM): 6.74B parameters")
    assert "trainable: 4.19M (4,194,304)" in out  # REFERENCE.md: r=8 on q_proj, v_proj
    for label in ("weights (base)", "optimizer states", "activations", "peak"):
        assert label in out
    assert "GiB" in out


def test_json_fields_are_integers(capsys: pytest.CaptureFixture[str]) -> None:
    payload = run_json(capsys, "--model", "llama2-7b", "--quant", "nf4")
    assert payload["parameters"]["total"] == 6_738_415_616  # REFERENCE.md
    assert payload["parameters"]["trainable"] == 4_194_304
    for key in ("total", "trainable"):
        assert type(payload["parameters"][key]) is int
    for key in MEMORY_KEYS:
        assert type(payload["memory_bytes"][key]) is int and payload["memory_bytes"][key] > 0, key


@pytest.mark.parametrize(
    ("args", "setup"),
    [
        (["--model", "llama2-7b", "--quant", "nf4"], dict(model="llama2-7b", quant="nf4")),
        (
            ["-m", "mistral-7b", "--method", "full", "-q", "bf16", "--optimizer", "adamw_8bit", "-s", "1024", "-b", "2",
             "--grad-checkpointing"],
            dict(model="mistral-7b", method="full", quant="bf16", optimizer="adamw_8bit", seq_len=1024, batch_size=2,
                 grad_checkpointing=True),
        ),
        (
            ["-m", "mixtral-8x7b", "-q", "nf4", "--double-quant", "-r", "4", "--lora-targets", "all-linear",
             "--optimizer", "paged_adamw_8bit"],
            dict(model="mixtral-8x7b", quant="nf4", double_quant=True, lora_rank=4, lora_targets=("all-linear",),
                 optimizer="paged_adamw_8bit"),
        ),
        # transformers picks eager attention for gemma2; the CLI default follows it
        (["-m", "gemma2-9b", "--device", "cpu", "--lora-dropout", "0.1"],
         dict(model="gemma2-9b", device="cpu", attention="eager", lora_dropout=0.1)),
        (["-m", "gpt2", "--method", "full", "-q", "fp32", "--optimizer", "sgd_momentum", "--attention", "eager"],
         dict(model="gpt2", method="full", quant="fp32", optimizer="sgd_momentum", attention="eager")),
    ],
)
def test_json_equals_library(capsys: pytest.CaptureFixture[str], args: list[str], setup: dict) -> None:
    payload = run_json(capsys, *args)
    library = json.loads(json.dumps(estimate(Setup(**setup)).to_dict()))
    for key, value in library.items():
        assert payload[key] == value, key


def test_csv_parses_and_agrees_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model", "llama2-7b", "--quant", "nf4", "--lora-targets", "q_proj,v_proj"]
    status, out, err = run(capsys, "estimate", *args, "--format", "csv")
    assert (status, err) == (0, "")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 1
    payload = run_json(capsys, *args)
    assert int(rows[0]["parameters.total"]) == payload["parameters"]["total"]
    assert rows[0]["setup.lora_targets"] == "q_proj,v_proj"
    for key in MEMORY_KEYS:
        assert int(rows[0][f"memory_bytes.{key}"]) == payload["memory_bytes"][key]


def test_gpu_fit_and_headroom(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "estimate", "--model", "llama2-7b", "--quant", "nf4", "--gpu", "a10g")
    assert (status, err) == (0, "")
    assert "NVIDIA A10G" in out and "headroom" in out and ": fits" in out
    payload = run_json(capsys, "--model", "llama2-7b", "--quant", "nf4", "--gpu", "a10g")
    gpu = payload["gpu"]
    assert gpu["usable_bytes"] == gpu_catalog().get("a10g").usable_bytes
    assert gpu["headroom_bytes"] == gpu["usable_bytes"] - payload["memory_bytes"]["peak"]
    assert gpu["fits"] is True
    big = run_json(capsys, "--model", "llama2-70b", "--method", "full", "--gpu", "a10g")["gpu"]
    assert big["fits"] is False and big["headroom_bytes"] < 0


def test_local_config_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIGS["qwen2"]))
    payload = run_json(capsys, "--model", str(tmp_path), "--device", "cpu", "-r", "4")
    assert payload["parameters"]["total"] == 310_912  # transformers' meta count (test_architectures.py)


def test_models_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "models")
    assert (status, err) == (0, "")
    for entry in catalog():
        assert entry.name in out
    status, out, _ = run(capsys, "models", "--format", "json")
    rows = json.loads(out)
    assert {r["name"] for r in rows} == {e.name for e in catalog()}
    assert next(r for r in rows if r["name"] == "llama2-7b")["parameters"] == 6_738_415_616


# ---- bad input: one line on stderr, exit status 2 -------------------------------------------------------
@pytest.fixture
def bad_configs(tmp_path: Path) -> dict[str, str]:
    files = {
        "malformed": '{"model_type": "llama", "hidden_size": 64,,}',
        "missing": json.dumps({k: v for k, v in TINY_CONFIGS["llama"].items() if k != "num_hidden_layers"}),
        "unsupported": json.dumps({"model_type": "t5", "d_model": 512}),
        "huge": '{"model_type": "llama", "x": "' + "a" * MAX_CONFIG_BYTES + '"}',
        "string_field": json.dumps(dict(TINY_CONFIGS["llama"], hidden_size="72")),
    }
    out = {}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
        out[name] = str(tmp_path / f"{name}.json")
    return out


BAD = [
    (["-m", "llama2-7"], r"unknown model 'llama2-7'.*did you mean llama2-7b"),
    (["-m", "@malformed"], r"not valid JSON \(line 1"),
    (["-m", "@missing"], r"missing field 'num_hidden_layers'"),
    (["-m", "@unsupported"], r"model_type 't5' is not supported; supported: llama, mistral"),
    (["-m", "@huge"], r"at most 1,000,000 bytes"),
    (["-m", "@string_field"], r"field 'hidden_size' must be an integer"),
    (["-m", "llama2-7b", "-r", "0"], r"--lora-rank must be a positive integer, got 0"),
    (["-m", "llama2-7b", "-r", "-4"], r"--lora-rank must be a positive integer"),
    (["-m", "llama2-7b", "-b", "0"], r"--batch-size must be a positive integer"),
    (["-m", "llama2-7b", "-b", "-2"], r"--batch-size must be a positive integer"),
    (["-m", "llama2-7b", "-s", "0"], r"--seq-len must be a positive integer"),
    (["-m", "llama2-7b", "--lora-targets", "q_proj,c_attn"], r"'c_attn' is not a linear module of llama2-7b"),
    (["-m", "llama2-7b", "--lora-targets", " , "], r"--lora-targets is empty"),
    (["-m", "llama2-7b", "--method", "full", "--quant", "nf4"], r"full fine-tuning cannot train an nf4 base"),
    (["-m", "llama2-7b", "--double-quant"], r"--double-quant only applies to nf4/fp4"),
    (["-m", "llama2-7b", "--attention", "flash", "--device", "cpu"], r"--attention flash needs --device cuda"),
    (["-m", "llama2-7b", "--gpu", "a10g", "--device", "cpu"], r"--gpu checks the fit on a CUDA GPU.*drop --gpu or --device cpu"),
    (["-m", "llama2-7b", "--gpu", "a10"], r"unknown GPU 'a10'"),
    (["-m", "llama2-7b", "-r", "8.5"], r"'8.5' is not a valid integer"),
    (["-m", "llama2-7b", "-b", "two"], r"'two' is not a valid integer"),
    (["-m", "llama2-7b", "--quant", "int4"], r"--quant must be one of bf16"),
    (["-m", "llama2-7b", "--optimizer", "adam"], r"--optimizer must be one of"),
    (["-m", "llama2-7b", "--lora-dropout", "1.5"], r"--lora-dropout must be in \[0, 1\)"),
    (["-m", "llama2-7b", "--format", "xml"], r"'xml' is not one of"),
    (["-m", "llama2-7b", "--autocast", "bf16"], r"--autocast bf16 models fp32 master weights; use --quant fp32"),
    (["-m", "llama2-7b", "--quant", "fp32", "--autocast", "fp8"], r"--autocast must be one of none, bf16, fp16"),
    (["-m", "gpt2", "--quant", "fp32", "--autocast", "bf16"], r"--autocast is modelled for llama, mistral, qwen2, phi3.*not gpt2"),
    (["-m", "llama2-7b", "--no-such-flag"], r"No such option.*--no-such-flag"),
    ([], r"Missing option '--model'"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_is_one_line_and_status_2(capsys, bad_configs, args: list[str], message: str) -> None:
    args = [bad_configs[a[1:]] if a.startswith("@") else a for a in args]
    status, out, err = run(capsys, "estimate", *args)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("memplan: error: "), err
    assert re.search(message, err), err


def test_rank_above_a_targets_width_is_estimated_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    # PEFT trains it (lora/layer.py::update_layer checks only r > 0); the note says it adds no capacity.
    status, out, _ = run(capsys, "estimate", "-m", "llama2-7b", "-r", "5000")
    assert status == 0
    assert "rank 5000 exceeds min(in, out) of q_proj (4096×4096): PEFT trains it, but it adds no capacity" in out
    notes = run_json(capsys, "-m", "llama2-7b", "-r", "5000")["notes"]
    assert any(n.startswith("rank 5000 exceeds") for n in notes)
