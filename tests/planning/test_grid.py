"""Grid files and grid arguments (`memplan.planning.grid`): a bad grid is refused with one line
naming the key or value, exit status 2, before any estimate runs."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.planning.grid import MAX_SETUPS, SETUP_KEYS, GridError, load_grid, parse_grid, values_from_text
from memplan.planning.sweep import sweep


@pytest.fixture
def no_estimates(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fail the test if any estimate runs; the list collects attempted calls."""
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError("an estimate ran before the grid was checked")

    monkeypatch.setattr(importlib.import_module("memplan.training.estimate"), "estimate", refuse)
    return calls


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BAD_GRIDS = [
    ("model: llama2-7b\nquantization: nf4\n", ["unknown key 'quantization'", "did you mean quant,"]),
    ("model: llama2-7b\nseq-len: 512\n", ["unknown key 'seq-len'", "did you mean seq_len?"]),
    ("model: llama2-7b\nquant: []\n", ["quant is an empty list"]),
    ("model: []\n", ["model is an empty list"]),
    ("model: llama2-7b\nseq_len: long\n", ["seq_len must be an integer, got 'long' (str)"]),
    ("model: llama2-7b\nseq_len: [512, 1024.5]\n", ["seq_len[1] must be an integer, got 1024.5 (float)"]),
    ("model: llama2-7b\nbatch_size: true\n", ["batch_size must be an integer, got True (bool)"]),
    ("model: llama2-7b\ngrad_checkpointing: maybe\n", ["grad_checkpointing must be true or false, got 'maybe' (str)"]),
    ("model: llama2-7b\nquant: nf5\n", ["quant 'nf5' is not one of", "did you mean nf4?"]),
    ("model: llama2-7b\nquant: [bf16, nf5]\n", ["quant[1] 'nf5' is not one of"]),
    ("model: llama2-7b\noptimizer: adam\n", ["optimizer 'adam' is not one of", "did you mean adamw?"]),
    ("model: llama2-7b\nseq_len: 0\n", ["seq_len: --seq-len must be a positive integer, got 0"]),
    ("model: llama2-7b\nlora_dropout: 1.5\n", ["lora_dropout: --lora-dropout must be in [0, 1), got 1.5"]),
    ("model: [llama2-7b, llama9-7b]\n", ["model: unknown model 'llama9-7b'"]),
    ("model: llama2-7b\ngpu: [a10g, a11g]\n", ["gpu: unknown GPU 'a11g'", "a10g"]),
    ("model: llama2-7b\nlora_targets: q_prj\n", ["lora_targets 'q_prj'", "not a linear module of llama2-7b"]),
    ("model: llama2-7b\nquant: {a: b}\n", ["quant must be a value or a list of values, got a mapping"]),
    ("quant: nf4\n", ["needs a 'model' key"]),
    ("model: llama2-7b\nvariants: [1, 10]\n", ["variants, rps, serve_gpu together", "add rps, serve_gpu"]),
    ("model: llama2-7b\nvariants: 10\nrps: -1\nserve_gpu: a10g\n", ["rps: --rps must be a positive number up to 1,000,000, got -1.0"]),
    ("model: llama2-7b\nvariants: 10\nrps: 1\nserve_gpu: a11g\n", ["serve_gpu: unknown GPU 'a11g'"]),
    ("model: llama2-7b\nvariants: 10\nrps: 1\nserve_gpu: a10g\npopularity: pareto\n", ["popularity 'pareto' is not one of uniform, zipf"]),
    ("- model: llama2-7b\n", ["mapping of keys", "got list"]),
    ("model: llama2-7b\nseq_len: [512\n", ["not valid YAML (line"]),
    ("", ["the grid file is empty"]),
]


