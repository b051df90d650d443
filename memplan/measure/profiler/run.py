"""Profile one setup in this process: load, set up, and run `steps` training steps.

Phases: `load` (from_pretrained), `setup` (adapters, checkpointing, optimizer),
then per step `forward`, `backward`, `optimizer` (step 1) and
`step{k}_forward` ... for k >= 2. The steady state is the last step: optimizer
state exists and `zero_grad(set_to_none=True)` freed the previous gradients.
A step mirrors transformers' Trainer: `loss = model(input_ids, labels).loss`
(the output object with its logits is dropped), `loss.backward()`,
`optimizer.step()`, `optimizer.zero_grad(set_to_none=True)`; under `--autocast`
the forward runs inside torch.autocast as accelerate wraps it, and fp16 scales
the loss with a GradScaler.

Run it through `memplan.measure.profiler.worker` (one subprocess per setup) so that an
OOM or a crash cannot affect the next measurement.
"""

from __future__ import annotations

import gc
import os
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from memplan.model.catalog import load_model as load_spec, with_layers
from memplan.errors import ProfileError
from memplan.measure.records import new_record
from memplan.training.setup import Setup
from memplan.model.spec import ModelSpec

__all__ = ["profile_setup", "FAIL_ENV", "phase_names", "step_loop", "failure", "summarise"]

# Test hook: "PHASE" or "PHASE@field=value" makes the run raise inside that phase;
# a "!" suffix ("load!") kills the worker process instead (a crash, as the OOM killer would), a "~"
# suffix makes it hang (a stuck collective, for the campaign's timeout).
FAIL_ENV = "MEMPLAN_PROFILE_FAIL"
_OOM_SIZE = re.compile(r"(?:Tried to allocate|tried to allocate)\s+([\d.]+)\s*(GiB|MiB|KiB|GB|MB|kB|bytes|B)\b")
_UNIT = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "GB": 10**9, "MB": 10**6, "kB": 10**3, "bytes": 1, "B": 1}


def phase_names(steps: int) -> list[str]:
    names = ["load", "setup", "forward", "backward", "optimizer"]
    for k in range(2, steps + 1):
        names += [f"step{k}_forward", f"step{k}_backward", f"step{k}_optimizer"]
    return names


