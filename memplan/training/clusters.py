"""Past one GPU: the fewest GPUs of a type, and the cheapest cluster, that hold a setup.

A cluster is a GPU type, a GPU count and a parallel layout (`memplan.training.parallel`). Whether it
holds the setup is `estimate`'s per-GPU peak under that layout against the GPU's usable memory
(`memplan.training.fit`): one formula, no second model.

Counts (`gpu_counts`): 1, 2, 4, ... up to one node, then whole nodes up to `MAX_CLUSTER_GPUS`. The
per-GPU peak is not assumed to fall with the count (padding to a multiple of the shard count, ZeRO's
buckets and persistent parameters, DDP's replicas do not shrink at all), so there is no bisection:
the counts are evaluated in ascending order, and for each GPU type the first count that fits is its
fewest. Evaluation stops once every GPU type asked about has one. An estimate takes well under a
millisecond once the model's fixed parts are cached (`estimate._fixed`), so a layout's whole list of
131 counts costs tens of milliseconds.

Layouts: the one the user gave, or, when none was given (`parallel == "none"`), every layout
`CHOSEN_LAYOUTS` names. A 4-bit base under a layout that flattens parameters (FSDP, ZeRO-3) needs
`bnb_4bit_quant_storage` equal to the compute dtype (bitsandbytes' FSDP-QLoRA guide); a chosen
layout sets it and says so (`LayoutFit.quant_storage_set`). A layout the library refuses for this
setup (int8 under FSDP, a paged optimizer under ZeRO...) is kept with its reason.

Ignores: communication time and bandwidth (a cluster fits or not; what it costs per job is
`memplan.serving.training_cost`'s), host RAM limits (reported, not checked: the catalog has none).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from memplan.errors import MemplanError
from memplan.hardware.gpus import GPU
from memplan.model.catalog import load_model
from memplan.model.spec import ModelSpec
from memplan.model.storage import is_four_bit
from memplan.training.estimate import estimate
from memplan.training.parallel import default_gpus_per_node, is_fsdp, shards_parameters
from memplan.training.setup import Setup

__all__ = ["LAYOUT_NAMES", "layout_text", "MAX_CLUSTER_GPUS", "CHOSEN_LAYOUTS", "Cluster", "LayoutFit", "gpu_counts",
           "candidate_layouts", "layout_fits", "fewest_gpus", "cheapest_clusters", "best_cluster", "cluster_price"]

# A ceiling on the search, not on what exists: 128 nodes of 8 GPUs.
MAX_CLUSTER_GPUS = 1024
# What `memplan fit` tries when the user names no layout, as (parallel, fsdp_version). FSDP's
# shard-grad-op and hybrid layouts hold at least what full sharding holds on one node.
CHOSEN_LAYOUTS: tuple[tuple[str, int], ...] = (("ddp", 1), ("fsdp", 1), ("fsdp", 2), ("zero1", 1), ("zero2", 1), ("zero3", 1))

# `--parallel` values as people name them (torch FSDP's ShardingStrategy, DeepSpeed's ZeRO stages).
LAYOUT_NAMES: dict[str, str] = {"none": "one GPU", "ddp": "DDP", "fsdp": "FSDP full shard", "fsdp_shard_grad_op": "FSDP shard-grad-op",
                                "fsdp_hybrid": "FSDP hybrid shard", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}


def layout_text(parallel: str, fsdp_version: int = 1) -> str:
    """A layout in a few words: `ZeRO-3`, `FSDP2 full shard`, `DDP`."""
    name = LAYOUT_NAMES.get(parallel, parallel)
    return name.replace("FSDP", f"FSDP{fsdp_version}", 1) if is_fsdp(parallel) else name


@dataclass(frozen=True)
class Cluster:
    """`gpus` GPUs of type `gpu` running `setup` (whose `gpus` field is the same count)."""

    gpu: GPU
    setup: Setup
    peak_bytes: int  # per GPU, at the step's peak
    host_per_node_bytes: int  # host RAM for offloaded state, per node (0 without offload)

    @property
    def gpus(self) -> int:
        return self.setup.gpus

    @property
    def nodes(self) -> int:
        return self.setup.gpus // self.setup.gpus_per_node

    @property
    def headroom_bytes(self) -> int:
        return self.gpu.usable_bytes - self.peak_bytes

    @property
    def usd_per_hour(self) -> float:
        """The whole cluster's price: count x the catalog's (or the user's) price of one GPU."""
        return self.gpus * self.gpu.usd_per_hour


@dataclass(frozen=True)
class LayoutFit:
    """One layout's answer: per GPU type the cluster with the fewest GPUs that fits (types that fit at
    no count up to the ceiling are absent), or why the library refuses the layout for this setup."""

    parallel: str
    fsdp_version: int
    quant_storage: str  # bnb_4bit_quant_storage under this layout
    quant_storage_set: bool  # True where the search set it to the compute dtype for the user
    fewest: dict[str, Cluster]  # GPU key -> the fewest-GPU cluster of that type
    refused: str | None = None
    max_gpus: int = MAX_CLUSTER_GPUS


def gpu_counts(gpus_per_node: int | None = None, *, ceiling: int = MAX_CLUSTER_GPUS, start: int = 1) -> tuple[int, ...]:
    """Candidate world sizes in ascending order: powers of two below a node, the node, then whole nodes."""
    node = gpus_per_node or default_gpus_per_node()
    counts = [n for n in (1 << k for k in range(node.bit_length())) if n < node] + list(range(node, ceiling + 1, node))
    return tuple(n for n in counts if start <= n <= ceiling)


def candidate_layouts(setup: Setup) -> list[tuple[Setup | None, LayoutFit]]:
    """(a template setup, or None where the layout is refused; its empty LayoutFit) per layout to search.

    The user's layout when one was given (its quant storage as given: a bad one was refused when
    the Setup was built), else every `CHOSEN_LAYOUTS` layout with the quant storage it needs."""
    if setup.parallel != "none":
        return [(setup, LayoutFit(setup.parallel, setup.fsdp_version, setup.quant_storage, False, {}))]
    out: list[tuple[Setup | None, LayoutFit]] = []
    for parallel, version in CHOSEN_LAYOUTS:
        storage = setup.quant_storage
        needs = shards_parameters(parallel) and is_four_bit(setup.quant) and storage != setup.compute_dtype
        if needs:
            storage = setup.compute_dtype
        try:
            template = replace(setup, gpus=2, gpus_per_node=None, parallel=parallel, fsdp_version=version, quant_storage=storage)
        except MemplanError as exc:
            out.append((None, LayoutFit(parallel, version, storage, needs, {}, refused=str(exc))))
            continue
        out.append((template, LayoutFit(parallel, version, storage, needs, {})))
    return out


def _search(template: Setup, found: LayoutFit, gpus: Sequence[GPU], spec: ModelSpec, counts: Iterable[int],
            gpus_per_node: int | None, ceiling: int) -> LayoutFit:
    fewest: dict[str, Cluster] = {}
    last_error: str | None = None
    tried = 0
    for n in counts:
        try:
            s = replace(template, gpus=n, gpus_per_node=gpus_per_node)
            est = estimate(s, model=spec)
        except MemplanError as exc:
            last_error = str(exc)
            continue
        tried += 1
        host = est.sharding.host_per_node if est.sharding is not None else 0
        for g in gpus:
            if g.key not in fewest and est.memory.peak <= g.usable_bytes:
                fewest[g.key] = Cluster(g, s, est.memory.peak, host)
        if len(fewest) == len(gpus):
            break
    # Refused only where no count could be estimated at all (the reason is the library's own line).
    return replace(found, fewest=fewest, refused=last_error if tried == 0 else None, max_gpus=ceiling)


def layout_fits(setup: Setup, gpus: Sequence[GPU], *, spec: ModelSpec | None = None, gpus_per_node: int | None = None,
                ceiling: int = MAX_CLUSTER_GPUS) -> list[LayoutFit]:
    """Every layout to search (`candidate_layouts`), each with its fewest-GPU cluster per GPU type.

    `gpus_per_node`: the node size that whole-node counts step by (None: `setup.gpus_per_node` when
    the setup spans several GPUs, else 8). A layout the user gave is tried from 1 GPU; a chosen one
    from 2 (one GPU is the setup without a layout)."""
    spec = spec if spec is not None else load_model(setup.model)
    if gpus_per_node is None and setup.gpus > 1:
        gpus_per_node = setup.gpus_per_node
    out = []
    for template, found in candidate_layouts(setup):
        if template is None:
            out.append(found)
            continue
        counts = gpu_counts(gpus_per_node, ceiling=ceiling, start=1 if setup.parallel != "none" else 2)
        out.append(_search(template, found, gpus, spec, counts, gpus_per_node, ceiling))
    return out


def _ranked(fits: list[LayoutFit], key: Callable[[LayoutFit], tuple | None]) -> list[LayoutFit]:
    """Layouts with an answer first, best first by `key`; then those that fit nowhere; then refusals
    (both in `CHOSEN_LAYOUTS` order)."""
    answered = [f for f in fits if key(f) is not None]
    rest = [f for f in fits if key(f) is None]
    return sorted(answered, key=key) + [f for f in rest if f.refused is None] + [f for f in rest if f.refused is not None]


def fewest_gpus(setup: Setup, gpu: GPU, *, spec: ModelSpec | None = None, gpus_per_node: int | None = None,
                ceiling: int = MAX_CLUSTER_GPUS) -> list[LayoutFit]:
    """Per layout, the fewest `gpu`s that hold `setup`; best first (fewest GPUs, then the lowest per-GPU peak)."""
    fits = layout_fits(setup, (gpu,), spec=spec, gpus_per_node=gpus_per_node, ceiling=ceiling)

    def key(f: LayoutFit) -> tuple | None:
        c = f.fewest.get(gpu.key)
        return None if c is None else (c.gpus, c.peak_bytes)

    return _ranked(fits, key)


def best_cluster(fit: LayoutFit, rank: Callable[[Cluster], tuple]) -> Cluster | None:
    """The layout's cluster that `rank` puts first (None where no GPU type fits)."""
    return min(fit.fewest.values(), key=rank, default=None)


def cluster_price(c: Cluster) -> tuple:
    """The cheapest-cluster order: $/hour, then fewer GPUs, then the lower per-GPU peak."""
    return (c.usd_per_hour, c.gpus, c.peak_bytes, c.gpu.key)


def cheapest_clusters(setup: Setup, gpus: Sequence[GPU], *, spec: ModelSpec | None = None, gpus_per_node: int | None = None,
                      ceiling: int = MAX_CLUSTER_GPUS) -> list[LayoutFit]:
    """Per layout, the fewest-GPU cluster of every type in `gpus`; layouts best first by their cheapest
    cluster's $/hour (`best_cluster(fit, cluster_price)` names it). For one GPU type, fewer GPUs always
    cost less per hour, so the cheapest cluster of a type is its fewest-GPU one."""
    fits = layout_fits(setup, gpus, spec=spec, gpus_per_node=gpus_per_node, ceiling=ceiling)

    def key(f: LayoutFit) -> tuple | None:
        c = best_cluster(f, cluster_price)
        return None if c is None else cluster_price(c)

    return _ranked(fits, key)

