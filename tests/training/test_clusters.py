"""memplan.training.clusters: the fewest GPUs of a type, and the cheapest cluster, per layout.

Reference side, written out here without the search: a cluster of n GPUs of type g holds a
setup when estimate(setup at n GPUs under the layout).memory.peak <= g.usable_bytes (the per-GPU
peak, `memplan.training.fit`). The answers are checked as definitions: the fewest count fits
and no smaller candidate count does; the cheapest cluster costs no more per hour than any
other cluster that fits.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from memplan.errors import SetupError
from memplan.hardware.gpus import GPU, gpu_catalog
from memplan.model.catalog import load_model
from memplan.training import clusters
from memplan.training.clusters import (CHOSEN_LAYOUTS, best_cluster, cheapest_clusters, cluster_price, fewest_gpus, gpu_counts,
                                       layout_fits)
from memplan.training.estimate import estimate
from memplan.training.setup import Setup

FULL_70B = Setup(model="llama2-70b", method="full")


def per_gpu_peak(setup: Setup, n: int, parallel: str, version: int = 1, **extra: object) -> int:
    # gpus_per_node=None: Setup resolves it against the new count (replace would keep the old one's).
    extra.setdefault("gpus_per_node", None)
    return estimate(replace(setup, gpus=n, parallel=parallel, fsdp_version=version, **extra)).memory.peak


def fits(setup: Setup, n: int, parallel: str, version: int, gpu: GPU, **extra: object) -> bool:
    try:
        return per_gpu_peak(setup, n, parallel, version, **extra) <= gpu.usable_bytes
    except SetupError:
        return False


# ---- candidate counts ------------------------------------------------------------------------------


def test_counts_are_powers_of_two_up_to_a_node_then_whole_nodes() -> None:
    counts = gpu_counts()
    assert counts[:5] == (1, 2, 4, 8, 16)
    assert list(counts) == sorted(set(counts))
    assert all(n % 8 == 0 for n in counts if n >= 8) and counts[-1] == clusters.MAX_CLUSTER_GPUS
    assert gpu_counts(4, ceiling=20) == (1, 2, 4, 8, 12, 16, 20)
    assert gpu_counts(6, ceiling=18, start=2) == (2, 4, 6, 12, 18)  # below a node of 6: 2, 4; then whole nodes


# ---- fewest GPUs of one type -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h100_70b():
    return fewest_gpus(FULL_70B, gpu_catalog().get("h100"))


def test_the_fewest_h100s_fit_and_the_previous_candidate_does_not(h100_70b) -> None:
    h100 = gpu_catalog().get("h100")
    answered = [f for f in h100_70b if "h100" in f.fewest]
    assert {f.parallel for f in answered} >= {"zero3", "fsdp"}  # the done-when: a count under ZeRO-3 and FSDP
    for f in answered:
        c = f.fewest["h100"]
        assert c.gpus > 1 and c.setup.parallel == f.parallel and c.setup.fsdp_version == f.fsdp_version
        assert fits(FULL_70B, c.gpus, f.parallel, f.fsdp_version, h100)
        smaller = [n for n in gpu_counts(start=2) if n < c.gpus]
        assert smaller and not any(fits(FULL_70B, n, f.parallel, f.fsdp_version, h100) for n in smaller), f.parallel


def test_layouts_without_an_answer_fit_at_no_count(h100_70b) -> None:
    # DDP replicates the whole 70B model, its gradients and AdamW states on every GPU.
    h100 = gpu_catalog().get("h100")
    ddp = next(f for f in h100_70b if f.parallel == "ddp")
    assert ddp.fewest == {} and ddp.refused is None
    assert not fits(FULL_70B, clusters.MAX_CLUSTER_GPUS, "ddp", 1, h100)


def test_zero3_needs_no_more_gpus_than_zero1_or_zero2(h100_70b) -> None:
    # ZeRO-3 partitions parameters on top of ZeRO-2's gradients and ZeRO-1's optimizer states
    # (Rajbhandari et al. 2020, section 5): it never needs more GPUs for the same job.
    by = {f.parallel: f.fewest.get("h100") for f in h100_70b}
    assert by["zero3"] is not None
    for weaker in ("zero1", "zero2"):
        assert by[weaker] is None or by[weaker].gpus >= by["zero3"].gpus


def test_layouts_are_ranked_best_first(h100_70b) -> None:
    keys = [(f.fewest["h100"].gpus, f.fewest["h100"].peak_bytes) for f in h100_70b if "h100" in f.fewest]
    assert keys == sorted(keys)
    answered = ["h100" in f.fewest for f in h100_70b]
    assert answered == sorted(answered, reverse=True)  # every answer before every layout without one
    assert {(f.parallel, f.fsdp_version) for f in h100_70b} == set(CHOSEN_LAYOUTS)


def test_the_search_does_not_assume_the_peak_falls_with_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # A per-GPU peak that fits at 8 GPUs, not at 16 or 24, and again from 32: a bisection over
    # 2..1024 would answer a larger count; the ascending scan answers 8.
    gpu = gpu_catalog().get("h100")
    peaks = {1: 4, 2: 3, 4: 2, 8: 1, 16: 2, 24: 2}

    def fake(setup: Setup, *, model=None):  # noqa: ANN001
        peak = gpu.usable_bytes * peaks.get(setup.gpus, 1)
        return SimpleNamespace(memory=SimpleNamespace(peak=peak), sharding=None)

    monkeypatch.setattr(clusters, "estimate", fake)
    found = fewest_gpus(Setup(model="llama2-70b", method="full", parallel="zero3", gpus=8), gpu)
    assert [f.fewest["h100"].gpus for f in found] == [8]


def test_a_given_layout_is_the_only_one_searched_from_one_gpu() -> None:
    setup = Setup(model="llama2-7b", method="full", parallel="zero3")
    a100 = gpu_catalog().get("a100-80gb")
    found = fewest_gpus(setup, a100)
    assert [(f.parallel, f.fsdp_version) for f in found] == [("zero3", 1)]
    c = found[0].fewest["a100-80gb"]
    assert fits(setup, c.gpus, "zero3", 1, a100)
    assert not any(fits(setup, n, "zero3", 1, a100) for n in gpu_counts() if n < c.gpus)


def test_the_node_size_steps_the_counts() -> None:
    h100 = gpu_catalog().get("h100")
    found = fewest_gpus(Setup(model="llama2-70b", method="full", parallel="zero3"), h100, gpus_per_node=4)
    c = found[0].fewest["h100"]
    assert c.gpus % 4 == 0 and c.setup.gpus_per_node == 4 and c.nodes == c.gpus // 4


# ---- layouts chosen for a 4-bit or int8 base ----------------------------------------------------------


@pytest.mark.parametrize("compute", ["bf16", "fp16"])
def test_chosen_sharded_layouts_get_the_compute_dtype_as_quant_storage(compute: str) -> None:
    setup = Setup(model="llama2-70b", quant="nf4", compute_dtype=compute, lora_targets="all-linear", grad_checkpointing=True)
    found = {(f.parallel, f.fsdp_version): f for f in fewest_gpus(setup, gpu_catalog().get("rtx3090"))}
    for (parallel, version), f in found.items():
        flattens = parallel in ("fsdp", "zero3")
        assert f.refused is None
        assert f.quant_storage == (compute if flattens else "uint8") and f.quant_storage_set == flattens
        for c in f.fewest.values():
            assert c.setup.quant_storage == f.quant_storage


def test_layouts_the_library_refuses_keep_its_reason() -> None:
    # bitsandbytes int8 weights cannot be flattened: FSDP and ZeRO-3 are refused, the others searched.
    setup = Setup(model="llama2-13b", quant="int8")
    found = {(f.parallel, f.fsdp_version): f for f in fewest_gpus(setup, gpu_catalog().get("l4"))}
    for key in (("fsdp", 1), ("fsdp", 2), ("zero3", 1)):
        assert found[key].refused is not None and "int8" in found[key].refused and found[key].fewest == {}
        with pytest.raises(SetupError):
            replace(setup, gpus=2, gpus_per_node=None, parallel=key[0], fsdp_version=key[1])
    for key in (("ddp", 1), ("zero1", 1), ("zero2", 1)):
        assert found[key].refused is None
    order = list(found)
    assert order[-3:] and all(found[k].refused is not None for k in order[-3:])  # refusals last


# ---- the cheapest cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cheapest_70b():
    return cheapest_clusters(FULL_70B, gpu_catalog().gpus)


def test_the_cheapest_cluster_costs_no_more_than_any_cluster_that_fits(cheapest_70b) -> None:
    best = [best_cluster(f, cluster_price) for f in cheapest_70b if f.fewest]
    assert best and [cluster_price(c) for c in best] == sorted(cluster_price(c) for c in best)
    top = best[0]
    # Every (type, layout) fewest cluster costs at least the best one per hour: count x catalog price.
    for f in cheapest_70b:
        for key, c in f.fewest.items():
            assert c.usd_per_hour == c.gpus * gpu_catalog().get(key).usd_per_hour
            assert c.usd_per_hour >= top.usd_per_hour
    # and the best one is itself the fewest of its type under its layout
    assert fits(FULL_70B, top.gpus, top.setup.parallel, top.setup.fsdp_version, top.gpu)
    assert not any(fits(FULL_70B, n, top.setup.parallel, top.setup.fsdp_version, top.gpu) for n in gpu_counts(start=2) if n < top.gpus)


def test_a_cheaper_gpu_wins_the_cheapest_cluster() -> None:
    cat = gpu_catalog().with_prices({"h200": 0.01})
    found = cheapest_clusters(FULL_70B, cat.gpus)
    assert best_cluster(found[0], cluster_price).gpu.key == "h200"


def test_layout_fits_stops_only_when_every_type_has_an_answer() -> None:
    # Every type that fits at some count up to the ceiling is answered, whatever order they fit in.
    cat = gpu_catalog()
    small = Setup(model="llama2-13b", method="full")
    found = layout_fits(small, cat.gpus, spec=load_model("llama2-13b"))
    zero3 = next(f for f in found if f.parallel == "zero3")
    for g in cat.gpus:
        c = zero3.fewest.get(g.key)
        if c is not None:
            assert c.peak_bytes <= g.usable_bytes
