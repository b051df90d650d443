"""Profile records: schema, atomic JSONL appends, strict reading, the DataFrame loader."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memplan.errors import ProfileError
from memplan.measure.records import SCHEMA_VERSION, append_record, new_record, read_records, records_frame, run_key, validate_record
from memplan.training.setup import Setup

SETUP = Setup(model="llama2-7b", quant="nf4", double_quant=True, lora_targets=("q_proj", "v_proj"), seq_len=512)
ENV = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "transformers": "5.23.0",
       "peft": "0.21.2", "bitsandbytes": "0.50.2"}


def _record(**overrides: object) -> dict:
    kwargs: dict = dict(setup=SETUP, layers=None, steps=3, env=ENV, outcome="ok",
                        phases={"load": {"ledger_bytes": 10, "ledger_peak_bytes": 12}},
                        measured={"weights_bytes": 10, "steady_peak_bytes": 99})
    kwargs.update(overrides)
    return new_record(**kwargs)


def test_record_round_trips_through_jsonl(tmp_path: Path) -> None:
    rec = _record(oom=None)
    path = tmp_path / "runs.jsonl"
    append_record(path, rec)
    append_record(path, _record(outcome="oom", oom={"phase": "forward", "requested_bytes": 2**27, "message": "CUDA out of memory"}))
    back = read_records(path)
    assert back[0] == rec
    assert Setup.from_dict(back[0]["setup"]) == SETUP
    assert back[1]["oom"]["requested_bytes"] == 2**27
    assert rec["schema_version"] == SCHEMA_VERSION and len({r["id"] for r in back}) == 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("measured"), "lacks field(s) measured"),
        (lambda r: r.update(schema_version=99), "schema_version 99"),
        (lambda r: r.update(outcome="crashed"), "outcome must be one of"),
        (lambda r: r.update(layers=0), "layers must be"),
        (lambda r: r["setup"].update(quant="int3"), "--quant must be one of"),
    ],
)
def test_invalid_records_are_refused(mutate, message: str) -> None:
    rec = _record()
    mutate(rec)
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_record(rec)


def test_reading_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    append_record(path, _record())
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"schema_version": 1, "id": \n')
    with pytest.raises(ProfileError, match=r"runs.jsonl line 2 is not a valid profile record"):
        read_records(path)


def test_append_after_a_torn_line_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_text('{"torn": ')  # a writer killed mid-line
    append_record(path, _record())
    lines = path.read_text().splitlines()
    assert lines[0] == '{"torn": ' and json.loads(lines[1])["outcome"] == "ok"


_WRITER = """
import sys, time
from memplan.measure.records import append_record, new_record
from memplan.training.setup import Setup
path, tag, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < start:  # both writers start together (chunked writes without the lock do corrupt then)
    pass
for i in range(150):
    rec = new_record(setup=Setup(model="llama2-7b", seq_len=i + 1), layers=None, steps=1, env={"tag": tag},
                     outcome="ok", measured={"pad": tag * 40_000})  # ~40 kB per line: many write() pages
    append_record(path, rec)
"""


def test_two_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    start = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, start]) for tag in ("a", "b")]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    records = read_records(path)  # raises if any line were corrupt
    assert len(records) == 300
    assert sorted(r["env"]["tag"] for r in records) == ["a"] * 150 + ["b"] * 150
    assert all(r["measured"]["pad"] == r["env"]["tag"] * 40_000 for r in records)


def test_frame_flattens_setup_and_nested_fields(tmp_path: Path) -> None:
    frame = records_frame([_record(), _record(layers=4)])
    assert list(frame["quant"]) == ["nf4", "nf4"]
    assert list(frame["lora_targets"]) == ["q_proj,v_proj"] * 2
    assert list(frame["measured.steady_peak_bytes"]) == [99, 99]
    assert list(frame["phases.load.ledger_peak_bytes"]) == [12, 12]
    assert frame["env.device_name"].iloc[0] == "NVIDIA H100 80GB HBM3"
    assert frame["layers"].iloc[1] == 4


def test_run_key_separates_setup_truncation_steps_and_environment() -> None:
    base = run_key(SETUP, None, 3, "env-a")
    assert base == run_key(Setup.from_dict(SETUP.to_dict()), None, 3, "env-a")
    others = {run_key(SETUP, 4, 3, "env-a"), run_key(SETUP, None, 2, "env-a"), run_key(SETUP, None, 3, "env-b"),
              run_key(Setup(model="llama2-7b", quant="nf4", double_quant=True, lora_targets=("q_proj", "v_proj"), seq_len=1024),
                      None, 3, "env-a")}
    assert base not in others and len(others) == 4


def test_committed_profiles_are_valid_records() -> None:
    from memplan.paths import profiles_dir

    files = sorted(profiles_dir().glob("*.jsonl"))
    if not files:
        pytest.skip("no committed profiles")
    records = read_records(files)
    assert records and all(r["outcome"] in ("ok", "oom", "error") for r in records)
