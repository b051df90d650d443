"""Campaigns: the cross product of several values per flag, one subprocess per run.

- `expand_grid` turns `{field: [values]}` into validated jobs; impossible
  combinations (double quant on bf16, full fine-tuning of an nf4 base) are
  skipped and reported, not run.
- `load_grid_file` reads YAML or JSON: one mapping, a list of mappings, or
  `{"defaults": {...}, "grids": [...]}`. Keys are `Setup` fields plus `layers`.
- `run_campaign` runs every job in `python -m memplan.measure.profiler.worker`, so an
  OOM, a crash or a leak ends with that process; `workers=N` runs N of them side
  by side (CPU ledger runs: it counts bytes, not time). This process alone
  appends each record to the output file as soon as its run ends, skips jobs already recorded (outcome ok
  or oom) in the same environment, and leaves finished records intact on Ctrl-C.
- Sharded jobs (`--gpus N --parallel ...`) run in rank groups (`rank_group.py`): N processes
  under torch.distributed, up to `SHARDED_GROUP_JOBS` setups of one world size per group (imports
  once, a fresh model per setup), one record per rank. A group takes min(N, workers) slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from memplan.errors import MemplanError, ProfileError
from memplan.measure.records import append_record, new_record, read_records, run_key
from memplan.training.setup import Setup

__all__ = ["Job", "expand_grid", "sample_jobs", "load_grid_file", "CampaignResult", "run_campaign", "done_keys",
           "is_done", "SHARDED_GROUP_JOBS"]

# Setups per rank group: a crash costs the group's start-up (seconds) and re-runs the rest in a new one.
SHARDED_GROUP_JOBS = 8

_SETUP_FIELDS = tuple(Setup.__dataclass_fields__)
GRID_KEYS = _SETUP_FIELDS + ("layers",)
_LORA_DEFAULTS = {name: Setup.__dataclass_fields__[name].default for name in ("lora_rank", "lora_dropout")}


@dataclass(frozen=True)
class Job:
    setup: Setup
    layers: int | None
    steps: int

    def label(self) -> str:
        return self.setup.label(layers=self.layers)


def _as_values(key: str, value: Any) -> list[Any]:
    """A grid value: a list means several values; `lora_targets` values are lists or comma strings."""
    if key == "lora_targets":
        if value is None or isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value) and not any("," in v for v in value):
            # [q_proj, v_proj] is ambiguous; read a flat list of names as one target list
            return [tuple(value)]
        return [v if v is None or isinstance(v, str) else tuple(v) for v in value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ProfileError(f"grid field '{key}' has an empty list of values")
        return list(value)
    return [value]


def _default_attention(model: str, cache: dict[str, str]) -> str:
    """What `memplan estimate` assumes without --attention (`architectures.default_attention`)."""
    if model not in cache:
        from memplan.model.architectures import default_attention
        from memplan.model.catalog import load_model

        cache[model] = default_attention(load_model(model))
    return cache[model]


def expand_grid(grid: dict[str, Any], *, steps: int) -> tuple[list[Job], list[str]]:
    """Cross product of `grid`'s values -> (jobs, reasons for skipped combinations)."""
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ProfileError(f"unknown grid field(s) {', '.join(unknown)}; known: {', '.join(GRID_KEYS)}")
    if "model" not in grid:
        raise ProfileError("the grid has no model; give --model or a 'model' key in the grid file")
    keys = list(grid)
    axes = [_as_values(k, grid[k]) for k in keys]
    jobs: list[Job] = []
    skipped: list[str] = []
    seen: set[tuple] = set()
    families: dict[str, str] = {}
    for combo in itertools.product(*axes):
        raw = dict(zip(keys, combo))
        layers = raw.pop("layers", None)
        if "attention" not in raw:
            raw["attention"] = _default_attention(str(raw["model"]), families)
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ProfileError(f"--layers must be a positive integer, got {layers!r}")
        try:
            setup = Setup.from_dict(raw)
        except MemplanError as exc:
            skipped.append(str(exc))
            continue
        if setup.method == "full":  # LoRA fields mean nothing here: one run, not one per rank/target
            setup = dataclasses.replace(setup, lora_rank=_LORA_DEFAULTS["lora_rank"], lora_targets=None,
                                        lora_dropout=_LORA_DEFAULTS["lora_dropout"])
        ident = (json.dumps(setup.to_dict(), sort_keys=True), layers)
        if ident not in seen:
            seen.add(ident)
            jobs.append(Job(setup, layers, steps))
    return jobs, skipped


