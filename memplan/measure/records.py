"""Profile records: one JSON object per measured run, in JSON Lines under `profiles/`.

A record holds the full setup (exactly the estimator's inputs, `Setup.to_dict()`),
the truncation (`layers`) and `steps`, the environment, the per-phase readings,
a `measured` summary and the outcome (`ok`, `oom` with the failed request's
size, or `error` with its message). A sharded run (`--gpus N --parallel ...`) writes one record per rank, with the
optional top-level `rank` (0..N-1; absent or null on single-process records). Appends are atomic: one `write` of one whole
line under an exclusive `flock`, then `fsync`, so concurrent campaigns never
interleave partial lines. Reading is strict: a malformed line is reported with
its file and line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from memplan.errors import MemplanError, ProfileError
from memplan.training.setup import Setup

if TYPE_CHECKING:  # pandas is imported only where a DataFrame is returned
    import pandas as pd

    from memplan.model.spec import ModelSpec

__all__ = [
    "SCHEMA_VERSION",
    "OUTCOMES",
    "new_record",
    "validate_record",
    "run_key",
    "append_record",
    "read_records",
    "record_files",
    "default_record_folders",
    "records_note",
    "require_records",
    "records_frame",
    "record_spec",
]

SCHEMA_VERSION = 1
OUTCOMES = ("ok", "oom", "error")
_REQUIRED = ("schema_version", "id", "created_at", "setup", "layers", "steps", "env", "outcome", "phases", "measured")


def new_record(
    *,
    setup: Setup,
    layers: int | None,
    steps: int,
    env: dict[str, Any],
    outcome: str,
    phases: dict[str, Any] | None = None,
    measured: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    oom: dict[str, Any] | None = None,
    duration_s: float = 0.0,
    rank: int | None = None,
) -> dict[str, Any]:
    record = {
        "schema_version": SCHEMA_VERSION,
        "id": uuid.uuid4().hex,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": setup.to_dict(),
        "layers": layers,
        "steps": steps,
        "model_info": model_info,
        "env": env,
        "outcome": outcome,
        "error": error,
        "oom": oom,
        "phases": phases or {},
        "measured": measured or {},
        "duration_s": round(float(duration_s), 3),
    }
    if rank is not None:
        record["rank"] = rank
    validate_record(record)
    return record


def validate_record(record: Any) -> Setup:
    """Check a record's shape; return its `Setup`. Raises ProfileError naming the problem."""
    if not isinstance(record, dict):
        raise ProfileError(f"a profile record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise ProfileError(f"profile record lacks field(s) {', '.join(missing)}")
    version = record["schema_version"]
    if version != SCHEMA_VERSION:
        raise ProfileError(f"profile record has schema_version {version!r}; this memplan reads version {SCHEMA_VERSION}")
    if record["outcome"] not in OUTCOMES:
        raise ProfileError(f"profile record outcome must be one of {', '.join(OUTCOMES)}, got {record['outcome']!r}")
    layers = record["layers"]
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ProfileError(f"profile record layers must be a positive integer or null, got {layers!r}")
    steps = record["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProfileError(f"profile record steps must be a positive integer, got {steps!r}")
    for key in ("env", "phases", "measured", "setup"):
        if not isinstance(record[key], dict):
            raise ProfileError(f"profile record field '{key}' must be an object")
    try:
        setup = Setup.from_dict(record["setup"])
    except MemplanError as exc:
        raise ProfileError(f"profile record setup is invalid: {exc}") from None
    rank = record.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < setup.gpus):
        raise ProfileError(f"profile record rank must be null or a whole number below its setup's gpus ({setup.gpus}), got {rank!r}")
    return setup


def run_key(setup: Setup, layers: int | None, steps: int, env_key: str, rank: int | None = None) -> str:
    """What identifies a measurement for resume: the setup, truncation, steps, environment and,
    for a sharded run, the rank (single-process keys are unchanged)."""
    parts: list[Any] = [setup.to_dict(), layers, steps, env_key]
    if rank is not None:
        parts.append(rank)
    payload = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _lock(fd: int) -> Any:
    try:
        import fcntl
    except ImportError:  # not POSIX: O_APPEND single writes are still whole lines on local disks
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fcntl


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as one line, atomically with respect to other writers."""
    validate_record(record)
    data = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl = _lock(fd)
        try:
            size = os.fstat(fd).st_size
            if size:  # a writer killed mid-line (disk full, power loss) must not glue two records
                with open(path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def default_record_folders() -> list[Path]:
    """What a reader takes without paths: the shipped records plus `./profiles/` (see `memplan.paths`)."""
    from memplan.paths import profile_folders

    return profile_folders()


def records_note(paths: Iterable[str | Path] | str | Path | None = None) -> str:
    """One line saying which records a command read (the commands print it on stderr)."""
    from memplan.paths import profiles_dir

    if isinstance(paths, (str, Path)):
        paths = [paths]
    if paths is None:
        names = [f"{p} (shipped)" if p == profiles_dir() else str(p) for p in default_record_folders()]
        return "profiles: " + (" + ".join(names) or "none (no shipped records and no ./profiles/)")
    return "profiles: " + ", ".join(str(p) for p in paths)


def require_records(paths: Iterable[str | Path] | str | Path | None = None) -> list[dict[str, Any]]:
    """`read_records`, refusing an empty result with one line naming where it looked."""
    records = read_records(paths)
    if not records:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        where = ", ".join(str(p) for p in (default_record_folders() if paths is None else paths)) or "./profiles/"
        raise ProfileError(f"no profile records in {where}; run `memplan profile` first, or name a .jsonl file or folder")
    return records


def record_files(paths: Iterable[str | Path] | None = None) -> list[Path]:
    """JSONL files named in `paths` (files or folders); default: the shipped `profiles/*.jsonl`
    plus `./profiles/*.jsonl` (`default_record_folders`)."""
    out: list[Path] = []
    for p in default_record_folders() if paths is None else [Path(x) for x in paths]:
        if p.is_dir():
            out += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            out.append(p)
        else:
            raise ProfileError(f"no profile records at {p}: not a file or folder")
    return out


def read_records(paths: Iterable[str | Path] | str | Path | None = None) -> list[dict[str, Any]]:
    """Every record in the given JSONL files/folders (default `profiles/`), validated."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[dict[str, Any]] = []
    for path in record_files(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ProfileError(f"cannot read profile records {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ProfileError(f"{path} is not a JSON Lines file of profile records (not UTF-8 text)") from None
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                validate_record(record)
            except (json.JSONDecodeError, ProfileError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise ProfileError(f"{path} line {lineno} is not a valid profile record ({reason}); fix or delete that line") from None
            records.append(record)
    return records


def record_spec(record: dict[str, Any]) -> "ModelSpec":
    """The ModelSpec a record was measured on: the config embedded in `model_info` (what
    the profiler loaded), else the catalog's, truncated to the record's `layers` (what
    `memplan profile --layers N` builds). Every re-estimate of a record goes through here."""
    from memplan.model.architectures import spec_from_config
    from memplan.model.catalog import load_model, with_layers

    info = record.get("model_info") or {}
    model = record["setup"]["model"]
    spec = spec_from_config(info["config"], name=info.get("name") or model) if info.get("config") else load_model(model)
    return with_layers(spec, record.get("layers"))


def records_frame(records: Iterable[dict[str, Any]] | None = None) -> "pd.DataFrame":
    """Records as a flat DataFrame: setup fields as plain columns (`quant`, `seq_len`),
    everything else dotted (`env.device_name`, `measured.steady_peak_bytes`,
    `phases.load.ledger_bytes`). `lora_targets` becomes a comma string."""
    import pandas as pd

    rows = []
    for r in read_records() if records is None else records:
        flat = {k: v for k, v in r.items() if k not in ("model_info",)}
        setup = dict(flat.pop("setup"))
        targets = setup.get("lora_targets")
        setup["lora_targets"] = ",".join(targets) if targets else None
        flat = {**setup, **flat}
        flat["model_name"] = (r.get("model_info") or {}).get("name")
        rows.append(flat)
    if not rows:
        return pd.DataFrame()
    return pd.json_normalize(rows, sep=".")
