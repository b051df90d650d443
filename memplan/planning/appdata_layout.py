"""Plain data for the fine-tune page's GPUs and sharding (re-exported by `memplan.planning.appdata`).

Which layout options a widget offers comes from the library's own rules (`memplan.training.parallel`,
checked by building a `Setup`), so the page never repeats them; the words under the chart and the
host-RAM figures are fields of the estimate (`Estimate.sharding`), as text through `memplan.units`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.errors import MemplanError
from memplan.model.storage import is_four_bit
from memplan.training.clusters import LAYOUT_NAMES, MAX_CLUSTER_GPUS, layout_text
from memplan.training.parallel import FSDP_VERSIONS, OFFLOADS, PARALLELS, QUANT_STORAGES, is_fsdp, shards_parameters
from memplan.units import format_bytes

if TYPE_CHECKING:
    from memplan.training.estimate import Estimate

__all__ = ["MAX_APP_GPUS", "FSDP_VERSIONS", "parallel_choices", "parallel_label", "fsdp_version_applies", "offload_choices",
           "quant_storage_choices", "is_per_gpu", "layout_caption", "host_rows"]

# The GPUs input's ceiling: the cluster search's (`memplan fit`), 128 nodes of 8.
MAX_APP_GPUS = MAX_CLUSTER_GPUS


def parallel_choices(gpus: int) -> list[str]:
    """Every layout on one GPU; past one, a layout is needed (Setup refuses `none` with --gpus > 1)."""
    return list(PARALLELS) if gpus == 1 else [p for p in PARALLELS if p != "none"]


def parallel_label(parallel: str) -> str:
    """`ZeRO-3 (zero3)`: the name people use, then the `--parallel` value."""
    return "none (one GPU)" if parallel == "none" else f"{LAYOUT_NAMES[parallel]} ({parallel})"


def fsdp_version_applies(parallel: str) -> bool:
    return is_fsdp(parallel)


def offload_choices(parallel: str) -> list[str]:
    """The `--offload` values the library accepts under `parallel` (just `none` where nothing offloads)."""
    from memplan.training.setup import Setup

    out = []
    for offload in OFFLOADS:
        try:
            Setup(model="app-check", parallel=parallel, offload=offload)  # one GPU: every layout's own rule
        except MemplanError:
            continue
        out.append(offload)
    return out


def quant_storage_choices(quant: str, parallel: str, compute_dtype: str) -> list[str]:
    """`bnb_4bit_quant_storage` values for a 4-bit base (none for other bases): under a layout that
    flattens parameters (FSDP, ZeRO-3) only the compute dtype (`memplan.training.parallel.check_layout`)."""
    if not is_four_bit(quant):
        return []
    return [compute_dtype] if shards_parameters(parallel) else list(QUANT_STORAGES)


def is_per_gpu(est: Estimate) -> bool:
    """Whether the page's figures are one GPU's of several (a parallel layout)."""
    return est.sharding is not None


def layout_caption(est: Estimate) -> str:
    """One line on what the figures are: one GPU's share under the layout, or the whole job on one GPU."""
    s, sh = est.setup, est.sharding
    if sh is None:
        return "One GPU runs the whole step."
    nodes = s.gpus // s.gpus_per_node
    return (f"Per GPU: {layout_text(s.parallel, s.fsdp_version)} over {s.gpus:,} GPU{'s' if s.gpus > 1 else ''} "
            f"({nodes:,} node{'s' if nodes > 1 else ''} of {s.gpus_per_node}), parameters split over {sh.shard_group:,}; "
            "the batch size is per GPU, and every figure below is one GPU's.")


def host_rows(est: Estimate) -> list[tuple[str, str, str]]:
    """(label, value, help) of the host RAM that offloaded state takes; none without offload."""
    sh = est.sharding
    if sh is None or not sh.host_per_gpu:
        return []
    s = est.setup
    return [("Host RAM per GPU", format_bytes(sh.host_per_gpu),
             f"{sh.host_per_gpu:,} bytes of CPU memory per rank (--offload {s.offload})"),
            ("Host RAM per node", format_bytes(sh.host_per_node), f"{sh.host_per_node:,} bytes: {s.gpus_per_node} ranks per node")]
