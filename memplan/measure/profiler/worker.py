"""One profiled run in its own process: `python -m memplan.measure.profiler.worker JOB RESULT`.

JOB is a JSON file `{"setup": {...}, "layers": N|null, "steps": N,
"checkpoint_dir": PATH, "env": {...}}`; the record is written to RESULT
(temp file + `os.replace`, so the campaign never reads half a record). Exit
status 0 means RESULT holds a record, whatever its outcome.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError
from memplan.measure.records import new_record
from memplan.training.setup import Setup


def _write_atomic(path: Path, record: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m memplan.measure.profiler.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    setup = Setup.from_dict(job["setup"])
    t0 = time.perf_counter()
    try:
        from memplan.measure.profiler.run import profile_setup

        ckpt = job.get("checkpoint_dir")
        record = profile_setup(
            setup,
            layers=job.get("layers"),
            steps=int(job.get("steps", 3)),
            checkpoint_dir=Path(ckpt) if ckpt else None,
            env=job.get("env"),
        )
    except MemplanError as exc:  # bad model path, device gone: still a record, so the campaign goes on
        record = new_record(
            setup=setup,
            layers=job.get("layers"),
            steps=int(job.get("steps", 3)),
            env=job.get("env") or {},
            outcome="error",
            error={"type": type(exc).__name__, "phase": "init", "message": str(exc)},
            duration_s=time.perf_counter() - t0,
        )
    _write_atomic(Path(argv[1]), record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
