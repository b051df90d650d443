"""Profile one setup on N ranks: each rank (one OS process, torch.distributed) runs the same
step loop as `run.py` around a wrapped model, under its own StorageLedger.

THE WRAPPER INTERFACE (fsdp.py, zero.py and DDP plug in here; helper modules implement it):

    def wrap_<layout>(model, setup: Setup, ctx: RankContext) -> Wrapped

Under `--autocast` the wrapper sets up mixed precision itself, as accelerate does for that layout
(the runner calls `w.module` as it is): FSDP1/DDP patch `model.forward` with torch.autocast before
wrapping (`accelerate/accelerator.py::Accelerator.prepare_model`, `fsdp.autocast_forward`);
FSDP2 has no autocast, only `MixedPrecisionPolicy` (`Accelerator._prepare_fsdp2` never calls
`prepare_model`); DeepSpeed uses its config's bf16/fp16 sections.

`model` is what `build.apply_training_setup` returned (PEFT LoRA applied, gradient
checkpointing enabled with use_reentrant=False, train mode), on `ctx.device`, with
`torch.distributed` initialised (`ctx.rank`, `ctx.world_size`, `ctx.local_rank`,
`ctx.backend` "gloo"/"nccl"). The wrapper builds its own optimizer (`build.make_optimizer`
for torch-side layouts, DeepSpeed's from its config) because DeepSpeed must. The runner then:

    adopt(ledger, w.param_tensors(), "parameters")      # after wrap, in the `setup` phase
    for step: out = w.module(input_ids=..., labels=..., use_cache=False)
              w.backward(out.loss)                       # scaling / engine.backward inside
              adopt(ledger, w.grad_tensors(), "gradients")
              w.step(); adopt(ledger, w.state_tensors(), "optimizer_state"); w.zero_grad()

`Wrapped` members (all tensors are returned as plain local torch.Tensors: unwrap DTensor
with `.to_local()` / `._local_tensor`, never the wrapper subclass):
- `module`: what to call forward on (FSDP/DDP module, DeepSpeed engine).
- `backward(loss)`, `step()`, `zero_grad()` (set_to_none=True, as Trainer).
- `param_tensors()`: every parameter storage this rank holds after wrapping (the local
  shards, FlatParameter shards, fp32 master partitions, persistent params) + quant state.
- `grad_tensors()`: this rank's gradient storages after backward (sharded grads, ZeRO's
  gradient partitions / reduce buckets that hold them).
- `state_tensors()`: this rank's optimizer state storages.
- `trainable_tensors()`: this rank's trainable parameter storages (`measured["trainable_bytes"]`).
- `buffer_tensors()`: {name: tensors} of the wrapper's persistent communication buffers
  (FSDP's unsharded all-gather outputs per unit, ZeRO's reduce/all-gather buckets); the runner
  tags them `comm_buffers` after each step and reports which are alive at the peak. `{}` if none.
- `describe()`: a dict of layout facts for the record (`measured["layout"]`), e.g.
  {"wrapper": "FullyShardedDataParallel", "units": 3, "sharding_strategy": "FULL_SHARD"}.

Storages the wrapper made while wrapping and still holds, but returns from none of the above
(DDP's gradient buckets), are tagged `comm_buffers` at the end of the `setup` phase.

`wrap(model, setup, ctx)` below dispatches on `setup.parallel`: ddp -> `fsdp.wrap_ddp`, fsdp* ->
`fsdp.wrap_fsdp`, zero* -> `zero.wrap_zero`. The runner counts `trainable_parameters` (the whole
model's, as the single-process record) before wrapping.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from memplan.measure.records import new_record
from memplan.model.spec import ModelSpec
from memplan.training.setup import Setup

__all__ = ["RankContext", "Wrapped", "wrap", "profile_rank", "COMM_BUFFERS", "FAIL_RANK_ENV", "RANK_FAILED_STATUS"]

COMM_BUFFERS = "comm_buffers"  # the ledger category of a wrapper's all-gather outputs and buckets
# Test hook: with run.FAIL_ENV set, only this rank fails (the others run on, then hang in a collective).
FAIL_RANK_ENV = "MEMPLAN_PROFILE_FAIL_RANK"
# A rank's exit status after it wrote a failed record: the group ends (the others may be stuck in a collective).
RANK_FAILED_STATUS = 3
_PEAK_STORAGES = 24  # groups of storages alive at the steady peak kept in the record (the largest)


@dataclass(frozen=True)
class RankContext:
    """Where this rank runs (torchrun's environment, read once)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" on CPU, "nccl" on CUDA
    device: Any  # torch.device of this rank


class Wrapped(Protocol):
    module: Any

    def backward(self, loss: Any) -> None: ...
    def step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def param_tensors(self) -> list[Any]: ...
    def grad_tensors(self) -> list[Any]: ...
    def state_tensors(self) -> list[Any]: ...
    def trainable_tensors(self) -> list[Any]: ...
    def buffer_tensors(self) -> dict[str, list[Any]]: ...
    def describe(self) -> dict[str, Any]: ...


def wrap(model: Any, setup: Setup, ctx: RankContext) -> Wrapped:
    """The model wrapped for `setup.parallel`, with its optimizer."""
    if setup.parallel.startswith("fsdp"):
        from memplan.measure.profiler.fsdp import wrap_fsdp

        return wrap_fsdp(model, setup, ctx)
    if setup.parallel.startswith("zero"):
        from memplan.measure.profiler.zero import wrap_zero

        return wrap_zero(model, setup, ctx)
    if setup.parallel == "ddp":
        from memplan.measure.profiler.fsdp import wrap_ddp

        return wrap_ddp(model, setup, ctx)
    raise ValueError(f"no sharded wrapper for --parallel {setup.parallel}")


def _checkpoint(spec: ModelSpec, setup: Setup, cache: Path, ctx: RankContext) -> Path:
    """Rank 0 makes the random checkpoint (`build.checkpoint_for`); the others wait, then find it."""
    import torch.distributed as dist

    from memplan.measure.profiler.build import checkpoint_for

    if ctx.rank == 0:
        ckpt = checkpoint_for(spec, setup.param_dtype, cache, init_device=setup.device)
    dist.barrier()
    if ctx.rank != 0:
        ckpt = checkpoint_for(spec, setup.param_dtype, cache, init_device=setup.device)
    return ckpt


def _run_rank(setup: Setup, spec: ModelSpec, steps: int, ckpt: Path, s: Any, measured: dict[str, Any], ctx: RankContext) -> None:
    """run.py's load and step loop around `wrap`: the load measures the whole model on every rank
    (from_pretrained before sharding, as accelerate loads it), the setup phase wraps and shards."""
    from memplan.errors import ProfileError
    from memplan.measure.profiler import build
    from memplan.measure.profiler.run import load_phase, step_loop

    led = s.ledger
    with led:
        model, _ = load_phase(s, spec, setup, ckpt, measured)
        s.begin("setup")
        model = build.apply_training_setup(model, spec, setup)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ProfileError("the setup leaves no trainable parameter; check --lora-targets")
        # Counted before sharding: the whole model's trainable numel, as the single-process record.
        measured["trainable_parameters"] = sum(p.numel() for p in trainable)
        measured["trainable_tensors"] = len(trainable)
        del trainable
        w = wrap(model, setup, ctx)
        del model
        gc.collect()
        led.adopt(w.param_tensors(), "parameters")
        led.tag_untagged(COMM_BUFFERS, born="setup")
        s.end("setup")
        measured["trainable_bytes"] = led.storage_bytes(w.trainable_tensors())
        measured["parameters_bytes"] = led.category_bytes("parameters")
        measured["layout"] = w.describe()

        def label_buffers(k: int) -> None:
            # The wrapper's buffers are made in the first forward and kept (resized) after it.
            for name, tensors in w.buffer_tensors().items():
                led.label(tensors, COMM_BUFFERS, name)
            # Storages made in this step's forward that outlive its backward and optimizer step are
            # no activations: the wrapper's lazily made state (DDP rebuilds its gradient buckets in
            # the second forward: torch/nn/parallel/distributed.py::DistributedDataParallel._pre_forward).
            led.tag_untagged(COMM_BUFFERS, born=("forward" if k == 1 else f"step{k}_forward"))

        step_loop(s, spec, setup, steps, w, measured, forward=w.module, after_step=label_buffers)
        measured["peak_storages"], measured["comm_buffers_at_peak"] = _at_peak(led)
        # (zero.py helper) A wrapper may patch the process for its run: ZeRO-3 replaces F.linear
        # process-wide, and its engine is never garbage-collected (hooks on autograd nodes), so the
        # next job of this rank group would inherit the patch. `close()` undoes it.
        if hasattr(w, "close"):
            w.close()


def _at_peak(led: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The storages alive at the steady peak, summed by (category, origin, phase made), largest
    first; and the comm buffers by name. Both sum to parts of `breakdown_at_peak`."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    in_flight: dict[str, int] = {}
    for row in led.window_storages():
        g = groups.setdefault((row["category"], row["origin"], row["born"]), [0, 0])
        g[0] += row["bytes"]
        g[1] += 1
        if row["category"] == COMM_BUFFERS:
            in_flight[row["origin"]] = in_flight.get(row["origin"], 0) + row["bytes"]
    rows = [{"bytes": b, "count": n, "category": c, "origin": o, "born": p} for (c, o, p), (b, n) in groups.items()]
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:_PEAK_STORAGES], in_flight


def profile_rank(setup: Setup, ctx: RankContext, *, layers: int | None, steps: int, checkpoint_dir: Path,
                 env: dict[str, Any]) -> dict[str, Any]:
    """Measure one setup on this rank; always returns this rank's record (ok, oom or error)."""
    from memplan.measure.profiler.run import _Session, failure, summarise
    from memplan.model.catalog import load_model as load_spec, with_layers

    t_start = time.perf_counter()
    spec = with_layers(load_spec(setup.model), layers)
    measured: dict[str, Any] = {"world_size": ctx.world_size}
    outcome, error, oom = "ok", None, None
    session = None
    try:
        ckpt = _checkpoint(spec, setup, checkpoint_dir, ctx)
        gc.collect()
        session = _Session(setup, extra_categories=(COMM_BUFFERS,))
        _run_rank(setup, spec, steps, ckpt, session, measured, ctx)
    except Exception as exc:  # every failure of the run becomes this rank's record
        outcome, error, oom = failure(exc, session)
    if session is not None:
        summarise(session, steps, outcome == "ok", measured)
    return new_record(
        setup=setup, layers=layers, steps=steps, env=env, outcome=outcome, phases=session.phases if session else {},
        measured=measured, error=error, oom=oom, duration_s=time.perf_counter() - t_start, rank=ctx.rank,
        model_info={"name": spec.name, "num_layers": spec.num_layers, "total_parameters": spec.total_parameters, "config": spec.config},
    )


def _context(device: str) -> RankContext:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    import torch

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        return RankContext(rank, world, local, "nccl", torch.device("cuda", local))
    return RankContext(rank, world, local, "gloo", torch.device("cpu"))


def result_path(outdir: Path, job: int, rank: int) -> Path:
    return outdir / f"job-{job}.rank-{rank}.json"


def main(argv: list[str]) -> int:
    """`python -m memplan.measure.profiler.sharded GROUP.json OUTDIR`, once per rank (the campaign
    sets torchrun's environment). GROUP: {"jobs": [{"setup", "layers", "steps"}], "checkpoint_dir",
    "env", "device", "timeout_s"}. Each job's record goes to OUTDIR/job-J.rank-R.json (temp file +
    os.replace); after a failed job the rank exits with RANK_FAILED_STATUS, ending the group."""
    if len(argv) != 2:
        print("usage: python -m memplan.measure.profiler.sharded GROUP.json OUTDIR", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from memplan.files import atomic_write_bytes
    from memplan.measure.profiler.run import FAIL_ENV

    group = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    outdir = Path(argv[1])
    ctx = _context(group["device"])
    if os.environ.get(FAIL_RANK_ENV) not in (None, str(ctx.rank)):
        os.environ.pop(FAIL_ENV, None)
    # A peer that died leaves the others in a collective. The campaign kills the group after its
    # per-setup timeout; the collective timeout, set past it, ends a group the campaign does not time.
    per_setup = group.get("timeout_s")
    collective_s = 2 * float(per_setup) + 60 if per_setup else 600.0
    dist.init_process_group(ctx.backend, timeout=datetime.timedelta(seconds=collective_s),
                            device_id=ctx.device if ctx.device.type == "cuda" else None)
    if ctx.backend == "gloo":  # before DeepSpeed's backend binds the collectives it calls
        from memplan.measure.profiler.collectives import settle_collectives

        settle_collectives()
    try:
        for j, job in enumerate(group["jobs"]):
            record = profile_rank(Setup.from_dict(job["setup"]), ctx, layers=job.get("layers"), steps=int(job["steps"]),
                                  checkpoint_dir=Path(group["checkpoint_dir"]), env=group["env"])
            atomic_write_bytes(result_path(outdir, j, ctx.rank), json.dumps(record).encode("utf-8"))
            if record["outcome"] != "ok":
                return RANK_FAILED_STATUS
            gc.collect()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
