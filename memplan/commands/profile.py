"""`memplan profile`: measure real fine-tuning steps, one subprocess per setup.

Takes `memplan estimate`'s setup flags; repeat a flag to give several values
(`--quant nf4 --quant bf16`, `--grad-checkpointing --no-grad-checkpointing`)
and the campaign runs the cross product. `--grid FILE` (YAML or JSON) gives
grids instead; setup flags given beside it apply to every grid.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from memplan.commands.options import SETUP_FLAGS
from memplan.errors import MemplanError, ProfileError, SetupError
from memplan.planning.render_validate import outcome_line

_INT_FIELDS = {"lora_rank", "seq_len", "batch_size"}


def _campaign_options(fn: Any) -> Any:
    """The setup flags, each repeatable and without a default (absent = the Setup default)."""
    for decls, kwargs in reversed(SETUP_FLAGS):
        kw = {k: v for k, v in kwargs.items() if k not in ("required", "default", "show_default")}
        kw["multiple"] = True
        kw["help"] = kwargs.get("help", "") + " Repeatable."
        fn = click.option(*decls, **kw)(fn)
    return fn


def _flag_values(kwargs: dict[str, Any]) -> dict[str, list[Any]]:
    values: dict[str, list[Any]] = {}
    for decls, _ in SETUP_FLAGS:
        name = decls[0].split("/")[0].lstrip("-").replace("-", "_")
        given = kwargs.pop(name)
        if not given:
            continue
        if name == "lora_targets":  # each flag is one target set; refuse an empty one before any run
            from memplan.model.lora import parse_lora_targets

            for v in given:
                parse_lora_targets(v)
        if name == "modules_to_save":  # each flag is one comma list of module names (one value)
            given = tuple(tuple(n.strip() for n in v.split(",") if n.strip()) for v in given)
        values[name] = list(dict.fromkeys(given))
    return values


def _from_file_base(path: str) -> dict[str, list[Any]]:
    """`--from FILE`: the config's Setup fields as one-value lists (memplan.training.config_files),
    the base that --grid keys and repeated flags replace; its summary goes to stderr."""
    from memplan.training.config_files import read_config

    plan = read_config(path)
    for line in plan.summary():
        click.echo(line, err=True)
    return {name: [value] for name, value in plan.fields.items()}


def _default_out(device: str, env: dict[str, Any]) -> Path:
    """`./profiles/<device>.jsonl` in the working directory: the user's records, never the
    shipped ones inside an installed package."""
    from memplan.paths import user_profiles_dir

    if device == "cpu":
        return user_profiles_dir() / "cpu.jsonl"
    # "NVIDIA H100 80GB HBM3" -> cuda-h100.jsonl (the record's env keeps the full name)
    words = [w for w in re.split(r"[^a-z0-9]+", str(env.get("device_name", "gpu")).lower()) if w and w != "nvidia"]
    return user_profiles_dir() / f"cuda-{words[0] if words else 'gpu'}.jsonl"


def _relative(path: Path) -> str:
    """`profiles/cpu.jsonl` for a path under the working directory, else the absolute path."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _check_out(path: Path) -> None:
    """Refuse a records file that cannot be appended to, before any run."""
    from memplan.files import check_writable

    if path.is_dir():
        raise ProfileError(f"--out {path} is a folder; give a .jsonl file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProfileError(f"--out {path}: cannot create folder {path.parent} ({exc.strerror or exc})") from None
    check_writable(path)


class ProgressReporter:
    """A progress bar on a terminal (rich), one line per event elsewhere (logs, CI)."""

    def __init__(self, total: int, *, console: Any = None) -> None:
        import sys

        self.progress = None
        if console is not None or sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=console or Console(stderr=True))
            self.task = self.progress.add_task("profiling", total=total)
            self.progress.start()

    def start(self, i: int, n: int, job: Any) -> None:
        if self.progress is not None:  # n: the setups left to run once resume skipped the rest
            self.progress.update(self.task, description=job.label(), total=n)
        else:
            click.echo(f"[{i}/{n}] {job.label()} ...", err=True)

    def done(self, i: int, n: int, job: Any, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.console.print(f"{job.label()}: {outcome_line(record)}", highlight=False, markup=False)
            self.progress.advance(self.task)
        else:
            click.echo(f"[{i}/{n}] {outcome_line(record)}", err=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@click.command("profile")
@_campaign_options
@click.option("--layers", "layers", multiple=True, type=click.IntRange(min=1), help="Keep only the first N decoder layers. Repeatable.")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1), help="Training steps per run (steady state = the last).")
@click.option("--grid", "grids", multiple=True, type=click.Path(exists=True, dir_okay=False), help="YAML/JSON grid file(s) of setups.")
@click.option("--from", "from_file", default=None, type=click.Path(exists=True),
              help="Base setup from a trainer config (as `memplan estimate --from`); --grid keys and repeated flags vary on top.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None, help="JSONL file to append records to [default: ./profiles/<device>.jsonl in the working directory].")
@click.option("--resume/--no-resume", default=True, show_default=True, help="Skip setups already recorded (ok or oom) in this environment.")
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Run a random subset of N setups.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
@click.option("--run-timeout", type=click.FloatRange(min=1), default=None, help="Seconds before one run is stopped and recorded as error.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None, help="Cache of random checkpoints [default: a temp folder].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs side by side, one subprocess each (--device cpu: the ledger counts bytes, not time).")
@click.option("--compare", is_flag=True, help="Also print predicted vs measured for the runs.")
@click.option("--dry-run", is_flag=True, help="List the setups and which would be skipped; run nothing.")
def profile(layers: tuple[int, ...], steps: int, grids: tuple[str, ...], from_file: str | None, out: str | None, resume: bool,
            sample: int | None, seed: int, run_timeout: float | None, checkpoint_dir: str | None, workers: int, compare: bool,
            dry_run: bool, **kwargs: Any) -> None:
    """Measure real fine-tuning steps (CUDA allocator + NVML, or the CPU storage ledger).

    Each run loads a random-weight checkpoint through from_pretrained (bitsandbytes for
    int8/nf4/fp4), applies PEFT LoRA and runs forward, backward and optimizer steps in its
    own subprocess. Records go to ./profiles/ as JSON Lines, one per run, whatever its outcome
    (ok, oom, error); a failed run never stops the campaign.
    """
    from memplan.measure.profiler.campaign import expand_grid, load_grid_file, run_campaign, sample_jobs
    from memplan.measure.profiler.device import check_device, collect_env, env_key
    from memplan.measure.records import read_records, run_key

    flags = _flag_values(kwargs)
    if layers:
        flags["layers"] = list(dict.fromkeys(layers))
    base = _from_file_base(from_file) if from_file else {}
    if grids:
        grid_list = [{**base, **g, **flags} for path in grids for g in load_grid_file(path)]
    elif "model" in flags or "model" in base:
        grid_list = [{**base, **flags}]
    else:
        raise ProfileError("give --model (repeatable), --grid FILE or --from a config that names the model")
    jobs, skipped_invalid = [], []
    for g in grid_list:
        got, bad = expand_grid(g, steps=steps)
        jobs += got
        skipped_invalid += bad
    if not jobs:
        raise SetupError(f"no valid setup in the grid: {skipped_invalid[0] if skipped_invalid else 'it is empty'}")
    jobs = sample_jobs(jobs, sample, seed=seed)
    devices = sorted({j.setup.device for j in jobs})
    if len(devices) > 1:
        raise SetupError(f"one --device per campaign, got {', '.join(devices)}; run one campaign per device")
    device = devices[0]
    if workers > 1 and device != "cpu":
        # NVML's device-wide peak and an OOM would mix two runs on one GPU.
        raise SetupError(f"--workers {workers} needs --device cpu; a {device} campaign runs one setup at a time")
    try:
        check_device(device)
    except MemplanError as exc:
        if not dry_run:
            raise
        # Planning a campaign for another machine: list it; resume is decided where it runs.
        for job in jobs:
            click.echo(f"plan  {job.label()}")
        target = Path(out) if out else _default_out(device, {})
        click.echo(f"{len(jobs)} setup(s); not checked against recorded runs ({exc}); records -> {_relative(target)}")
        return
    if device == "cuda":
        from memplan.measure.profiler.rank_group import check_gpus

        check_gpus(jobs)
    env = collect_env(device)
    out_path = Path(out) if out else _default_out(device, env)
    if out is not None and Path(out).is_dir():
        raise ProfileError(f"--out {out} is a folder; give a .jsonl file")
    if skipped_invalid:
        click.echo(f"skipping {len(skipped_invalid)} impossible combination(s), e.g.: {skipped_invalid[0]}", err=True)

    if dry_run:
        from memplan.measure.profiler.campaign import done_keys, is_done

        done = done_keys(out_path, env_key(env)) if resume else set()
        for job in jobs:
            mark = "skip" if is_done(job, done, env_key(env)) else "run "
            click.echo(f"{mark}  {job.label()}")
        click.echo(f"{len(jobs)} setup(s); records -> {out_path}")
        return

    _check_out(out_path)
    reporter = ProgressReporter(len(jobs))
    try:
        result = run_campaign(
            jobs,
            out=out_path,
            env=env,
            resume=resume,
            timeout_s=run_timeout,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            workers=workers,
            on_start=reporter.start,
            on_record=reporter.done,
        )
    finally:
        reporter.close()
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} setup(s) already recorded in {out_path}", err=True)
    if result.interrupted:
        click.echo(f"memplan: {len(result.written)} finished record(s) kept in {out_path}; "
                   "run the same command again to resume", err=True)
        raise KeyboardInterrupt  # the CLI reports it and exits with status 130

    from memplan.planning.render_validate import render_comparison, render_measured

    keys = {run_key(j.setup, j.layers, j.steps, env_key(env)) for j in jobs}
    campaign_records = [r for r in read_records([out_path]) if env_key(r["env"]) == env_key(env)
                        and run_key(_setup_of(r), r["layers"], r["steps"], env_key(env)) in keys] if out_path.is_file() else []
    if campaign_records:
        click.echo(render_measured(campaign_records))
    if compare:
        from memplan.measure.compare import compare_records

        click.echo(render_comparison(compare_records(campaign_records), "table"))
    counts = {o: sum(r["outcome"] == o for r in result.written) for o in ("ok", "oom", "error")}
    click.echo(f"{counts['ok']} ok, {counts['oom']} oom, {counts['error']} error; records in {out_path}", err=True)


def _setup_of(record: dict[str, Any]) -> Any:
    from memplan.training.setup import Setup

    return Setup.from_dict(record["setup"])
