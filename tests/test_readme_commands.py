"""Every `memplan ...` command that README.md shows runs, as written, and prints something.

Commands come from README.md itself: each line of a fenced block that starts with
`memplan ` (a `$ ` prompt and a trailing `# comment` are dropped), and each inline code
span that starts with `memplan ` (a span may wrap a line). The install lines at the top
(`python3 -m venv ...`, `bash scripts/system-deps.sh ...`) do not start with `memplan` and
are not run here; `.ci/run` runs the second one.

Each command runs through `memplan.cli.main` in its own empty working directory (with a
copy of `examples/`, and a `my-model/config.json` for the README's own-config example),
so relative `--out` files land there and no `./profiles/` of the checkout is read, and
`MEMPLAN_DEVICE_TERMS` points into that directory (`memplan calibrate` writes by default).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from memplan.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# What `./my-model/config.json` stands for in the README: any model's own config.json.
OWN_CONFIG = ROOT / "tests" / "data" / "tiny" / "tiny-llama" / "config.json"

# README commands not run as written, and why. Keep this short: every other command runs.
NOT_RUN = {
    "memplan app --profiles runs/": "starts a Streamlit server that runs until stopped (tests/app/ covers `memplan app`)",
    "memplan validate --random 200 --seed 1 --workers 2": "profiles 200 random real CPU training steps (tests/measure draws 8)",
    "memplan validate --random 64 --seed 3011301 --workers 2": "the README's 64-run random draw (about 8 min on 2 cores)",
}
# Run with `--dry-run` (list the setups, run nothing): real training steps, on a GPU.
DRY_RUN = ("memplan profile --model tinyllama-1.1b --method full --device cuda --steps 3",)
# Bare names in prose ("`memplan fit` finds ..."): these need --model, or start a server, so
# the test checks that the command exists (`--help`); the other bare names run as written.
NAMES_ONLY = ("memplan estimate", "memplan fit", "memplan plan", "memplan profile", "memplan app")
# Figures the README quotes from a command's output (README: "shows 14.48 GiB of activations at seq 512").
_QLORA_70B = ("--model llama2-70b --quant nf4 --double-quant --gpus 2 --parallel fsdp --quant-storage bf16 --grad-checkpointing "
              "--lora-targets all-linear --gpu rtx4090")
QUOTED = {"memplan estimate --model llama2-7b --quant fp32 --autocast bf16": r"^\s*activations\s+14\.48\s",
          # The README's worked 70B-on-two-24-GB case quotes these figures.
          f"memplan estimate {_QLORA_70B}": r"^\s*peak\s+22\.91$",
          f"memplan fit {_QLORA_70B}": r"longest sequence \(batch 1 per GPU\): 1065$",
          "memplan fit --model llama2-70b --method full --gpu h100": r"FSDP1 full shard\s+16 x h100"}


def _fenced_lines(text: str) -> list[str]:
    """`memplan ...` lines of the fenced code blocks (prompt and trailing comment dropped)."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("memplan "):
                out.append(shlex.join(shlex.split(line, comments=True)))
    return out


def _spans(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks that start with `memplan ` (a span may wrap a line)."""
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return [" ".join(s.split()) for s in re.findall(r"`(memplan [^`]+)`", prose)]


def readme_commands() -> list[str]:
    """Every `memplan ...` command in README.md, once each, in README order."""
    text = README.read_text(encoding="utf-8")
    return list(dict.fromkeys(_fenced_lines(text) + _spans(text)))


COMMAND_LINES = readme_commands()


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "my-model").mkdir()
    shutil.copy(OWN_CONFIG, tmp_path / "my-model" / "config.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMPLAN_DEVICE_TERMS", str(tmp_path / "device_terms.json"))
    return tmp_path


def test_the_readme_shows_the_commands_this_test_expects() -> None:
    # A broken extraction would pass by finding nothing to run.
    for cmd in ("estimate", "fit", "plan", "sweep", "report", "validate", "profile", "calibrate", "models", "app"):
        assert any(c.startswith(f"memplan {cmd} ") for c in COMMAND_LINES) or f"memplan {cmd}" in COMMAND_LINES, cmd
    # Every exception still names a README command (a stale entry would silently skip nothing).
    for command in (*NOT_RUN, *DRY_RUN, *NAMES_ONLY, *QUOTED):
        assert command in COMMAND_LINES, f"{command!r} is no longer in README.md; drop it from this test's lists"


@pytest.mark.parametrize("command", COMMAND_LINES)
def test_readme_command_runs(command: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if command in NOT_RUN:
        pytest.skip(NOT_RUN[command])
    argv = shlex.split(command)[1:]
    assert argv[0] in COMMANDS, f"README.md shows `{command}`, but {argv[0]!r} is not a memplan command"
    if command in NAMES_ONLY:
        argv.append("--help")
    elif command in DRY_RUN:
        argv.append("--dry-run")
    before = set(workdir.rglob("*"))
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, f"`{command}` exited with {status}: {err.strip()}"
    assert out.strip(), f"`{command}` printed nothing on stdout (stderr: {err.strip()})"
    if "--out" in argv:
        written = workdir / argv[argv.index("--out") + 1]
        assert written in set(workdir.rglob("*")) - before and written.stat().st_size > 0, f"`{command}` wrote no {written.name}"
    if command in QUOTED:
        assert re.search(QUOTED[command], out, flags=re.M), f"README.md quotes `{command}` as {QUOTED[command]!r}; it printed:\n{out}"
