"""gloo collectives as the ledger should see them: tensors released when the library's last reference
goes, and the backend's own buffers not seen at all.

gloo runs each collective on a worker thread (`ProcessGroupGloo::runLoop`), which keeps its own
handle on the work, and with it the work's tensors, until it has finished the work and moved on.
The caller's `wait()` returns when the work is marked complete, which can be before the worker drops
that handle: when FSDP then drops its own references (an all-gather output after copy-out, a
reduce-scatter input), the storage lives on until the worker thread runs again. On a loaded CPU
that can be after the next allocations, so one rank's ledger sees a layer-sized buffer twice and the
two ranks of one setup measure different peaks (CI: tiny llama LoRA bf16 s128 b2 FSDP2 ws 2, 11.69 vs
12.25 MB, in 2 of 4 runs; locally 14 of 90 all-gathers of two FSDP2 runs still had the worker's handle
when `wait()` returned). On CUDA the caching allocator orders such frees by stream; the ledger has no
streams.

gloo also allocates inside a collective: its reduce-scatter makes an input-sized buffer on the
worker thread, which the ledger (a dispatch mode, thread-local) does not see being made, and which
the caller's `wait()` then splits on the main thread, so the ledger registers it there and frees it
whenever the worker drops the work. That buffer's lifetime is the worker's timing, and NCCL, which
reduce-scatters in place into FSDP's output, has no such buffer (CI: tiny llama full bf16 gc FSDP2
ws 2, ranks 13.30 vs 13.78 MB; locally 6 of the 48 reduce-scatters of two FSDP2 LoRA runs had their
buffer die on gloo's thread).

`settle_collectives()`, for a gloo process group, makes the synchronous calls FSDP1 and FSDP2
(`all_gather_single`, `reduce_scatter_single`, `all_reduce` in `torch/distributed/fsdp`) and
DeepSpeed's ZeRO (`all_gather_into_tensor`, `reduce_scatter_tensor`, `all_reduce` in
`deepspeed/comm/torch.py`) use run with the ledger's dispatch mode set aside, so that what the
backend makes for itself stays unseen (the library's own input and output buffers are made before
the call, in the mode), and wait, after completion, until the storages they were given have no more
owners than before the call: the worker has let go, and the lifetimes the ledger sees are the
library's own. Asynchronous calls (ZeRO's prefetching all-gathers) return their work as they are;
its `wait()`, like every `Work.wait`, runs with the mode set aside too, so the backend's buffers stay
unseen there as well (four ZeRO rows' last step: 5 of the 8 frees on gloo's threads were such
buffers, the others 1 to 8 bytes; with the patch, peaks unchanged, and what gloo's threads still free
is DeepSpeed's own tensors given to asynchronous collectives, which NCCL's work holds as well).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["settle_collectives"]

_PATCHED = ("all_gather_single", "reduce_scatter_single", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")
# How long a worker may keep a finished work before the run goes on regardless (it never has, so far).
_SETTLE_TIMEOUT_S = 10.0


def settle_collectives() -> None:
    """Patch this process's `torch.distributed` collectives FSDP and DeepSpeed call, and `Work.wait`
    (idempotent; for gloo only: NCCL's work keeps its tensors until the GPU is done, which the owner
    count would wait out)."""
    for name in _PATCHED:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_memplan_settled", False):
            setattr(dist, name, _settled(fn))
    if not getattr(dist.Work.wait, "_memplan_settled", False):
        dist.Work.wait = _unseen(dist.Work.wait)  # type: ignore[method-assign]


def _unseen(wait: Callable[..., Any]) -> Callable[..., Any]:
    """`Work.wait` with the dispatch modes set aside (gloo splits its own buffer there)."""
    @functools.wraps(wait)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():
            return wait(*args, **kwargs)

    call._memplan_settled = True  # type: ignore[attr-defined]
    return call


def _storage_owners(storages: list[Any]) -> list[int]:
    return [torch._C._storage_Use_Count(s._cdata) for s in storages]


def _settled(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("async_op"):
            return fn(*args, **kwargs)
        # Held across the call, so that they count the same before and after.
        storages = [a.untyped_storage() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        before = _storage_owners(storages)
        with _disable_current_modes():  # the backend's own buffers are not the library's
            work = fn(*args, **{**kwargs, "async_op": True})
            if work is not None:
                work.wait()
                del work
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        while any(now > was for now, was in zip(_storage_owners(storages), before)) and time.monotonic() < deadline:
            time.sleep(0.0002)
        return None

    call._memplan_settled = True  # type: ignore[attr-defined]
    return call