@pytest.mark.parametrize(("text", "expected"), BAD_GRIDS, ids=[t.replace("\n", " ")[:40] for t, _ in BAD_GRIDS])
def test_bad_grid_file_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_estimates: list[object], text: str, expected: list[str]
) -> None:
    path = write(tmp_path, text)
    out = tmp_path / "sweep.csv"
    status = main(["sweep", "--grid", str(path), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert status == 2
    assert stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"memplan: error: {path}"), err
    for piece in expected:
        assert piece in err, (piece, err)
    assert no_estimates == [] and not out.exists()


def test_report_refuses_a_bad_grid_the_same_way(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_estimates: list[object]) -> None:
    path = write(tmp_path, "model: llama2-7b\nquant: nf5\n")
    out = tmp_path / "report.html"
    assert main(["report", "--grid", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quant 'nf5' is not one of" in err
    assert not out.exists()


def test_grid_too_large_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_estimates: list[object]) -> None:
    seq = list(range(1, 1001))
    batch = list(range(1, 1002))  # 1,001,000 combinations
    path = write(tmp_path, json.dumps({"model": "llama2-7b", "seq_len": seq, "batch_size": batch}), "grid.json")
    assert main(["sweep", "--grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"the grid has 1,001,000 combinations; split it into sweeps of at most {MAX_SETUPS:,}" in err


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("grid.toml", "model = 'x'", "a grid file is .yaml, .yml or .json, not .toml"),
    ("grid.json", '{"model": "llama2-7b",}', "not valid JSON (line 1, column"),
    ("missing.yaml", None, "cannot read grid file"),
])
def test_unreadable_grid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str | None, expected: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert main(["sweep", "--grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_json_and_yaml_give_the_same_grid(tmp_path: Path) -> None:
    raw = {"model": ["llama2-7b", "mistral-7b"], "quant": ["bf16", "nf4"], "lora_rank": [8, 16], "seq_len": 1024,
           "gpu": ["a10g", "H100"], "variants": [1, 10], "rps": 2, "serve_gpu": "a10g"}
    import yaml

    a = load_grid(write(tmp_path, yaml.safe_dump(raw)))
    b = load_grid(write(tmp_path, json.dumps(raw), "grid.json"))
    assert (a.setup, a.gpus, a.fleet) == (b.setup, b.gpus, b.fleet)
    assert a.setup["seq_len"] == (1024,)
    assert a.gpus == ("a10g", "h100")  # catalog keys
    assert a.fleet == {"variants": (1, 10), "rps": (2.0,), "serve_gpu": ("a10g",)}
    assert a.combinations == 2 * 2 * 2 * 2  # models x quants x ranks x variants
    assert a.setup["attention"] == (None,)  # transformers' choice, resolved per model


def test_values_are_deduplicated_and_normalised() -> None:
    g = parse_grid({"model": ["llama2-7b", "llama2-7b"], "quant": ["nf4", "nf4", "bf16"], "optimizer": ["adamw_torch", "adamw"],
                    "attention": [None, "default", "eager"]})
    assert g.setup["model"] == ("llama2-7b",)
    assert g.setup["quant"] == ("nf4", "bf16")
    assert g.setup["optimizer"] == ("adamw",)  # transformers' alias, as Setup accepts it
    assert g.setup["attention"] == (None, "eager")


@pytest.mark.parametrize(("value", "expected"), [
    ("q_proj,v_proj", (("q_proj", "v_proj"),)),
    (["q_proj,v_proj", "all-linear"], (("q_proj", "v_proj"), ("all-linear",))),
    ([["q_proj", "v_proj"], "default"], (("q_proj", "v_proj"), None)),
    (["q_proj", "v_proj"], (("q_proj",), ("v_proj",))),  # a flat list is a list of one-name sets
    (None, (None,)),
])
def test_lora_target_sets(value: object, expected: tuple) -> None:
    assert parse_grid({"model": "llama2-7b", "lora_targets": value}).setup["lora_targets"] == expected


def test_a_target_one_model_lacks_is_left_to_that_model() -> None:
    # c_attn is GPT-2's; llama2-7b has none: the grid is valid, the llama rows are refused per row.
    g = parse_grid({"model": ["llama2-7b", "gpt2"], "lora_targets": "c_attn"})
    assert g.setup["lora_targets"] == (("c_attn",),)


def test_every_setup_field_is_a_grid_key() -> None:
    from dataclasses import fields

    from memplan.training.setup import Setup

    assert SETUP_KEYS == tuple(f.name for f in fields(Setup))


def test_values_from_text() -> None:
    assert values_from_text("seq_len", ["512,1_024", "2048"]) == [512, 1024, 2048]
    assert values_from_text("grad_checkpointing", ["true,no"]) == [True, False]
    assert values_from_text("rps", ["0.5"]) == [0.5]
    assert values_from_text("lora_targets", ["q_proj,v_proj", "all-linear"]) == ["q_proj,v_proj", "all-linear"]
    with pytest.raises(GridError, match=r"--seq-len: '5x' is not an integer"):
        values_from_text("seq_len", ["512,5x"])
    with pytest.raises(GridError, match=r"--double-quant: 'maybe' is not true or false"):
        values_from_text("double_quant", ["maybe"])


def test_flags_replace_the_grid_file_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "model: llama2-7b\nquant: [bf16, int8]\nseq_len: 512\ngpu: a10g\n")
    out = tmp_path / "sweep.csv"
    assert main(["sweep", "--grid", str(path), "--quant", "nf4", "--seq-len", "256,512", "--out", str(out)]) == 0
    import pandas as pd

    frame = pd.read_csv(out)
    assert frame["quant"].tolist() == ["nf4", "nf4"]
    assert frame["seq_len"].tolist() == [256, 512]


def test_flag_errors_name_the_flag(capsys: pytest.CaptureFixture[str], no_estimates: list[object]) -> None:
    assert main(["sweep", "--model", "llama2-7b", "--batch-size", "1,two"]) == 2
    assert capsys.readouterr().err == "memplan: error: --batch-size: 'two' is not an integer\n"
    assert main(["sweep"]) == 2
    assert "give a grid: --grid grid.yaml, --from a trainer config, or flags" in capsys.readouterr().err


def test_python_api_refuses_with_the_same_errors(no_estimates: list[object]) -> None:
    with pytest.raises(GridError, match=r"memplan.sweep\(\): quant\[1\] 'nf5' is not one of .*did you mean nf4\?"):
        sweep(model="llama2-7b", quant=["bf16", "nf5"])
    with pytest.raises(GridError, match=r"fleet_options key 'gpu' is not a fleet option"):
        sweep(model="llama2-7b", variants=1, rps=1, serve_gpu="a10g", fleet_options={"gpu": "a10g"})
    with pytest.raises(GridError, match=r"seq_len is an empty list"):
        sweep(model="llama2-7b", seq_len=[])


def test_example_grid_is_valid() -> None:
    g = load_grid(Path(__file__).resolve().parents[2] / "examples" / "grid.yaml")
    assert g.fleet and len(g.setup["model"]) >= 2 and len(g.gpus) >= 2


# ---- layout keys (issue 13) ----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "fragment"), [
    ({"gpus": 0}, "gpus: --gpus must be a whole number of GPUs"),
    ({"gpus": [2, True]}, "gpus[1] must be an integer"),
    ({"gpus_per_node": -1}, "gpus_per_node: --gpus-per-node must be a positive integer"),
    ({"fsdp_version": 3}, "fsdp_version: --fsdp-version must be 1 or 2"),
    ({"parallel": "zero4"}, "parallel 'zero4' is not one of none, ddp"),
    ({"offload": "gpu"}, "offload 'gpu' is not one of none, optimizer"),
    ({"quant_storage": "int4"}, "quant_storage 'int4' is not one of uint8"),
])
def test_bad_layout_values_are_refused_before_any_work(raw: dict, fragment: str, no_estimates: list[object]) -> None:
    with pytest.raises(GridError, match="^grid: ") as exc:
        parse_grid({"model": "llama2-7b", **raw})
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert no_estimates == []


def test_layout_keys_take_lists_and_flags() -> None:
    g = parse_grid({"model": "llama2-7b", "gpus": [1, 8, 8], "gpus_per_node": [None, 4], "parallel": ["none", "zero3"],
                    "fsdp_version": [1, 2], "offload": "optimizer", "quant_storage": "bf16"})
    assert g.setup["gpus"] == (1, 8) and g.setup["gpus_per_node"] == (None, 4) and g.setup["parallel"] == ("none", "zero3")
    assert g.setup["fsdp_version"] == (1, 2) and g.setup["offload"] == ("optimizer",) and g.setup["quant_storage"] == ("bf16",)
    assert values_from_text("gpus", ["1,8", "1_024"]) == [1, 8, 1024]
    assert values_from_text("parallel", ["fsdp,zero3"]) == ["fsdp", "zero3"]


# ---- --from FILE as the grid's base (issue 14) -----------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_config_base_writes_target_and_module_sets_as_one_value() -> None:
    from memplan.planning.grid import config_base

    base, left_out = config_base({"model": "llama2-7b", "lora_targets": ("q_proj", "v_proj"), "modules_to_save": ("embed_tokens", "lm_head"),
                                  "not_a_field": 1})
    g = parse_grid(base)
    assert g.setup["lora_targets"] == (("q_proj", "v_proj"),) and g.setup["modules_to_save"] == (("embed_tokens", "lm_head"),)
    assert left_out == ["not_a_field"]


def test_sweep_from_a_trainer_config_with_flags_on_top(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    out = tmp_path / "sweep.csv"
    assert main(["sweep", "--from", str(EXAMPLES / "trl-sft-qlora.yaml"), "--seq-len", "256,512", "--gpu", "a10g", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "recipe trl-sft" in err and "ignored (memplan does not model them): dataset_name" in err
    frame = pd.read_csv(out)
    assert frame["seq_len"].tolist() == [256, 512]  # the flag replaced the file's max_length 1024
    assert set(frame["recipe"]) == {"trl-sft"} and set(frame["lora_rank"]) == {16} and set(frame["optimizer"]) == {"paged_adamw_8bit"}


def test_grid_file_keys_replace_the_from_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd

    path = write(tmp_path, "lora_rank: [4, 8]\ngpu: a10g\n")  # no model: the --from file names it
    out = tmp_path / "sweep.csv"
    assert main(["sweep", "--from", str(EXAMPLES / "axolotl-qlora.yaml"), "--grid", str(path), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert frame["lora_rank"].tolist() == [4, 8] and set(frame["recipe"]) == {"axolotl"} and set(frame["seq_len"]) == {4096}
    assert "recipe axolotl" in capsys.readouterr().err
