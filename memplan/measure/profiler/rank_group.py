"""A group of rank processes for sharded jobs: start N of them as torchrun would, collect each
job's N records, and end the whole group when one rank fails or a job runs past its timeout.

Every rank runs `python -m memplan.measure.profiler.sharded GROUP.json OUTDIR` with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port,
`torch/distributed/run.py`), each in its own session so a kill takes its children too. The
group runs its jobs in order (imports once; a fresh model and ledger per job) and writes
OUTDIR/job-J.rank-R.json per job and rank. The campaign (the only writer of the records file)
polls `RankGroup.poll`: a job is done when all N records are there; a rank that exits early
(crash, OOM kill, or a failed job) or a job past its timeout ends the group, and every rank
without a record gets an error record saying why. Jobs the group did not reach are handed back
to be run in a fresh group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memplan.measure.records import new_record

__all__ = ["RankGroup", "start_group", "world_size_of", "is_sharded", "check_gpus"]

# After a rank exits early, how long the others get to write a record of their own (a failure every
# rank hits, such as a wrapper refusing the model, reaches each rank within moments).
_GRACE_S = 5.0


def is_sharded(job: Any) -> bool:
    """A job with a parallel layout runs in a rank group, even at world size 1 (the wrapper still
    allocates its flat buffers, prefetch and buckets)."""
    return job.setup.parallel != "none"


def world_size_of(job: Any) -> int:
    """The rank count of a sharded job; 1 for a single-process one."""
    return job.setup.gpus if is_sharded(job) else 1


def check_gpus(jobs: list[Any]) -> None:
    """Refuse (one line) sharded CUDA jobs that need more GPUs than this machine shows: each rank
    takes its own GPU (cuda:LOCAL_RANK), as torchrun runs them."""
    need = max((world_size_of(j) for j in jobs if is_sharded(j) and j.setup.device == "cuda"), default=0)
    if need < 2:
        return
    import torch

    have = torch.cuda.device_count()
    if have < need:
        from memplan.errors import DeviceUnavailableError

        raise DeviceUnavailableError(f"--gpus {need} runs one rank per GPU; this machine shows {have}; "
                                     "use --gpus 1 with the same --parallel (the wrapper still allocates its buffers), or --device cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RankGroup:
    """N rank processes running `jobs` in order; `current` is the index of the job they are on."""

    jobs: list[Any]
    world_size: int
    procs: list[subprocess.Popen]
    logs: list[Any]
    workdir: Path
    env: dict[str, Any]
    timeout_s: float | None
    current: int = 0
    job_started: float = field(default_factory=time.perf_counter)
    ended: bool = False
    leftover: list[Any] = field(default_factory=list)  # jobs not reached, to run in a new group
    _first_exit: float | None = None

    def _records_of(self, j: int) -> dict[int, dict[str, Any]]:
        out = {}
        for r in range(self.world_size):
            path = self.workdir / f"job-{j}.rank-{r}.json"
            if path.is_file():
                out[r] = json.loads(path.read_text(encoding="utf-8"))
        return out

    def _error(self, job: Any, rank: int, message: str) -> dict[str, Any]:
        duration = time.perf_counter() - self.job_started
        return new_record(setup=job.setup, layers=job.layers, steps=job.steps, env=self.env, outcome="error", rank=rank,
                          error={"type": "RankCrash", "phase": "unknown", "message": message}, duration_s=duration)

    def _why(self) -> str:
        """Which rank ended the group and how (its exit status and the tail of its log)."""
        from memplan.measure.profiler.sharded import RANK_FAILED_STATUS

        codes = [(r, p.poll()) for r, p in enumerate(self.procs)]
        for r, rc in codes:  # a crash first: the others' failures usually follow from it
            if rc is not None and rc not in (0, RANK_FAILED_STATUS):
                how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
                hint = " (the host ran out of memory?)" if rc == -signal.SIGKILL else ""
                return f"rank {r} {how}{hint}: {_tail(self.workdir / f'rank-{r}.log')}"
        failed = [r for r, rc in codes if rc == RANK_FAILED_STATUS]
        if failed:
            return f"rank {failed[0]} failed this setup: {_tail(self.workdir / f'rank-{failed[0]}.log')}"
        return "the rank group ended"

    def poll(self) -> list[tuple[int, list[dict[str, Any]]]]:
        """The jobs finished since the last poll: (index in `jobs`, its N records in rank order)."""
        done: list[tuple[int, list[dict[str, Any]]]] = []
        while not self.ended and self.current < len(self.jobs):
            job = self.jobs[self.current]
            got = self._records_of(self.current)
            if len(got) == self.world_size:
                records = [got[r] for r in range(self.world_size)]
                done.append((self.current, records))
                self.current += 1
                self.job_started = time.perf_counter()
                if any(r["outcome"] != "ok" for r in records):  # a failed rank exits: the rest go to a new group
                    self.stop()
                    self.leftover = self.jobs[self.current:]
                    self.current = len(self.jobs)
                continue
            now = time.perf_counter()
            exited = any(p.poll() is not None for p in self.procs)
            if exited and self._first_exit is None:
                self._first_exit = now
            timed_out = self.timeout_s is not None and now - self.job_started > self.timeout_s
            if timed_out or (exited and (all(p.poll() is not None for p in self.procs) or now - self._first_exit > _GRACE_S)):
                why = f"the setup ran past {self.timeout_s:.0f} s" if timed_out else self._why()
                self.stop()
                got = self._records_of(self.current)  # a rank may have finished while we looked
                records = [got.get(r) or self._error(job, r, f"rank {r} did not finish: {why}") for r in range(self.world_size)]
                done.append((self.current, records))
                self.leftover = self.jobs[self.current + 1:]
                self.current = len(self.jobs)
            break
        if self.current >= len(self.jobs) and not self.ended:
            self.stop()
        return done

    def stop(self) -> None:
        """End every rank (and what it started); idempotent."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
        for p in self.procs:
            p.wait()
        for log in self.logs:
            log.close()
        self.ended = True


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "Loading weights" not in ln]
    return " | ".join(lines[-3:])[-limit:]


def start_group(jobs: list[Any], *, env: dict[str, Any], workdir: Path, checkpoint_dir: Path, timeout_s: float | None) -> RankGroup:
    """Start the rank processes of `jobs` (all with the same world size and device)."""
    world = world_size_of(jobs[0])
    device = jobs[0].setup.device
    workdir.mkdir(parents=True, exist_ok=True)
    group_path = workdir / "group.json"
    group_path.write_text(json.dumps({
        "jobs": [{"setup": j.setup.to_dict(), "layers": j.layers, "steps": j.steps} for j in jobs],
        "checkpoint_dir": str(checkpoint_dir), "env": env, "device": device, "timeout_s": timeout_s,
    }), encoding="utf-8")
    port = _free_port()
    procs, logs = [], []
    for r in range(world):
        rank_env = {**os.environ, "PYTHONUNBUFFERED": "1", "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(workdir / f"rank-{r}.log", "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "memplan.measure.profiler.sharded", str(group_path), str(workdir)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=rank_env, start_new_session=True))
        logs.append(log)
    return RankGroup(list(jobs), world, procs, logs, workdir, env, timeout_s)
