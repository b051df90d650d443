"""memplan.training.search: the largest batch / sequence / rank that fit, and the smallest
and cheapest catalog GPU.

Reference side, written out here without the search: "fits" is estimate(...).memory.peak <=
gpu.usable_bytes (nvidia-smi total, REFERENCE.md GPU table), and the answers are checked
as definitions: the limit n fits and n + 1 does not; the smallest GPU has the least usable
memory among those that fit, the cheapest the lowest price.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.errors import SetupError
from memplan.hardware.gpus import GPU, GPUCatalog, gpu_catalog
from memplan.model.architectures import spec_from_config
from memplan.model.catalog import load_model
from memplan.model.lora import resolve_targets
from memplan.training.estimate import estimate
from memplan.training.search import Limits, cheapest_gpu, fit_answer, limits_on, smallest_gpu
from memplan.training.setup import Setup


def fits(setup: Setup, gpu: GPU, spec=None) -> bool:
    try:
        return estimate(setup, model=spec if spec is not None else load_model(setup.model)).memory.peak <= gpu.usable_bytes
    except SetupError:
        return False


drawn = st.fixed_dictionaries(
    dict(
        model=st.sampled_from(["llama2-7b", "mistral-7b", "qwen2.5-1.5b", "tinyllama-1.1b", "phi3-mini"]),
        quant=st.sampled_from(["bf16", "int8", "nf4"]),
        method=st.sampled_from(["lora", "full"]),
        rank=st.sampled_from([4, 8, 64]),
        seq=st.sampled_from([256, 1024, 4096]),
        ckpt=st.booleans(),
        gpu=st.sampled_from(["t4", "a10g", "l40s", "a100-80gb"]),
    )
)


def _setup(d: dict) -> Setup:
    method = "full" if d["method"] == "full" and d["quant"] == "bf16" else "lora"
    return Setup(model=d["model"], quant=d["quant"], method=method, lora_rank=d["rank"], seq_len=d["seq"],
                 grad_checkpointing=d["ckpt"])


@settings(max_examples=40, deadline=None)
@given(drawn)
def test_limits_are_the_largest_that_fit(d: dict) -> None:
    setup, gpu = _setup(d), gpu_catalog().get(d["gpu"])
    lim = limits_on(setup, gpu)
    assert lim.gpu == gpu.key
    assert lim.fits_as_given == fits(setup, gpu)
    # batch: n fits (or n = 0 and batch 1 does not), n + 1 does not (below the 2**16 ceiling)
    b = lim.max_batch_size
    assert (b == 0 and not fits(replace(setup, batch_size=1), gpu)) or fits(replace(setup, batch_size=b), gpu)
    if b < 1 << 16:
        assert not fits(replace(setup, batch_size=b + 1), gpu)
    s = lim.max_seq_len
    assert (s == 0 and not fits(replace(setup, seq_len=1), gpu)) or fits(replace(setup, seq_len=s), gpu)
    if s < 1 << 22:
        assert not fits(replace(setup, seq_len=s + 1), gpu)
    if setup.method == "full":
        assert lim.max_lora_rank is None
    else:
        # the rank ceiling is the narrowest side of a targeted linear (PEFT's r <= min(in, out))
        spec = load_model(setup.model)
        cap = min(min(lin.in_features, lin.out_features) for lin in resolve_targets(spec, setup.lora_targets))
        r = lim.max_lora_rank
        assert (r == 0 and not fits(replace(setup, lora_rank=1), gpu)) or fits(replace(setup, lora_rank=r), gpu)
        if r < cap:
            assert not fits(replace(setup, lora_rank=r + 1), gpu)
        assert r <= cap


def test_a_model_that_never_fits_has_zero_limits() -> None:
    # Llama-2-7B full fine-tune in bf16 needs >= 16 bytes per parameter under AdamW
    # (2 weights + 2 grads + 4 states = 8 bytes x 6.74e9 = 54 GB) against a T4's 15,360 MiB.
    setup = Setup(model="llama2-7b", method="full")
    lim = limits_on(setup, gpu_catalog().get("t4"))
    assert lim == Limits(gpu="t4", fits_as_given=False, max_batch_size=0, max_seq_len=0, max_lora_rank=None)


def test_rank_stops_at_the_narrowest_target() -> None:
    # A tiny llama on a B200: every rank fits, so the answer is the ceiling min(in, out) over
    # PEFT's llama default targets q_proj (72 x 72) and v_proj (72 x 2 kv heads x 18 = 36).
    spec = spec_from_config(dict(model_type="llama", hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300), name="tiny")
    lim = limits_on(Setup(model="tiny", seq_len=8), gpu_catalog().get("b200"), spec=spec)
    assert lim.max_lora_rank == 36 and lim.max_batch_size == 1 << 16


# ---- smallest and cheapest GPU ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(drawn)
def test_smallest_and_cheapest_are_the_minima_over_the_gpus_that_fit(d: dict) -> None:
    setup, cat = _setup(d), gpu_catalog()
    fitting = [g for g in cat.gpus if fits(setup, g)]
    small, cheap = smallest_gpu(setup, cat), cheapest_gpu(setup, cat)
    if not fitting:
        assert small is None and cheap is None
        return
    assert small in fitting and cheap in fitting
    assert small.usable_bytes == min(g.usable_bytes for g in fitting)
    assert cheap.usd_per_hour == min(g.usd_per_hour for g in fitting)


def _gpu(key: str, usable_gib: int, usd: float) -> GPU:
    return GPU(key=key, name=key, memory_bytes=usable_gib * 10**9, usable_bytes=usable_gib * 2**30,
               bandwidth_bytes_per_s=10**12, bf16_tflops=100.0, pcie_gen=4, usd_per_hour=usd, price_provider="test",
               price_date="")


def test_ties_break_by_the_other_criterion() -> None:
    # Llama-2-7B NF4 QLoRA at 512 tokens: a few GiB, fits all but "tiny".
    setup = Setup(model="llama2-7b", quant="nf4")
    cat = GPUCatalog(gpus=(_gpu("tiny", 1, 0.01), _gpu("mid-dear", 40, 3.0), _gpu("mid-cheap", 40, 2.0),
                           _gpu("big-cheap", 80, 2.0), _gpu("huge", 160, 9.0)), storage_usd_per_gb_month=0.0, source="test", gpus_per_node=8)
    assert not fits(setup, cat.get("tiny")) and fits(setup, cat.get("mid-dear"))
    assert smallest_gpu(setup, cat).key == "mid-cheap"  # same memory: the cheaper one
    assert cheapest_gpu(setup, cat).key == "mid-cheap"  # same price: the smaller one


def test_price_overrides_change_the_cheapest_not_the_smallest() -> None:
    setup = Setup(model="llama2-7b", quant="nf4", seq_len=1024)
    cat = gpu_catalog()
    before_small = smallest_gpu(setup, cat)
    # make the B200 (REFERENCE.md: 14.24 USD/h) nearly free
    free_b200 = cat.with_prices({"b200": 0.01})
    assert cheapest_gpu(setup, free_b200).key == "b200"
    assert smallest_gpu(setup, free_b200).key == before_small.key


def test_nothing_fits_gives_none() -> None:
    # GPT-3 175B full fine-tuning: 175e9 x 8 bytes is far beyond any single catalog GPU.
    setup = Setup(model="gpt3-175b", method="full", seq_len=128)
    assert smallest_gpu(setup, gpu_catalog()) is None and cheapest_gpu(setup, gpu_catalog()) is None


# ---- fit_answer: one GPU, or past it ----------------------------------------------------------------


def test_fit_answer_on_one_gpu_keeps_the_single_gpu_answers() -> None:
    setup, cat = Setup(model="llama2-7b", quant="nf4"), gpu_catalog()
    a10g = cat.get("a10g")
    ans = fit_answer(setup, cat, gpu=a10g)
    assert ans.layouts is None  # it fits one A10G: nothing to search past one GPU
    assert ans.smallest == smallest_gpu(setup, cat) and ans.cheapest == cheapest_gpu(setup, cat)
    assert ans.limits == limits_on(setup, a10g) and ans.limits_setup == setup


def test_fit_answer_past_one_gpu_gives_limits_per_gpu_on_the_best_cluster() -> None:
    setup, cat = Setup(model="llama2-70b", method="full"), gpu_catalog()
    h100 = cat.get("h100")
    ans = fit_answer(setup, cat, gpu=h100)
    assert not fits(setup, h100) and ans.smallest is None and ans.cheapest is None
    assert ans.layouts is not None and "h100" in ans.layouts[0].fewest
    best = ans.layouts[0].fewest["h100"]
    ls = ans.limits_setup
    assert ls == best.setup and ls.gpus > 1 and ls.parallel != "none"
    # The limits are per GPU under that layout: the largest batch per GPU fits, one more does not.
    lim = ans.limits
    assert lim.fits_as_given and lim.max_batch_size >= 1
    assert fits(replace(ls, batch_size=lim.max_batch_size), h100)
    assert not fits(replace(ls, batch_size=lim.max_batch_size + 1), h100)
    assert fits(replace(ls, seq_len=lim.max_seq_len), h100) and not fits(replace(ls, seq_len=lim.max_seq_len + 1), h100)


def test_fit_answer_without_a_gpu_searches_the_cheapest_cluster_only_past_one_gpu() -> None:
    cat = gpu_catalog()
    assert fit_answer(Setup(model="llama2-7b", quant="nf4"), cat).layouts is None
    ans = fit_answer(Setup(model="llama2-70b", method="full"), cat)
    assert ans.layouts is not None and ans.limits is None
    assert any(f.fewest for f in ans.layouts)


def test_fit_answer_searches_a_given_layout_even_when_one_gpu_holds_it() -> None:
    cat = gpu_catalog()
    setup = Setup(model="llama2-7b", quant="nf4", parallel="ddp")
    ans = fit_answer(setup, cat, gpu=cat.get("a10g"))
    assert [f.parallel for f in ans.layouts] == ["ddp"]
    assert ans.limits_setup == setup  # the setup as given holds: its limits, not a cluster's
