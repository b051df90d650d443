"""Property tests of the training-memory model: growing any input never shrinks memory.

These need no reference numbers: they check invariants any correct model obeys
(issue: "more rank, sequence, batch or vocabulary never means less memory, and
nf4 <= int8 <= bf16 for the weights").
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memplan.model.architectures import spec_from_config
from memplan.errors import SetupError
from memplan.training.estimate import estimate
from memplan.training.setup import Setup

FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
    "mistral": dict(model_type="mistral", hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
    "phi3": dict(model_type="phi3", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
    "gemma2": dict(model_type="gemma2", hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64, final_logit_softcapping=30.0),
    "mixtral": dict(model_type="mixtral", hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": dict(model_type="gpt2", n_embd=512, n_layer=4, n_head=8, n_positions=4096),
}

setups = st.builds(
    dict,
    family=st.sampled_from(sorted(FAMILIES)),
    vocab=st.integers(256, 160_000),
    method=st.sampled_from(["lora", "full"]),
    quant=st.sampled_from(["bf16", "fp16", "fp32", "int8", "nf4", "fp4"]),
    double_quant=st.booleans(),
    rank=st.integers(1, 64),
    all_linear=st.booleans(),
    seq=st.integers(1, 2048),
    batch=st.integers(1, 8),
    ckpt=st.booleans(),
    optimizer=st.sampled_from(["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "sgd", "sgd_momentum"]),
    attention=st.sampled_from(["sdpa", "eager"]),
    device=st.sampled_from(["cuda", "cpu"]),
    autocast=st.sampled_from(["none", "bf16", "fp16"]),
)


def _build(d: dict):
    cfg = dict(FAMILIES[d["family"]], vocab_size=d["vocab"])
    spec = spec_from_config(cfg, name=d["family"])
    method = d["method"] if d["quant"] in ("bf16", "fp16", "fp32") else "lora"
    setup = Setup(
        model=d["family"],
        method=method,
        quant=d["quant"],
        double_quant=d["double_quant"] and d["quant"] in ("nf4", "fp4"),
        lora_rank=d["rank"],
        lora_targets=("all-linear",) if d["all_linear"] else None,
        seq_len=d["seq"],
        batch_size=d["batch"],
        grad_checkpointing=d["ckpt"],
        optimizer=d["optimizer"],
        attention=d["attention"],
        device=d["device"],
        # mixed precision applies to fp32 weights of the families it is modelled for
        autocast=d["autocast"] if d["quant"] == "fp32" and d["family"] in ("llama", "mistral", "qwen2", "phi3") else "none",
    )
    return spec, setup


def _peak(spec, setup) -> int:
    try:
        return estimate(setup, model=spec).memory.peak
    except SetupError:  # e.g. a rank above the 4-expert router's width under all-linear
        assume(False)
        raise


@settings(max_examples=150, deadline=None)
@given(setups, st.integers(1, 64))
def test_more_rank_means_more_memory(d, extra) -> None:
    # Every drawn setup is a LoRA one (a full fine-tune has no rank), and the bigger rank is
    # strictly bigger: more adapter weights, gradients and optimizer state, so strictly more memory.
    # Not for bnb's 8-bit optimizers: see test_8bit_state_threshold_can_make_a_larger_rank_smaller.
    spec, setup = _build(dict(d, method="lora"))
    assume(setup.optimizer not in ("adamw_8bit", "paged_adamw_8bit"))
    assert setup.method == "lora"
    bigger = replace(setup, lora_rank=setup.lora_rank + extra)
    small = _peak(spec, setup)
    assert _peak(spec, bigger) > small


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_state_threshold_can_make_a_larger_rank_smaller(optimizer: str) -> None:
    """bitsandbytes keeps fp32 states for a tensor under min_8bit_size = 4096 elements
    (REFERENCE.md, `bitsandbytes/optim/optimizer.py::init_state`). GPT-2's LoRA A on c_attn is
    r x 512: 3,584 elements at r = 7 (fp32 states, 8 bytes each) and 4,096 at r = 8 (uint8 states),
    so rank 8 needs less optimizer state than rank 7: memory is not monotone in rank there."""
    spec = spec_from_config(dict(FAMILIES["gpt2"], vocab_size=256), name="gpt2")
    r7, r8 = (estimate(Setup(model="gpt2", lora_rank=r, optimizer=optimizer), model=spec).memory for r in (7, 8))
    assert r8.optimizer_states < r7.optimizer_states
    assert r8.adapters > r7.adapters


@settings(max_examples=150, deadline=None)
@given(setups, st.integers(1, 2048))
def test_longer_sequence_never_less_memory(d, extra) -> None:
    spec, setup = _build(d)
    assert _peak(spec, replace(setup, seq_len=setup.seq_len + extra)) >= _peak(spec, setup)


@settings(max_examples=150, deadline=None)
@given(setups, st.integers(1, 8))
def test_bigger_batch_never_less_memory(d, extra) -> None:
    spec, setup = _build(d)
    assert _peak(spec, replace(setup, batch_size=setup.batch_size + extra)) >= _peak(spec, setup)


@settings(max_examples=100, deadline=None)
@given(setups, st.integers(1, 100_000))
def test_bigger_vocabulary_never_less_memory(d, extra) -> None:
    spec, setup = _build(d)
    bigger = spec_from_config(dict(spec.config, vocab_size=spec.vocab_size + extra), name=spec.name)
    assert _peak(bigger, setup) >= _peak(spec, setup)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(FAMILIES)), st.integers(256, 160_000), st.booleans())
def test_weight_bytes_order_nf4_int8_bf16(family, vocab, dq) -> None:
    spec = spec_from_config(dict(FAMILIES[family], vocab_size=vocab), name=family)
    attention = "eager" if family == "gemma2" else "sdpa"
    w = {
        q: estimate(Setup(model=family, quant=q, double_quant=dq and q == "nf4", attention=attention), model=spec).memory.weights
        for q in ("nf4", "int8", "bf16")
    }
    assert w["nf4"] <= w["int8"] <= w["bf16"]


@settings(max_examples=80, deadline=None)
@given(setups)
def test_peak_is_at_least_every_phase_the_fields_describe(d) -> None:
    """Not `parts sum to peak` (estimate asserts that itself, so a test of it cannot fail): the
    persistent parts are the Memory fields, and the peak covers the end of the forward
    (activations + logits alive) and the optimizer step (every gradient alive)."""
    spec, setup = _build(d)
    _peak(spec, setup)
    est = estimate(setup, model=spec)
    m, parts = est.memory, est.peak_parts
    assert all(v >= 0 for v in parts.values())
    assert (parts["weights"], parts["adapters"], parts["optimizer_states"]) == (m.weights, m.adapters, m.optimizer_states)
    persistent = m.weights + m.adapters + m.optimizer_states
    modelled = m.peak - m.overhead
    assert modelled >= persistent + m.gradients
    assert modelled >= persistent + m.activations + m.logits
    assert parts["gradients"] <= m.gradients
