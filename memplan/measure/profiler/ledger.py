"""An exact ledger of live tensor storage bytes on one device type.

Every aten op runs through `StorageLedger.__torch_dispatch__` (a
`TorchDispatchMode`, the same hook `torch.utils.flop_counter` and
`torch.distributed._tools.mem_tracker` use). Each output tensor's untyped
storage is registered once, keyed by its C++ `StorageImpl` (`_cdata`), so views
and aliases (Int8Params' `CB` is the weight's own storage) count once. A weakref
callback on the storage's preserved Python object removes it when the
`StorageImpl` dies (torch keeps one Python object per live storage once created;
`mem_tracker.py::_WeakRefInfo` relies on the same behaviour).

Storages made outside dispatch (memory-mapped safetensors, tensors built before
the mode was entered, `torch.frombuffer`) are added by `adopt()`, which the
profiler calls on the model's parameters, buffers and bitsandbytes quant state,
on gradients and on optimizer state.

Ignores: memory a kernel allocates internally without returning a tensor
(oneDNN/cuBLAS workspaces, temporaries inside a bitsandbytes custom op), and
allocator rounding. On CUDA the allocator's own figures cover both.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

__all__ = ["StorageLedger", "CATEGORIES"]

# Categories of the breakdown at the peak. Tagged storages keep their tag;
# untagged ones are activations if born in a forward phase and still alive at
# its end (saved for backward), temporaries otherwise.
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")


@dataclass
class _Entry:
    serial: int
    nbytes: int
    born: str
    category: str | None = None
    ref: Any = field(default=None, repr=False)
    op: Any = field(default=None, repr=False)  # the aten op that made it (None: adopted, resized)


class StorageLedger(TorchDispatchMode):
    """Counts the bytes of every live storage on `device_type` ("cpu" or "cuda")."""

    def __init__(self, device_type: str, *, extra_categories: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.device_type = device_type
        # Sharded runs add "comm_buffers" (a wrapper's all-gather outputs and gradient buckets).
        self.categories = CATEGORIES + tuple(c for c in extra_categories if c not in CATEGORIES)
        self._labels: dict[int, str] = {}  # serial -> a name given by `label` (an FSDP unit's buffer)
        self._live: dict[int, _Entry] = {}
        self._serials = itertools.count()
        self.live_bytes = 0
        self.phase = "init"
        self.phase_peak_bytes = 0
        # The steady-state window: its peak and which storages were alive then.
        self._window_open = False
        self.window_peak_bytes = 0
        self.window_peak_phase = ""
        self._window_snapshot: list[tuple[int, int, _Entry]] = []
        self._tags: dict[int, str] = {}  # serial -> category, resolved at phase ends
        self._activation_serials: set[int] = set()

    # ---- dispatch -------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, None, func)
        return out

    # `UntypedStorage.resize_` is not an aten op, so dispatch never sees it; FSDP frees and
    # re-allocates its unsharded buffers that way (torch/distributed/utils.py::_free_storage,
    # _alloc_storage; torch/distributed/fsdp/_fully_shard/_fsdp_param.py::free_storage).
    # Patched while the ledger is active, as torch/distributed/_tools/mem_tracker.py::_track_resize does.
    def __enter__(self) -> "StorageLedger":
        self._orig_resize = torch.UntypedStorage.resize_
        orig, ledger = self._orig_resize, self

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            out = orig(st, size)
            if st.device.type == ledger.device_type:
                ledger._track_storage(st, None)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        return super().__exit__(*exc)

    # ---- bookkeeping ----------------------------------------------------------
    def _track(self, t: torch.Tensor, category: str | None, op: Any = None) -> _Entry | None:
        if is_traceable_wrapper_subclass(t):  # DTensor (FSDP2): its local tensor holds the storage
            for inner in _inner_tensors(t):
                self._track(inner, category, op)
            return None
        if t.device.type != self.device_type or t.layout != torch.strided:
            return None
        return self._track_storage(t.untyped_storage(), category, op)

    def _track_storage(self, st: torch.UntypedStorage, category: str | None, op: Any = None) -> _Entry | None:
        key = st._cdata
        nbytes = st.nbytes()
        entry = self._live.get(key)
        if entry is None:
            if nbytes == 0:
                return None
            serial = next(self._serials)
            entry = _Entry(serial, nbytes, self.phase, category, op=op)
            entry.ref = weakref.ref(st, lambda _r, k=key, s=serial: self._free(k, s))
            self._live[key] = entry
            self._grow(nbytes)
        elif entry.nbytes != nbytes:  # resize_ keeps the StorageImpl, changes its size
            delta = nbytes - entry.nbytes
            entry.nbytes = nbytes
            self._grow(delta)
        if category is not None:
            entry.category = category
            self._tags[entry.serial] = category
        return entry

    def _grow(self, delta: int) -> None:
        self.live_bytes += delta
        if self.live_bytes > self.phase_peak_bytes:
            self.phase_peak_bytes = self.live_bytes
        if self._window_open and self.live_bytes > self.window_peak_bytes:
            self.window_peak_bytes = self.live_bytes
            self.window_peak_phase = self.phase
            self._window_snapshot = [(e.serial, e.nbytes, e) for e in self._live.values()]

    def _free(self, key: int, serial: int) -> None:
        entry = self._live.get(key)
        if entry is not None and entry.serial == serial:
            del self._live[key]
            self.live_bytes -= entry.nbytes

    # ---- the profiler's interface ---------------------------------------------
    def adopt(self, tensors: Iterable[Any], category: str) -> None:
        """Register (if unseen) and tag storages, including ones made outside dispatch."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t, category)

    def begin_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peak_bytes = self.live_bytes

    def end_forward(self) -> None:
        """Storages born in this forward and still alive hold activations for backward."""
        self._activation_serials |= {e.serial for e in self._live.values() if e.born == self.phase and e.category is None}

    def open_window(self) -> None:
        """Start tracking the steady-state peak (the phases of the last step)."""
        self._window_open = True
        self.window_peak_bytes = self.live_bytes
        self.window_peak_phase = self.phase
        self._window_snapshot = [(e.serial, e.nbytes, e) for e in self._live.values()]

    def close_window(self) -> None:
        self._window_open = False

    def _category(self, serial: int) -> str:
        tag = self._tags.get(serial)
        if tag is not None:
            return tag
        return "activations" if serial in self._activation_serials else "temporaries"

    def by_category(self) -> dict[str, int]:
        """Live bytes now, per category; sums to `live_bytes`."""
        out = dict.fromkeys(self.categories, 0)
        for e in self._live.values():
            out[self._category(e.serial)] += e.nbytes
        return out

    def category_bytes(self, category: str) -> int:
        return self.by_category()[category]

    def window_breakdown(self) -> dict[str, int]:
        """Bytes per category at the window's peak; sums to `window_peak_bytes`."""
        out = dict.fromkeys(self.categories, 0)
        for serial, nbytes, _ in self._window_snapshot:
            out[self._category(serial)] += nbytes
        return out

    def tag_untagged(self, category: str, *, born: str) -> None:
        """Tag every live, untagged storage made in phase `born` (what a wrapper made and kept)."""
        for e in self._live.values():
            if e.born == born and self._tags.get(e.serial) is None and e.nbytes:
                e.category = category
                self._tags[e.serial] = category

    def label(self, tensors: Iterable[Any], category: str, name: str) -> None:
        """`adopt`, and name the storages (e.g. `unsharded:model.layers.0`) for `window_storages`."""
        for t in tensors:
            for inner in _inner_tensors(t):
                entry = self._track(inner, category)
                if entry is None and inner.device.type == self.device_type and inner.layout == torch.strided:
                    entry = self._live.get(inner.untyped_storage()._cdata)  # freed to 0 bytes: still named
                if entry is not None:
                    self._labels[entry.serial] = name

    def window_storages(self, *, min_bytes: int = 1) -> list[dict[str, Any]]:
        """The storages alive at the window's peak, largest first: bytes, category, the phase that
        made them, and their name (`label`) or the aten op that made them."""
        rows = []
        for serial, nbytes, entry in self._window_snapshot:
            if nbytes < min_bytes:
                continue
            origin = self._labels.get(serial) or (str(entry.op) if entry.op is not None else "adopted")
            rows.append({"bytes": nbytes, "category": self._category(serial), "born": entry.born, "origin": origin})
        return sorted(rows, key=lambda r: -r["bytes"])

    def storage_bytes(self, tensors: Iterable[Any]) -> int:
        """Bytes of the distinct storages behind `tensors` on this device (no registration)."""
        seen: dict[int, int] = {}
        for t in (inner for x in tensors for inner in _inner_tensors(x)):
            if t.device.type == self.device_type and t.layout == torch.strided:
                st = t.untyped_storage()
                seen[st._cdata] = st.nbytes()
        return sum(seen.values())


def _inner_tensors(t: Any) -> list[torch.Tensor]:
    """The plain tensors behind `t`: itself, or a wrapper subclass's inner tensors (a DTensor's
    local shard), recursively, as `torch/distributed/_tools/common_utils.py::get_untyped_storages`
    unwraps them."""
    if not isinstance(t, torch.Tensor):
        return []
    if not is_traceable_wrapper_subclass(t):
        return [t]
    attrs, _ = t.__tensor_flatten__()
    return [leaf for a in attrs for leaf in _inner_tensors(getattr(t, a))]
