"""The GPU catalog (`data/gpus.json`): memory, bandwidth, compute and price.

Users override prices (`--price a100-80gb=1.89`) or pass their own catalog file.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from memplan.errors import MemplanError, UnknownGPUError
from memplan.paths import data_dir

__all__ = ["GPU", "GPUCatalog", "gpu_catalog", "load_gpu_catalog", "parse_price_overrides", "check_gpu_price", "check_storage_price",
           "MAX_GPU_USD_PER_HOUR", "MAX_STORAGE_USD_PER_GB_MONTH"]


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_bytes: int  # datasheet capacity (decimal GB)
    usable_bytes: int  # what nvidia-smi reports as total (MiB * 2**20)
    bandwidth_bytes_per_s: int
    bf16_tflops: float
    pcie_gen: int
    usd_per_hour: float
    price_provider: str
    price_date: str

    def __post_init__(self) -> None:
        """The one check of a GPU, wherever it comes from (the built-in catalog, a user file, the API):
        names are strings, the physical figures the planner divides by are finite and positive."""
        for name in ("key", "name", "price_provider", "price_date"):
            v = getattr(self, name)
            if not isinstance(v, str) or (name in ("key", "name") and not v.strip()):
                raise MemplanError(f"GPU {self.key!r}: {name} must be a {'non-empty ' if name in ('key', 'name') else ''}string, got {v!r}")
        for name in ("memory_bytes", "usable_bytes", "bandwidth_bytes_per_s", "pcie_gen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise MemplanError(f"GPU {self.key!r}: {name} must be a positive integer, got {v!r}")
        if isinstance(self.bf16_tflops, bool) or not isinstance(self.bf16_tflops, (int, float)) \
                or not math.isfinite(self.bf16_tflops) or self.bf16_tflops <= 0:
            raise MemplanError(f"GPU {self.key!r}: bf16_tflops must be a positive number, got {self.bf16_tflops!r}")
        # A catalog entry without a price has 0 (unpriced); a price given is checked as --price is.
        if self.usd_per_hour != 0 or isinstance(self.usd_per_hour, bool):
            check_gpu_price(self.usd_per_hour, what=f"GPU {self.key!r}: usd_per_hour")


@dataclass(frozen=True)
class GPUCatalog:
    gpus: tuple[GPU, ...]
    storage_usd_per_gb_month: float
    source: str
    gpus_per_node: int  # GPUs in one server: the default node size (data/gpus.json, with its source)

    def get(self, name: str) -> GPU:
        key = name.strip().lower().replace(" ", "-")
        for g in self.gpus:
            if key in (g.key, g.name.lower().replace(" ", "-")):
                return g
        close = difflib.get_close_matches(key, [g.key for g in self.gpus], n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(g.key for g in self.gpus)}"
        raise UnknownGPUError(f"unknown GPU '{name}'; {hint}")

    def with_prices(self, prices: dict[str, float]) -> "GPUCatalog":
        gpus = list(self.gpus)
        for key, price in prices.items():
            price = check_gpu_price(price, what=f"price of {key}")
            g = self.get(key)
            gpus[gpus.index(g)] = replace(g, usd_per_hour=price, price_provider="user override", price_date="")
        return replace(self, gpus=tuple(gpus))


    def with_storage_price(self, price: float) -> "GPUCatalog":
        """A copy with the storage price replaced (checked: see `check_storage_price`)."""
        return replace(self, storage_usd_per_gb_month=check_storage_price(price))


def _parse(raw: object, where: str) -> GPUCatalog:
    if not isinstance(raw, dict) or not isinstance(raw.get("gpus"), list) or not raw["gpus"]:
        raise MemplanError(f"{where}: a GPU catalog is a JSON object with a non-empty 'gpus' list")
    gpus = []
    names = {f for f in GPU.__dataclass_fields__}
    for i, item in enumerate(raw["gpus"]):
        if not isinstance(item, dict):
            raise MemplanError(f"{where}: gpus[{i}] must be an object")
        missing = [n for n in ("key", "name", "memory_bytes", "usable_bytes", "bandwidth_bytes_per_s", "bf16_tflops") if n not in item]
        if missing:
            raise MemplanError(f"{where}: gpus[{i}] is missing {', '.join(missing)}")
        vals = {k: v for k, v in item.items() if k in names}
        vals.setdefault("pcie_gen", 4)
        vals.setdefault("usd_per_hour", 0.0)
        vals.setdefault("price_provider", "")
        vals.setdefault("price_date", "")
        try:  # GPU.__post_init__ checks the fields
            gpus.append(GPU(**vals))
        except MemplanError as exc:
            raise MemplanError(f"{where}: gpus[{i}]: {exc}") from None
    # A user catalog without a storage price gets the built-in catalog's (data/gpus.json, with its source).
    if "storage_usd_per_gb_month" not in raw and Path(where) == data_dir() / "gpus.json":
        raise MemplanError(f"{where}: the built-in catalog must give storage_usd_per_gb_month")
    price = raw["storage_usd_per_gb_month"] if "storage_usd_per_gb_month" in raw else gpu_catalog().storage_usd_per_gb_month
    storage = check_storage_price(price, what=f"{where}: storage_usd_per_gb_month")
    keys = [g.key for g in gpus]
    if len(set(keys)) != len(keys):
        raise MemplanError(f"{where}: GPU keys must be unique")
    # The node size, like the storage price: a user catalog without one gets the built-in catalog's.
    if "gpus_per_node" not in raw and Path(where) == data_dir() / "gpus.json":
        raise MemplanError(f"{where}: the built-in catalog must give gpus_per_node")
    per_node = raw["gpus_per_node"] if "gpus_per_node" in raw else gpu_catalog().gpus_per_node
    if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
        raise MemplanError(f"{where}: gpus_per_node must be a positive integer, got {per_node!r}")
    return GPUCatalog(gpus=tuple(gpus), storage_usd_per_gb_month=float(storage), source=str(raw.get("source", where)),
                      gpus_per_node=per_node)


@lru_cache(maxsize=1)
def gpu_catalog() -> GPUCatalog:
    """The built-in catalog."""
    path = data_dir() / "gpus.json"
    return _parse(json.loads(path.read_text()), str(path))


def load_gpu_catalog(path: str | Path | None = None) -> GPUCatalog:
    if path is None:
        return gpu_catalog()
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MemplanError(f"cannot read GPU catalog {p}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemplanError(f"GPU catalog {p} is not valid JSON: {exc}") from None
    return _parse(raw, str(p))


# Ceilings: the dearest on-demand GPU-hour in any cloud list is ~$15 (H200/B200), an
# 8-GPU node ~$100/h; storage lists at ~$0.02-0.2 per GB-month. Anything far above is a typo.
MAX_GPU_USD_PER_HOUR = 1000.0
MAX_STORAGE_USD_PER_GB_MONTH = 100.0


def check_gpu_price(price: object, *, what: str) -> float:
    """A GPU-hour price: a positive, finite number of USD up to MAX_GPU_USD_PER_HOUR (a free
    GPU would make every plan's cost, and the cheapest GPU, meaningless)."""
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) \
            or not 0 < price <= MAX_GPU_USD_PER_HOUR:
        raise MemplanError(f"{what}: a GPU-hour price must be a positive number of USD up to "
                           f"{MAX_GPU_USD_PER_HOUR:,.0f}, got {price!r}")
    return float(price)


def check_storage_price(price: object, *, what: str = "--storage-price") -> float:
    """Storage USD per GB-month (GB = 10**9 bytes): finite, from 0 up to MAX_STORAGE_USD_PER_GB_MONTH."""
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) \
            or not 0 <= price <= MAX_STORAGE_USD_PER_GB_MONTH:
        raise MemplanError(f"{what} must be a number of USD per GB-month from 0 up to "
                           f"{MAX_STORAGE_USD_PER_GB_MONTH:,.0f}, got {price!r}")
    return float(price)


def parse_price_overrides(items: Iterable[str]) -> dict[str, float]:
    """`["a100-80gb=1.89", ...]` -> {"a100-80gb": 1.89}."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise MemplanError(f"--price '{item}' must look like GPU=USD_PER_HOUR, e.g. a100-80gb=1.89")
        try:
            price = float(value)
        except ValueError:
            raise MemplanError(f"--price '{item}' must look like GPU=USD_PER_HOUR, e.g. a100-80gb=1.89 "
                               f"('{value.strip()}' is not a number)") from None
        out[key.strip()] = check_gpu_price(price, what=f"--price '{item}'")
    return out
