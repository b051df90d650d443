"""Bad input never ends in a traceback (issue 15, "What a capacity planner expects").

One table of (argv, exit status, message fragment) over every command: malformed,
hostile, impossible and huge inputs. Each row runs in-process through
`memplan.cli.main` and must exit with status 2, print exactly one line on stderr
that contains the fragment, and no "Traceback". A few rows that need a real stdout
(a full disk, a closed pipe) or a hidden torch run in a subprocess.

Placeholders in argv: {tmp} is a folder of fixtures built once (`fixtures` below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.cli import main

PLAN = ["plan", "-m", "llama2-7b", "-g", "a10g", "-n", "10", "--rps", "1"]  # click keeps a flag's last value
EST = ["estimate", "-m", "llama2-7b"]
FIT = ["fit", "-m", "llama2-7b"]
SWEEP = ["sweep", "-m", "llama2-7b"]
UNWRITABLE = "/proc/memplan-out"  # /proc takes no new files, even for root

ROWS: list[tuple[list[str], int, str]] = [
    # ---- unknown names, with a close match -------------------------------------------------
    ([*EST[:2], "llama2-7bb"], 2, "did you mean llama2-7b"),
    (["estimate", "-m", "mistral7b"], 2, "did you mean"),
    (["estimate", "-m", "zzzzzzzzzzz"], 2, "run `memplan models`"),
    (["estimate", "-m", ""], 2, "--model is empty"),
    (["estimate", "-m", "   "], 2, "--model is empty"),
    ([*EST, "--gpu", "a100"], 2, "did you mean"),
    ([*EST, "--gpu", "tpu-v5"], 2, "unknown GPU 'tpu-v5'"),
    ([*PLAN, "-g", "a10"], 2, "unknown GPU 'a10'"),
    ([*PLAN, "-m", "llama2-7bb"], 2, "did you mean llama2-7b"),
    (["nosuchcommand"], 2, "No such command"),
    (["estimate", "--no-such-flag"], 2, "No such option"),
    # ---- model paths: malformed config, a folder, a device, a binary file ------------------
    (["estimate", "-m", "/dev/null"], 2, "not a regular file"),
    (["plan", "-m", "/dev/null", "-g", "a10g", "-n", "1", "--rps", "1"], 2, "not a regular file"),
    (["estimate", "-m", "{tmp}/empty"], 2, "a folder without a config.json"),
    (["estimate", "-m", "{tmp}/bad.json"], 2, "is not valid JSON"),
    (["estimate", "-m", "{tmp}/binary.json"], 2, "not UTF-8"),
    (["estimate", "-m", "{tmp}/list.json"], 2, "config"),
    (["estimate", "-m", "{tmp}/unknown_type.json"], 2, "model_type"),
    (["estimate", "-m", "{tmp}/no_layers.json"], 2, "config"),
    (["estimate", "-m", "{tmp}/huge.json"], 2, "a config.json is at most"),
    # ---- parallel layouts the libraries refuse (memplan.training.parallel.check_layout) -----
    ([*EST, "--gpus", "2"], 2, "needs a layout"),
    ([*EST, "--gpus", "0"], 2, "--gpus must be a whole number"),
    ([*EST, "--gpus", "12", "--gpus-per-node", "8", "--parallel", "fsdp"], 2, "not a whole number of nodes"),
    ([*EST, "--gpus", "2", "--parallel", "tp"], 2, "--parallel must be one of"),
    ([*EST, "--gpus", "2", "--parallel", "ddp", "--fsdp-version", "2"], 2, "--fsdp-version applies to"),
    ([*EST, "--gpus", "2", "--parallel", "fsdp", "--fsdp-version", "3"], 2, "--fsdp-version must be 1 or 2"),
    ([*EST, "--gpus", "2", "--parallel", "ddp", "--offload", "optimizer"], 2, "--offload needs --parallel"),
    ([*EST, "--gpus", "2", "--parallel", "fsdp", "--offload", "optimizer"], 2, "FSDP offloads parameters and optimizer together"),
    ([*EST, "--gpus", "2", "--parallel", "zero2", "--offload", "params_and_optimizer"], 2, "offloads parameters only at stage 3"),
    ([*EST, "--device", "cpu", "--gpus", "2", "--parallel", "fsdp", "--quant", "bf16", "--offload", "params_and_optimizer"], 2, "no GPU to offload from"),
    ([*EST, "--quant-storage", "bf16"], 2, "nf4/fp4 only"),
    ([*EST, "-q", "nf4", "--gpus", "2", "--parallel", "fsdp"], 2, "cannot flatten a uint8 4-bit base"),
    ([*EST, "-q", "nf4", "--gpus", "2", "--parallel", "zero3", "--quant-storage", "fp16"], 2, "must equal --compute-dtype"),
    ([*EST, "-q", "int8", "--gpus", "2", "--parallel", "fsdp"], 2, "cannot shard bitsandbytes int8"),
    ([*EST, "-q", "nf4", "--quant-storage", "bf16", "--gpus", "2", "--parallel", "fsdp_shard_grad_op"], 2,
     "FSDP1 SHARD_GRAD_OP cannot train a 4-bit base"),
    ([*EST, "--gpus", "2", "--parallel", "zero2", "--optimizer", "adamw_8bit"], 2, "not modelled under DeepSpeed ZeRO"),
    # ---- choices ---------------------------------------------------------------------------
    ([*EST, "-q", "int9"], 2, "--quant must be one of"),
    ([*EST, "--method", "qlora"], 2, "--method must be one of"),
    ([*EST, "--optimizer", "adam"], 2, "--optimizer must be one of"),
    ([*EST, "--attention", "flash2"], 2, "--attention must be one of"),
    ([*EST, "--device", "tpu"], 2, "--device must be one of"),
    ([*EST, "--autocast", "int8"], 2, "--autocast must be one of"),
    ([*EST, "--compute-dtype", "int8"], 2, "--compute-dtype must be one of"),
    ([*EST, "-f", "yaml"], 2, "Invalid value for '--format'"),
    ([*PLAN, "--popularity", "pareto"], 2, "Invalid value for '--popularity'"),
    ([*PLAN, "--engine", "tgi"], 2, "Invalid value for '--engine'"),
    ([*PLAN, "-q", "int9"], 2, "--quant must be one of"),
    ([*PLAN, "--train-quant", "int9"], 2, "--train-quant must be one of"),
    ([*EST, "--lora-targets", ","], 2, "lora"),
    ([*EST, "--lora-targets", "no_such_proj"], 2, "no_such_proj"),
    # ---- contradictions, grammar -----------------------------------------------------------
    ([*EST, "--method", "full", "-q", "int8"], 2, "cannot train an int8 base"),
    ([*EST, "--method", "full", "-q", "nf4"], 2, "cannot train an nf4 base"),
    ([*EST, "--double-quant", "-q", "bf16"], 2, "--double-quant only applies to nf4/fp4"),
    ([*EST, "--autocast", "bf16"], 2, "a bf16 model already computes in bf16"),
    ([*EST, "--autocast", "bf16", "-q", "fp16"], 2, "an fp16 model already computes"),
    ([*EST, "--prepare-kbit-training"], 2, "--prepare-kbit-training only applies"),
    ([*EST, "--device", "cpu", "--attention", "flash"], 2, "--attention flash needs --device cuda"),
    ([*EST, "--device", "cpu", "--gpu", "a10g"], 2, "--gpu checks the fit on a CUDA GPU"),
    ([*FIT, "--device", "cpu"], 2, "memplan fit plans GPUs"),
    ([*PLAN, "--emit", "lorax", "--sweep-variants", "1,10"], 2, "--emit needs one plan"),
    (["plan", "-m", "llama2-7b", "-g", "a10g", "--rps", "1"], 2, "give --variants N"),
    # ---- setup numbers: zero, negative, nan, inf, huge, impossible -------------------------
    *[([*EST, flag, v], 2, frag) for flag, frag in (("-r", "--lora-rank"), ("-s", "--seq-len"), ("-b", "--batch-size"))
      for v in ("0", "-1", "1e30", "nan", "inf", "1.5", "abc")],
    ([*EST, "-r", "70000"], 2, "--lora-rank 70000 is larger than 65,536"),
    ([*EST, "-s", "99999999999"], 2, "--seq-len 99999999999 is larger than"),
    ([*EST, "-b", "99999999999"], 2, "--batch-size 99999999999 is larger than"),
    (["estimate", "-m", "gpt2", "-s", "4096"], 2, "exceeds gpt2's 1024 learned positions"),
    *[([*EST, "--lora-dropout", v], 2, "--lora-dropout must be in [0, 1)") for v in ("-0.1", "1", "1.5", "nan", "inf", "-inf")],
    ([*EST, "--lora-dropout", "x"], 2, "Invalid value for '--lora-dropout'"),
    # ---- plan numbers ----------------------------------------------------------------------
    ([*PLAN, "--rps", "1e30"], 2, "--rps must be a positive number up to 1,000,000"),
    *[([*PLAN, "--rps", v], 2, "--rps must be a positive number") for v in ("0", "-1", "nan", "inf", "-inf")],
    *[([*PLAN, "-n", v], 2, "--variants must be a positive integer") for v in ("0", "-5", "99999999999")],
    ([*PLAN, "-n", "1.5"], 2, "Invalid value for '--variants'"),
    *[([*PLAN, "--prompt-tokens", v], 2, "--prompt-tokens must be a positive integer") for v in ("0", "-1", "100000000000")],
    *[([*PLAN, "--output-tokens", v], 2, "--output-tokens must be a positive integer") for v in ("0", "-1", "100000000000")],
    *[([*PLAN, "--utilization", v], 2, "--utilization must be in (0, 1]") for v in ("0", "-0.5", "1.01", "nan", "inf")],
    *[([*PLAN, "--popularity", "zipf", "--zipf-exponent", v], 2, "--zipf-exponent must be a positive number")
      for v in ("0", "-1", "nan", "inf", "1e9")],
    *[([*PLAN, "--dataset-tokens", v], 2, "--dataset-tokens must be a positive integer") for v in ("0", "-1", "10000000000000000")],
    *[([*PLAN, "--epochs", v], 2, "--epochs must be a positive number") for v in ("0", "-1", "nan", "inf", "1e9")],
    *[([*PLAN, "-r", v], 2, "--lora-rank must be a positive integer") for v in ("0", "-1", "99999999")],
    ([*PLAN, "--sweep-variants", "1,0"], 2, "--sweep-variants must be positive integers"),
    ([*PLAN, "--sweep-variants", "a,b"], 2, "--sweep-variants"),
    ([*PLAN, "--sweep-variants", ","], 2, "--sweep-variants is empty"),
    # ---- prices ----------------------------------------------------------------------------
    ([*PLAN, "--price", "a10g=0"], 2, "a GPU-hour price must be a positive number"),
    ([*PLAN, "--price", "a10g=-1"], 2, "a GPU-hour price must be a positive number"),
    ([*PLAN, "--price", "a10g=nan"], 2, "a GPU-hour price must be a positive number"),
    ([*PLAN, "--price", "a10g=inf"], 2, "a GPU-hour price must be a positive number"),
    ([*PLAN, "--price", "a10g=5000"], 2, "up to 1,000"),
    ([*PLAN, "--price", "a10g=cheap"], 2, "must look like GPU=USD_PER_HOUR"),
    ([*PLAN, "--price", "a10g"], 2, "must look like GPU=USD_PER_HOUR"),
    ([*PLAN, "--price", "=1"], 2, "must look like GPU=USD_PER_HOUR"),
    ([*PLAN, "--price", "tpu=1"], 2, "unknown GPU 'tpu'"),
    *[([*PLAN, "--storage-price", v], 2, "--storage-price must be a number of USD per GB-month")
      for v in ("-1", "nan", "inf", "1e9")],
    # ---- --set -----------------------------------------------------------------------------
    ([*PLAN, "--set", "train_optimizer=adam"], 2, "train_optimizer must be one of"),
    ([*PLAN, "--set", "mfu=0.4"], 2, "unknown assumption 'mfu'"),
    ([*PLAN, "--set", "training_mfu"], 2, "must look like NAME=VALUE"),
    ([*PLAN, "--set", "training_mfu=0"], 2, "--set training_mfu=0: training_mfu must be in (0, 1]"),
    ([*PLAN, "--set", "training_mfu=2"], 2, "training_mfu must be in (0, 1]"),
    ([*PLAN, "--set", "training_mfu=nan"], 2, "training_mfu must be a number"),
    ([*PLAN, "--set", "hours_per_month=1e9"], 2, "hours_per_month"),
    ([*PLAN, "--set", "hours_per_month=-1"], 2, "hours_per_month must be positive"),
    ([*PLAN, "--set", "kv_block_tokens=1.5"], 2, "kv_block_tokens must be an integer"),
    ([*PLAN, "--set", "train_grad_checkpointing=maybe"], 2, "train_grad_checkpointing must be true or false"),
    ([*PLAN, "--set", "checkpoint_dtype=int3"], 2, "checkpoint_dtype must be one of"),
    ([*PLAN, "--set", "cuda_context_bytes=-1"], 2, "cuda_context_bytes must be >= 0"),
    # ---- GPU catalog files -----------------------------------------------------------------
    ([*PLAN, "--gpu-catalog", "{tmp}/missing.json"], 2, "cannot read GPU catalog"),
    ([*PLAN, "--gpu-catalog", "{tmp}/bad.json"], 2, "is not valid JSON"),
    ([*PLAN, "--gpu-catalog", "{tmp}/list.json"], 2, "a GPU catalog is a JSON object"),
    ([*PLAN, "--gpu-catalog", "{tmp}/empty"], 2, "is a directory"),
    # ---- output paths: unwritable, a folder, a missing folder, wrong extension -------------
    ([*SWEEP, "--out", UNWRITABLE + ".csv"], 2, "cannot be written"),
    ([*SWEEP, "--out", UNWRITABLE + ".parquet"], 2, "cannot be written"),
    ([*SWEEP, "--out", UNWRITABLE + ".xlsx"], 2, "cannot be written"),
    ([*SWEEP, "--out", "/proc/sweep.csv"], 2, "cannot be written"),
    ([*SWEEP, "--out", "{tmp}/nofolder/s.csv"], 2, "does not exist"),
    ([*SWEEP, "--out", "{tmp}/s.txt"], 2, "write .csv, .parquet or .xlsx"),
    ([*SWEEP, "--out", "{tmp}/adir.csv"], 2, "is a directory"),
    (["report", "-m", "llama2-7b", "--out", UNWRITABLE + ".html"], 2, "cannot be written"),
    (["report", "-m", "llama2-7b", "--out", "{tmp}/nofolder/r.html"], 2, "does not exist"),
    (["report", "-m", "llama2-7b", "--out", "{tmp}/r.txt"], 2, "name it .html"),
    (["report", "-m", "llama2-7b", "--out", "{tmp}/adir.html"], 2, "is a directory"),
    (["report", "-m", "llama2-7b", "--out", "{tmp}/r.html", "--profiles", "{tmp}/bad.jsonl"], 2, "is not a valid profile record"),
    (["profile", "-m", "gpt2", "--device", "cpu", "--layers", "1", "--out", UNWRITABLE + ".jsonl"], 2, "cannot be written"),
    (["profile", "-m", "gpt2", "--device", "cpu", "--layers", "1", "--out", "{tmp}/adir.html"], 2, "is a directory"),
    (["calibrate", "--terms", UNWRITABLE + ".json"], 2, "--terms"),
    (["calibrate", "--terms", "{tmp}/adir.html"], 2, "is a directory"),
    # ---- grids: empty, everything refused, malformed ---------------------------------------
    ([*SWEEP, "--method", "full", "-q", "nf4"], 2, "refused the only combination of the grid"),
    (["sweep", "-m", "gpt2", "-s", "4096,8192"], 2, "refused all 2 combinations of the grid"),
    (["report", "-m", "llama2-7b", "--method", "full", "-q", "nf4", "--out", "{tmp}/refused.html"], 2, "refused the only combination"),
    (["sweep"], 2, "give a grid"),
    (["report", "--out", "{tmp}/r.html"], 2, "give a grid"),
    (["sweep", "--grid", "{tmp}/missing.yaml"], 2, "missing.yaml"),
    (["sweep", "--grid", "{tmp}/bad_grid.yaml"], 2, "bad_grid.yaml"),
    (["sweep", "--grid", "{tmp}/empty_grid.yaml"], 2, "grid"),
    (["sweep", "--grid", "{tmp}/empty"], 2, "is a directory"),
    ([*SWEEP, "-s", "0"], 2, "seq_len"),
    ([*SWEEP, "-s", "abc"], 2, "--seq-len: 'abc' is not an integer"),
    ([*SWEEP, "--rps", "nan", "--variants", "10", "--serve-gpu", "a10g"], 2, "rps"),
    ([*SWEEP, "--grad-checkpointing", "maybe"], 2, "--grad-checkpointing: 'maybe' is not true or false"),
    ([*SWEEP, "-q", "int9"], 2, "int9"),
    ([*SWEEP, "-g", "tpu"], 2, "tpu"),
    (["profile"], 2, "give --model"),
    (["profile", "-m", "gpt2", "--device", "cpu", "--method", "full", "-q", "nf4"], 2, "no valid setup in the grid"),
    (["profile", "-m", "gpt2", "--device", "cpu", "--device", "cuda", "--dry-run"], 2, "one --device per campaign"),
    (["profile", "-m", "gpt2", "--device", "cpu", "--steps", "0"], 2, "Invalid value for '--steps'"),
    # ---- profile records: none, malformed ---------------------------------------------------
    (["validate", "{tmp}/empty"], 2, "no profile records in {tmp}/empty"),
    (["calibrate", "--profiles", "{tmp}/empty", "--no-write"], 2, "no profile records in {tmp}/empty"),
    (["validate", "{tmp}/empty.jsonl"], 2, "no profile records in {tmp}/empty.jsonl"),
    (["validate", "{tmp}/bad.jsonl"], 2, "line 1 is not a valid profile record"),
    (["validate", "{tmp}/binary.json"], 2, "not UTF-8"),
    (["calibrate", "--profiles", "{tmp}/bad.jsonl", "--no-write"], 2, "line 1 is not a valid profile record"),
    (["calibrate", "--profiles", "{tmp}/missing.jsonl", "--no-write"], 2, "no profile records at"),
    (["validate", "{tmp}/missing.jsonl"], 2, "does not exist"),
    (["validate", "--model", "no-such-model"], 2, "no profile record matches --model no-such-model"),
    (["validate", "--random", "0"], 2, "Invalid value for '--random'"),
    (["app", "--port", "0"], 2, "Invalid value for '--port'"),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    (tmp / "empty").mkdir()
    (tmp / "adir.csv").mkdir()
    (tmp / "adir.html").mkdir()
    (tmp / "bad.json").write_text("{not json", encoding="utf-8")
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00\x01" * 64)
    (tmp / "list.json").write_text("[1, 2, 3]", encoding="utf-8")
    (tmp / "unknown_type.json").write_text(json.dumps({"model_type": "no-such-family", "hidden_size": 64}), encoding="utf-8")
    (tmp / "no_layers.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}), encoding="utf-8")
    (tmp / "huge.json").write_text("{" + " " * 20_000_000 + "}", encoding="utf-8")
    (tmp / "bad.jsonl").write_text('{"not": "a record"}\n', encoding="utf-8")
    (tmp / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp / "bad_grid.yaml").write_text("model: [llama2-7b\nquant: {", encoding="utf-8")
    (tmp / "empty_grid.yaml").write_text("", encoding="utf-8")
    return tmp


def _argv(argv: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in argv]


def _check_one_line(status: int, err: str, expected: int, fragment: str) -> None:
    assert "Traceback" not in err
    assert status == expected, err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line on stderr: {err!r}"
    assert err.startswith("memplan: error: "), err
    assert fragment in err, err


@pytest.mark.parametrize(("argv", "expected", "fragment"), ROWS, ids=[" ".join(r[0])[:80] for r in ROWS])
def test_bad_input_is_one_line_and_status_2(argv: list[str], expected: int, fragment: str, fixtures: Path,
                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(fixtures / "empty")  # nothing lands in the checkout; ./profiles/ does not exist
    before = sorted(p.name for p in fixtures.iterdir())
    status = main(_argv(argv, fixtures))
    out, err = capsys.readouterr()
    _check_one_line(status, err, expected, fragment.replace("{tmp}", str(fixtures)))
    assert sorted(p.name for p in fixtures.iterdir()) == before  # a refused command writes nothing
    assert list((fixtures / "empty").iterdir()) == []


def test_the_table_is_broad() -> None:
    assert len(ROWS) >= 100


def test_profile_without_torch_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import memplan.measure.profiler.device as device

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(device, "missing_profile_libraries", lambda: ["torch"])
    status = main(["profile", "-m", "gpt2", "--device", "cpu", "--layers", "1", "--steps", "1"])
    _check_one_line(status, capsys.readouterr().err, 2, "install the profile extra: pip install 'memplan[profile]'")
    assert list(tmp_path.iterdir()) == []  # no ./profiles/, no error record


def _subprocess(code_or_args: list[str], *, stdout: object = subprocess.PIPE, cwd: Path | None = None,
                prelude: str = "") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = f"import sys; {prelude}from memplan.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", run, *code_or_args], stdout=stdout, stderr=subprocess.PIPE,
                          cwd=cwd, env=env, timeout=120)


def test_profile_with_torch_hidden_in_a_subprocess(tmp_path: Path) -> None:
    # sys.modules[name] = None makes `import torch` fail and importlib.util.find_spec return None.
    hide = "".join(f"sys.modules[{m!r}] = None; " for m in ("torch", "transformers", "peft"))
    proc = _subprocess(["profile", "-m", "gpt2", "--device", "cpu", "--layers", "1", "--steps", "1"], cwd=tmp_path, prelude=hide)
    err = proc.stderr.decode()
    _check_one_line(proc.returncode, err, 2, "install the profile extra: pip install 'memplan[profile]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["estimate", "-m", "llama2-7b"], ["models"], ["plan", *PLAN[1:], "--format", "json"]])
def test_a_full_disk_on_stdout_is_one_line(argv: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        proc = _subprocess(argv, stdout=full)
    _check_one_line(proc.returncode, proc.stderr.decode(), 2, "No space left on device")


def test_a_closed_pipe_on_stdout_is_one_line() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader went away before memplan wrote a byte
    try:
        proc = _subprocess(["models"], stdout=write)
    finally:
        os.close(write)
    _check_one_line(proc.returncode, proc.stderr.decode(), 2, "closed it early")