def sample_jobs(jobs: list[Job], n: int | None, *, seed: int = 0) -> list[Job]:
    """`n` jobs drawn at random (reproducibly, by `seed`), kept in their original order."""
    if n is None or n >= len(jobs):
        return jobs
    if n < 1:
        raise ProfileError(f"--sample must be a positive integer, got {n}")
    picked = sorted(random.Random(seed).sample(range(len(jobs)), n))
    return [jobs[i] for i in picked]


def load_grid_file(path: str | Path) -> list[dict[str, Any]]:
    """Grids from a YAML or JSON file; `defaults` apply to every grid."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read grid file {p}: {exc.strerror}") from None
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # json/yaml syntax errors
        raise ProfileError(f"grid file {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {' '.join(str(exc).split())[:200]}") from None
    defaults: dict[str, Any] = {}
    if isinstance(raw, dict) and "grids" in raw:
        defaults = raw.get("defaults") or {}
        grids = raw["grids"]
    elif isinstance(raw, dict):
        grids = [raw]
    else:
        grids = raw
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) for g in grids) or not isinstance(defaults, dict):
        raise ProfileError(f"grid file {p} must hold a mapping of fields to values, a list of them, or {{defaults, grids}}")
    return [{**defaults, **g} for g in grids]


def done_keys(out: Path, env_key: str) -> set[str]:
    """Run keys already recorded in `out` with outcome ok or oom (errors are retried)."""
    if not out.is_file():
        return set()
    keys = set()
    for r in read_records([out]):
        if r["outcome"] in ("ok", "oom") and _env_key_of(r) == env_key:
            keys.add(run_key(Setup.from_dict(r["setup"]), r["layers"], r["steps"], env_key, r.get("rank")))
    return keys


def is_done(job: Job, done: set[str], env_key: str) -> bool:
    """Whether `done` (from `done_keys`) holds the job's record, or every rank's for a sharded job."""
    from memplan.measure.profiler.rank_group import is_sharded, world_size_of

    ranks: list[int | None] = list(range(world_size_of(job))) if is_sharded(job) else [None]
    return all(run_key(job.setup, job.layers, job.steps, env_key, r) in done for r in ranks)


def _env_key_of(record: dict[str, Any]) -> str:
    from memplan.measure.profiler.device import env_key

    return env_key(record["env"])


@dataclass
class CampaignResult:
    written: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    interrupted: bool = False


def _crash_record(job: Job, env: dict[str, Any], message: str, duration: float) -> dict[str, Any]:
    return new_record(
        setup=job.setup,
        layers=job.layers,
        steps=job.steps,
        env=env,
        outcome="error",
        error={"type": "WorkerCrash", "phase": "unknown", "message": message},
        duration_s=duration,
    )


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-limit:]


@dataclass
class _Running:
    """One worker subprocess of a campaign, in its own folder (job, result, log)."""

    index: int
    job: Job
    proc: subprocess.Popen
    workdir: Path
    started: float
    log: Any


def _start(index: int, job: Job, env: dict[str, Any], workdir: Path, ckpt_dir: Path) -> _Running:
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, result_path, log_path = workdir / "job.json", workdir / "result.json", workdir / "worker.log"
    result_path.unlink(missing_ok=True)
    job_path.write_text(
        json.dumps({"setup": job.setup.to_dict(), "layers": job.layers, "steps": job.steps, "checkpoint_dir": str(ckpt_dir), "env": env}),
        encoding="utf-8",
    )
    cmd = [sys.executable, "-m", "memplan.measure.profiler.worker", str(job_path), str(result_path)]
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return _Running(index, job, proc, workdir, time.perf_counter(), log)


def _stop(run: _Running) -> None:
    """Ctrl-C / SIGTERM: stop the worker, keep nothing of its run."""
    run.proc.terminate()
    try:
        run.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
    run.log.close()


def _finish(run: _Running, env: dict[str, Any], rc: int | None, timeout_s: float | None) -> dict[str, Any]:
    """The record of a worker that exited with `rc` (None: it ran past the timeout and was killed)."""
    run.log.close()
    duration = time.perf_counter() - run.started
    job, result_path, log_path = run.job, run.workdir / "result.json", run.workdir / "worker.log"
    if rc is None:
        return _crash_record(job, env, f"worker timed out after {timeout_s:.0f} s", duration)
    if rc in (-signal.SIGINT, 130):
        raise KeyboardInterrupt
    if rc == 0 and result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
    hint = " (the host ran out of memory?)" if rc == -signal.SIGKILL else ""
    return _crash_record(job, env, f"worker {how}{hint}: {_tail(log_path)}", duration)


def run_campaign(
    jobs: Iterable[Job],
    *,
    out: Path,
    env: dict[str, Any],
    resume: bool = True,
    timeout_s: float | None = None,
    checkpoint_dir: Path | None = None,
    workers: int = 1,
    on_start: Callable[[int, int, Job], None] | None = None,
    on_record: Callable[[int, int, Job, dict[str, Any]], None] | None = None,
) -> CampaignResult:
    """Run `jobs` one subprocess each, `workers` at a time, appending every record to `out` as it finishes.

    This process is the only writer: it appends a worker's record when that worker
    exits (in the order runs finish). On the CPU the ledger counts bytes, not time,
    so workers running side by side do not change what is measured; on CUDA they
    would share one device, so keep `workers=1` there. `on_start(i, n, job)` and
    `on_record(i, n, job, record)` get the job's 1-based index among the jobs to run; a sharded
    job calls `on_record` once, with its first failed rank's record (else rank 0's), and every
    rank's record is appended to `out`.
    """
    from memplan.measure.profiler.device import env_key
    from memplan.measure.profiler.rank_group import is_sharded, start_group, world_size_of

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ProfileError(f"--workers must be a positive integer, got {workers!r}")
    jobs = list(jobs)
    result = CampaignResult()
    done = done_keys(out, env_key(env)) if resume else set()
    todo = []
    for job in jobs:
        if is_done(job, done, env_key(env)):
            result.skipped.append(job)
        else:
            todo.append(job)
    n = len(todo)
    with tempfile.TemporaryDirectory(prefix="memplan-campaign-") as tmp, _interruptible():
        workdir = Path(tmp)
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else workdir / "checkpoints"
        running: list[_Running] = []
        groups: list[tuple[Any, list[tuple[int, Job]]]] = []  # (RankGroup, its jobs with their indexes)
        pending = _batches(list(enumerate(todo, 1)))

        def emit(i: int, job: Job, records: list[dict[str, Any]]) -> None:
            for record in records:
                append_record(out, record)
                result.written.append(record)
            if on_record is not None:  # one line per setup: the first failed rank's record, else rank 0's
                on_record(i, n, job, next((r for r in records if r["outcome"] != "ok"), records[0]))

        try:
            while pending or running or groups:
                while pending:
                    batch = pending[0]
                    slots = min(world_size_of(batch[0][1]), workers)
                    if len(running) + sum(min(g.world_size, workers) for g, _ in groups) + slots > workers:
                        break
                    pending.pop(0)
                    if on_start is not None:
                        on_start(batch[0][0], n, batch[0][1])
                    if not is_sharded(batch[0][1]):
                        i, job = batch[0]
                        running.append(_start(i, job, env, workdir / f"worker-{i}", ckpt))
                    else:
                        group = start_group([j for _, j in batch], env=env, workdir=workdir / f"group-{batch[0][0]}",
                                            checkpoint_dir=ckpt, timeout_s=timeout_s)
                        groups.append((group, batch))
                time.sleep(0.05)
                for run in list(running):
                    rc = run.proc.poll()
                    if rc is None and timeout_s is not None and time.perf_counter() - run.started > timeout_s:
                        run.proc.kill()
                        run.proc.wait()
                    elif rc is None:
                        continue
                    running.remove(run)
                    emit(run.index, run.job, [_finish(run, env, rc, timeout_s)])
                for group, batch in list(groups):
                    for j, records in group.poll():
                        emit(batch[j][0], batch[j][1], records)
                        if not group.ended and group.current < len(batch) and on_start is not None:
                            on_start(batch[group.current][0], n, batch[group.current][1])
                    if group.ended:
                        groups.remove((group, batch))
                        if group.leftover:  # jobs the group never reached: a fresh group, first in line
                            pending.insert(0, batch[len(batch) - len(group.leftover):])
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            for run in running:
                _stop(run)
            for group, _ in groups:
                group.stop()
    return result


def _batches(indexed: list[tuple[int, Job]]) -> list[list[tuple[int, Job]]]:
    """One batch per single-process job; sharded jobs of one world size and device together,
    `SHARDED_GROUP_JOBS` at most per batch, in the order they came."""
    from memplan.measure.profiler.rank_group import is_sharded

    out: list[list[tuple[int, Job]]] = []
    open_batches: dict[tuple[int, str], list[tuple[int, Job]]] = {}
    for i, job in indexed:
        if not is_sharded(job):
            out.append([(i, job)])
            continue
        key = (job.setup.gpus, job.setup.device)
        batch = open_batches.get(key)
        if batch is None or len(batch) >= SHARDED_GROUP_JOBS:
            batch = open_batches[key] = []
            out.append(batch)
        batch.append((i, job))
    return out


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM (`timeout`, a job scheduler) both stop the campaign cleanly,
    even where the shell started us with SIGINT ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, _stop)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