def _oom_request_bytes(message: str) -> int | None:
    m = _OOM_SIZE.search(message)
    return int(float(m.group(1)) * _UNIT[m.group(2)]) if m else None


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    # cuBLAS/cuDNN report a failed workspace allocation as their own status, not as a torch OOM.
    markers = ("out of memory", "not enough memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
    return isinstance(exc, RuntimeError) and any(m in text for m in markers)


def _should_fail(spec: str | None, phase: str, setup: Setup) -> bool:
    if not spec:
        return False
    want, _, cond = spec.rstrip("!~").partition("@")
    if want != phase:
        return False
    if not cond:
        return True
    key, _, value = cond.partition("=")
    return str(setup.to_dict().get(key)) == value


class _Session:
    """The instruments of one run: the storage ledger and, on CUDA, the allocator/NVML meter."""

    def __init__(self, setup: Setup, *, extra_categories: tuple[str, ...] = ()) -> None:
        from memplan.measure.profiler.ledger import StorageLedger

        self.setup = setup
        self.meter = None
        if setup.device == "cuda":
            from memplan.measure.profiler.device import CudaMeter

            self.meter = CudaMeter()
        self.ledger = StorageLedger(setup.device, extra_categories=extra_categories)
        self.phases: dict[str, dict[str, Any]] = {}
        self._t0 = 0.0

    def begin(self, name: str) -> None:
        gc.collect()
        if self.meter is not None:
            self.meter.begin()
        self.ledger.begin_phase(name)
        self._t0 = time.perf_counter()
        fail = os.environ.get(FAIL_ENV)
        if _should_fail(fail, name, self.setup):
            if fail and fail.endswith("!"):
                os._exit(70)
            if fail and fail.endswith("~"):
                time.sleep(24 * 3600)
            raise RuntimeError(f"forced failure in phase {name} ({FAIL_ENV})")

    def end(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if self.meter is not None:
            entry.update(self.meter.read())
        entry["duration_s"] = round(time.perf_counter() - self._t0, 4)
        entry["ledger_bytes"] = self.ledger.live_bytes
        entry["ledger_peak_bytes"] = self.ledger.phase_peak_bytes
        entry["ledger_by_category"] = self.ledger.by_category()
        self.phases[name] = entry
        return entry


def optimizer_state_tensors(optimizer: Any) -> list[Any]:
    """Every tensor the optimizer keeps as state (unwrapping accelerate's AcceleratedOptimizer)."""
    import torch

    opt = getattr(optimizer, "optimizer", optimizer)
    out = []
    for state in opt.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def adopt_model(led: Any, model: Any) -> None:
    """Put every storage the model holds (parameters, buffers, bitsandbytes quant state) in the ledger."""
    from memplan.measure.profiler import build

    led.adopt(model.parameters(), "parameters")
    led.adopt(model.buffers(), "parameters")
    led.adopt(build.quant_state_tensors(model), "parameters")


def load_phase(s: _Session, spec: ModelSpec, setup: Setup, ckpt: Path, measured: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The `load` phase: `from_pretrained` (quantized) of the random checkpoint, weights measured."""
    from memplan.measure.profiler import build

    s.begin("load")
    model = build.load_model(spec, setup, ckpt)
    adopt_model(s.ledger, model)
    entry = s.end("load")
    measured["weights_bytes"] = s.ledger.category_bytes("parameters")
    return model, entry


def record_trainable(led: Any, params: list[Any], measured: dict[str, Any]) -> None:
    """What the setup made trainable, and every parameter byte after it."""
    if not params:
        raise ProfileError("the setup leaves no trainable parameter; check --lora-targets")
    measured["trainable_parameters"] = sum(p.numel() for p in params)
    measured["trainable_tensors"] = len(params)
    measured["trainable_bytes"] = led.storage_bytes(params)
    measured["parameters_bytes"] = led.category_bytes("parameters")


class LocalDriver:
    """One process, one device: the step as Trainer runs it without a distributed wrapper."""

    def __init__(self, model: Any, setup: Setup, params: list[Any]) -> None:
        from memplan.measure.profiler import build

        self.module = model
        self.params = params
        self.optimizer = build.make_optimizer(setup, params)
        self.scaler = build.grad_scaler(setup)

    def backward(self, loss: Any) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def grad_tensors(self) -> list[Any]:
        return [p.grad for p in self.params if p.grad is not None]

    def state_tensors(self) -> list[Any]:
        return optimizer_state_tensors(self.optimizer)


def step_loop(s: _Session, spec: ModelSpec, setup: Setup, steps: int, driver: Any, measured: dict[str, Any],
              *, forward: Any = None, after_step: Any = None) -> None:
    """`steps` training steps through `driver` (`LocalDriver`, or a sharded wrapper with the same
    members: module, backward, step, zero_grad, grad_tensors, state_tensors), each phase measured;
    the last step is the ledger's steady-state window. `forward` is what a step calls (default:
    `driver.module`, under autocast if the setup asks); `after_step(k)` runs after step k's phases."""
    import torch

    from memplan.measure.profiler import build

    led = s.ledger
    device = torch.device("cuda", torch.cuda.current_device()) if setup.device == "cuda" else torch.device("cpu")
    if forward is None:
        forward = build.training_forward(driver.module, setup)
    vocab = spec.vocab_size
    generator = torch.Generator().manual_seed(0)
    for k in range(1, steps + 1):
        prefix = "" if k == 1 else f"step{k}_"
        if k == steps and steps >= 2:
            led.open_window()
        s.begin(prefix + "forward")
        input_ids = torch.randint(0, vocab, (setup.batch_size, setup.seq_len), generator=generator).to(device)
        loss = forward(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        led.end_forward()
        fwd = s.end(prefix + "forward")
        s.begin(prefix + "backward")
        driver.backward(loss)
        del loss
        led.adopt(driver.grad_tensors(), "gradients")
        s.end(prefix + "backward")
        grads = led.storage_bytes(driver.grad_tensors())
        s.begin(prefix + "optimizer")
        driver.step()
        led.adopt(driver.state_tensors(), "optimizer_state")
        driver.zero_grad()
        s.end(prefix + "optimizer")
        del input_ids
        if after_step is not None:
            after_step(k)
        if k == steps:
            led.close_window()
            measured["gradients_bytes"] = grads
            measured["activations_bytes"] = fwd["ledger_by_category"]["activations"]
            state = driver.state_tensors()
            # bnb paged state lives in unified memory behind a CPU-side tensor
            # (`bitsandbytes/functional.py::get_paged`): counted apart, added to the total.
            paged = sum(t.untyped_storage().nbytes() for t in state if getattr(t, "is_paged", False))
            measured["optimizer_state_bytes"] = led.storage_bytes(state) + paged
            measured["optimizer_paged_bytes"] = paged


def _run(setup: Setup, spec: ModelSpec, steps: int, ckpt: Path, s: _Session, measured: dict[str, Any]) -> None:
    from memplan.measure.profiler import build

    led = s.ledger
    with led:
        model, load = load_phase(s, spec, setup, ckpt, measured)
        if s.meter is not None:
            measured["weights_allocated_bytes"] = load["allocated_bytes"]

        s.begin("setup")
        model = build.apply_training_setup(model, spec, setup)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ProfileError("the setup leaves no trainable parameter; check --lora-targets")
        driver = LocalDriver(model, setup, params)
        adopt_model(led, model)
        s.end("setup")
        record_trainable(led, params, measured)
        step_loop(s, spec, setup, steps, driver, measured)


def summarise(s: _Session, steps: int, ok: bool, measured: dict[str, Any]) -> None:
    key = "max_allocated_bytes" if s.meter is not None else "ledger_peak_bytes"
    if s.phases:  # over every phase, the load included (quantizing on load has its own peak)
        top = max(s.phases, key=lambda n: s.phases[n][key])
        measured["overall_peak_bytes"] = s.phases[top][key]
        measured["overall_peak_phase"] = top
    last = [n for n in s.phases if n.startswith(f"step{steps}_")] if ok and steps >= 2 else []
    if last:
        peak_phase = max(last, key=lambda n: s.phases[n][key])
        measured["steady_peak_bytes"] = s.phases[peak_phase][key]
        measured["steady_peak_phase"] = peak_phase
        measured["steady_peak_ledger_bytes"] = s.ledger.window_peak_bytes
        measured["breakdown_at_peak"] = s.ledger.window_breakdown()
        if s.meter is not None:
            measured["steady_peak_reserved_bytes"] = max(s.phases[n]["max_reserved_bytes"] for n in last)
    if s.meter is not None:
        measured["cuda_context_bytes"] = s.meter.context_bytes
        nvml = [p.get("nvml_process_bytes") for p in s.phases.values() if p.get("nvml_process_bytes") is not None]
        measured["nvml_peak_bytes"] = max(nvml) if nvml else None
        measured["nvml_used_peak_bytes"] = max((p["nvml_used_bytes"] for p in s.phases.values()), default=None)


def failure(exc: BaseException, session: _Session | None) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """A failed run's (outcome, error, oom) record fields; the failed phase keeps what it reached."""
    phase = session.ledger.phase if session is not None else "init"
    if session is not None and phase not in session.phases:
        try:  # what the failed phase reached before it failed
            session.end(phase)["failed"] = True
        except Exception:  # noqa: BLE001 - a broken device must not hide the original error
            pass
    message = " ".join(str(exc).split())[:2000] or type(exc).__name__
    if _is_oom(exc):
        return "oom", None, {"phase": phase, "requested_bytes": _oom_request_bytes(str(exc)), "message": message[:500]}
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "error", {"type": type(exc).__name__, "phase": phase, "message": message, "traceback": "".join(tb[-6:])[-4000:]}, None


def profile_setup(
    setup: Setup,
    *,
    layers: int | None = None,
    steps: int = 3,
    checkpoint_dir: Path | None = None,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure one setup; always returns a record (outcome ok, oom or error)."""
    from memplan.measure.profiler.device import check_device, collect_env

    if setup.parallel != "none":
        raise ProfileError(f"--parallel {setup.parallel} runs on rank processes (memplan.measure.profiler.sharded), not in one process")
    t_start = time.perf_counter()
    spec = with_layers(load_spec(setup.model), layers)
    check_device(setup.device)
    env = dict(env) if env is not None else collect_env(setup.device)
    measured: dict[str, Any] = {}
    outcome, error, oom = "ok", None, None
    session: _Session | None = None
    tmp = None
    if checkpoint_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="memplan-ckpt-")
        checkpoint_dir = Path(tmp.name)
    try:
        from memplan.measure.profiler.build import checkpoint_for

        # Before any measurement: the checkpoint is made (and freed) first.
        ckpt = checkpoint_for(spec, setup.param_dtype, checkpoint_dir, init_device=setup.device)
        gc.collect()
        session = _Session(setup)
        if session.meter is not None:
            env.update(session.meter.identity())
        if setup.recipe in ("trainer", "trl-sft"):
            from memplan.measure.profiler.trainer import run_trainer

            run_trainer(setup, spec, steps, ckpt, session, measured)
        elif setup.recipe == "axolotl":
            raise ProfileError("--recipe axolotl is modelled from axolotl's documented config, not run; profile with trl-sft or trainer")
        else:
            _run(setup, spec, steps, ckpt, session, measured)
    except Exception as exc:  # every failure of the run becomes the record's outcome
        outcome, error, oom = failure(exc, session)
    finally:
        if tmp is not None:
            tmp.cleanup()
    phases = session.phases if session is not None else {}
    if session is not None:
        summarise(session, steps, outcome == "ok", measured)
    return new_record(
        setup=setup,
        layers=layers,
        steps=steps,
        env=env,
        model_info={"name": spec.name, "num_layers": spec.num_layers, "total_parameters": spec.total_parameters, "config": spec.config},
        outcome=outcome,
        phases=phases,
        measured=measured,
        error=error,
        oom=oom,
        duration_s=time.perf_counter() - t_start,
    )
