"""Campaigns: grids, failures that do not stop the campaign, crashes, Ctrl-C, resume,
and the one-line device errors."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.errors import DeviceUnavailableError, ProfileError
from memplan.measure.profiler.campaign import Job, expand_grid, load_grid_file, run_campaign, sample_jobs
from memplan.measure.records import read_records
from memplan.training.setup import Setup


@pytest.fixture()
def tiny_model(tmp_path: Path, tiny_configs: dict) -> str:
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(tiny_configs["llama"]))
    return str(path)


# ---- grids (no subprocess) -----------------------------------------------------------------
def test_grid_file_cross_product_skips_impossible_combinations(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "defaults: {model: llama2-7b, device: cpu, lora_targets: [[q_proj, v_proj], all-linear]}\n"
        "grids:\n"
        "  - {quant: [bf16, nf4], double_quant: [false, true], seq_len: [128, 256]}\n"
        "  - {method: full, quant: bf16, layers: [1, 2]}\n"
    )
    grids = load_grid_file(grid)
    jobs, skipped = expand_grid(grids[0], steps=3)
    # 2 targets x 2 quants x 2 dq x 2 seq = 16, minus bf16 + double quant (4 combinations)
    assert len(jobs) == 12 and len(skipped) == 4
    assert all("--double-quant only applies to nf4/fp4" in s for s in skipped)
    assert {j.setup.lora_targets for j in jobs} == {("q_proj", "v_proj"), ("all-linear",)}
    full, _ = expand_grid(grids[1], steps=2)  # LoRA targets do not multiply full fine-tuning runs
    assert [(j.setup.method, j.setup.lora_targets, j.layers, j.steps) for j in full] == [("full", None, 1, 2), ("full", None, 2, 2)]


def test_grid_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [llama2-7b\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_grid_file(bad)
    with pytest.raises(ProfileError, match="unknown grid field"):
        expand_grid({"model": "llama2-7b", "sequence": 5}, steps=1)
    with pytest.raises(ProfileError, match="no model"):
        expand_grid({"quant": "nf4"}, steps=1)


def test_sample_is_reproducible_and_keeps_order() -> None:
    jobs, _ = expand_grid({"model": "llama2-7b", "seq_len": list(range(100, 120))}, steps=1)
    a, b = sample_jobs(jobs, 5, seed=7), sample_jobs(jobs, 5, seed=7)
    assert a == b and len(a) == 5
    assert [j.setup.seq_len for j in a] == sorted(j.setup.seq_len for j in a)


def test_cli_needs_a_model_or_a_grid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--device", "cpu"]) == 2
    assert "give --model" in capsys.readouterr().err


# ---- device errors -------------------------------------------------------------------------
def test_cuda_requested_without_cuda_is_one_line_exit_2(tiny_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["profile", "-m", tiny_model, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cpu" in err[0] and "CUDA is not available" in err[0]


def test_nvml_that_cannot_load_is_one_line_exit_2(tiny_model: str, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    pynvml = pytest.importorskip("pynvml")

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    from memplan.measure.profiler.device import check_device

    with pytest.raises(DeviceUnavailableError, match="NVML"):
        check_device("cuda")
    assert main(["profile", "-m", tiny_model, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cpu" in err[0]


# ---- real runs (subprocess per run) --------------------------------------------------------
def _run_cli(model: str, out: Path, *extra: str) -> int:
    return main(["profile", "-m", model, "--device", "cpu", "-s", "16", "-b", "1", "-b", "2", "--steps", "1",
                 "--out", str(out), *extra])


@pytest.mark.slow
def test_forced_failure_is_recorded_and_the_campaign_resumes(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from memplan.measure.profiler.run import FAIL_ENV

    out = tmp_path / "runs.jsonl"
    monkeypatch.setenv(FAIL_ENV, "backward@batch_size=1")
    assert _run_cli(tiny_model, out) == 0  # a run ended in error; the campaign went on
    first = read_records(out)
    assert [(r["setup"]["batch_size"], r["outcome"]) for r in first] == [(1, "error"), (2, "ok")]
    assert first[0]["error"]["phase"] == "backward" and "forced failure" in first[0]["error"]["message"]
    assert "forward" in first[0]["phases"]  # what ran before the failure is kept
    capsys.readouterr()

    assert _run_cli(tiny_model, out, "--dry-run") == 0
    listing = capsys.readouterr().out
    assert "run   " in listing.splitlines()[0] and " b1 " in listing.splitlines()[0]
    assert listing.splitlines()[1].startswith("skip") and " b2 " in listing.splitlines()[1]

    monkeypatch.delenv(FAIL_ENV)
    assert _run_cli(tiny_model, out) == 0  # only the failed setup runs again
    records = read_records(out)
    assert len(records) == 3 and records[2]["setup"]["batch_size"] == 1 and records[2]["outcome"] == "ok"


@pytest.mark.slow
def test_crash_and_ctrl_c_keep_finished_records(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from memplan.measure.profiler.device import collect_env
    from memplan.measure.profiler.run import FAIL_ENV

    monkeypatch.setenv(FAIL_ENV, "load@batch_size=1!")  # the first worker dies in its load phase
    jobs = [Job(Setup(model=tiny_model, device="cpu", seq_len=16, batch_size=b), None, 1) for b in (1, 2, 3)]

    def interrupt_second(i: int, n: int, job: Job) -> None:
        if i == 2:  # Ctrl-C while the second worker runs
            threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()

    out = tmp_path / "runs.jsonl"
    result = run_campaign(jobs, out=out, env=collect_env("cpu"), on_start=interrupt_second)
    assert result.interrupted
    records = read_records(out)
    assert len(records) == 1 and records[0]["outcome"] == "error"
    assert "worker exited with status 70" in records[0]["error"]["message"]


def test_progress_bar_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from memplan.commands.profile import ProgressReporter

    buf = io.StringIO()
    rep = ProgressReporter(2, console=Console(file=buf, force_terminal=True, width=120))
    job = Job(Setup(model="llama2-7b", quant="nf4"), None, 3)
    record = {"outcome": "ok", "measured": {"steady_peak_bytes": 3 * 2**30}, "duration_s": 12.0}
    for i in (1, 2):
        rep.start(i, 2, job)
        rep.done(i, 2, job, record)
    rep.close()
    text = buf.getvalue()
    assert "2/2" in text and "llama2-7b lora nf4" in text and "steady peak 3.00 GiB" in text


def test_cli_interrupt_exits_130_and_says_how_to_resume(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from memplan.measure.profiler import campaign
    from memplan.measure.profiler.campaign import CampaignResult

    monkeypatch.setattr(campaign, "run_campaign", lambda jobs, **kw: CampaignResult(interrupted=True))
    assert _run_cli(tiny_model, tmp_path / "runs.jsonl") == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and "interrupted" in err


def test_dry_run_plans_a_cuda_campaign_on_a_machine_without_one(capsys: pytest.CaptureFixture[str]) -> None:
    # A campaign for the GPU machine is checked here first: every setup valid, nothing run.
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the dry run checks recorded runs instead")
    args = ["profile", "--dry-run", "--device", "cuda", "-m", "mixtral-8x7b", "-q", "nf4", "--layers", "2", "--layers", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["plan  mixtral-8x7b L2 lora nf4 r8:default s512 b1 adamw", "plan  mixtral-8x7b L4 lora nf4 r8:default s512 b1 adamw"]
    assert out[2].startswith("2 setup(s); not checked against recorded runs")
    assert main(["profile", "--device", "cuda", "-m", "mixtral-8x7b", "-q", "nf4"]) == 2  # a real run still refuses
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_two_workers_run_side_by_side_and_ctrl_c_keeps_finished_records(tiny_model: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """workers=2: the second run starts before the first ends; this process alone appends each
    record as its worker exits; Ctrl-C stops the running workers and keeps what finished."""
    pytest.importorskip("torch")
    from memplan.measure.profiler.device import collect_env
    from memplan.measure.profiler.run import FAIL_ENV

    monkeypatch.setenv(FAIL_ENV, "load@batch_size=1!")  # the first worker dies in its load phase
    jobs = [Job(Setup(model=tiny_model, device="cpu", seq_len=16, batch_size=b), None, 1) for b in (1, 2, 3)]
    events: list[tuple[str, int]] = []

    def started(i: int, n: int, job: Job) -> None:
        events.append(("start", i))

    def recorded(i: int, n: int, job: Job, record: dict) -> None:
        events.append(("record", i))
        if i == 1:  # Ctrl-C once the first record is written, while the others run
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "runs.jsonl"
    result = run_campaign(jobs, out=out, env=collect_env("cpu"), workers=2, on_start=started, on_record=recorded)
    assert result.interrupted
    assert events[:2] == [("start", 1), ("start", 2)]  # both workers were running at once
    records = read_records(out)
    assert len(records) == 1 and records[0]["setup"]["batch_size"] == 1 and records[0]["outcome"] == "error"
    assert "worker exited with status 70" in records[0]["error"]["message"]
    with pytest.raises(ProfileError, match="--workers"):
        run_campaign(jobs, out=out, env={}, workers=0)


def test_from_file_is_the_campaign_base_and_repeated_flags_vary_on_top(capsys: pytest.CaptureFixture[str]) -> None:
    """`memplan profile --from FILE`: the config's fields (memplan.training.config_files) are the base;
    a repeated flag replaces that field with its values (issue 14)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the dry run checks recorded runs instead")
    examples = Path(__file__).resolve().parents[2] / "examples"
    args = ["profile", "--dry-run", "--device", "cuda", "--from", str(examples / "trl-sft-qlora.yaml"), "-s", "256", "-s", "512"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:2] == ["plan  llama2-7b lora nf4+dq r16:all-linear s256 b2 gc paged_adamw_8bit trl-sft",
                                             "plan  llama2-7b lora nf4+dq r16:all-linear s512 b2 gc paged_adamw_8bit trl-sft"]
    assert "recipe trl-sft" in captured.err
