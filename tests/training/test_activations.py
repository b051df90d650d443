"""memplan.training.activations: what autograd saves for backward in one training step.

Reference values:
- torch itself: a real forward + loss of a tiny transformers model (PEFT LoRA or full) under
  `torch.autograd.graph.saved_tensors_hooks`, summing the distinct storages packed for backward
  that are not parameters or buffers. That is exactly `ActivationBytes.saved` (layers + head +
  saved logits) by the module's own definition.
- hand derivations of the formulas the module docstring cites (ForCausalLMLoss's fp32 upcast
  and log_softmax, non-reentrant checkpointing keeping each layer's input).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_CONFIGS, build_model
from memplan.model.architectures import spec_from_config
from memplan.model.lora import plan_lora
from memplan.training.activations import activation_bytes, compute_bytes, residual_bytes
from memplan.training.setup import Setup

QV = ("q_proj", "v_proj")


def saved_by_torch(family: str, method: str, *, batch: int, seq: int, attention: str, dtype: str, rank: int = 4,
                   targets: tuple[str, ...] = QV) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in forward + loss, without a KV cache
    (`use_cache=False`, as the profiler's step runs: a DynamicCache's copies of k and v would be saved
    instead of the projections' own outputs, which for Phi-3's fused qkv is not the same bytes)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    cfg = TINY_CONFIGS[family]
    model = build_model(cfg, dtype=dtype)
    model.config._attn_implementation = attention
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    model.train()
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            seen[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(0)
    ids = torch.randint(1, cfg["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


def predicted(family: str, method: str, *, batch: int, seq: int, attention: str, dtype: str, rank: int = 4,
              targets: tuple[str, ...] = QV) -> int:
    spec = spec_from_config(TINY_CONFIGS[family], name=family)
    setup = Setup(model=family, method=method, quant=dtype, lora_rank=rank, lora_targets=targets if method == "lora" else None,
                  seq_len=seq, batch_size=batch, attention=attention, device="cpu")
    plan = plan_lora(spec, rank, targets) if method == "lora" else None
    return activation_bytes(spec, setup, plan).saved


CASES = [
    ("llama", "lora", 2, 16, "sdpa", "bf16"),
    ("llama", "lora", 2, 16, "sdpa", "fp16"),
    ("llama", "full", 2, 16, "sdpa", "bf16"),
    ("llama", "lora", 2, 16, "eager", "bf16"),
    ("llama", "full", 2, 24, "eager", "bf16"),
    ("mistral", "full", 3, 8, "sdpa", "bf16"),
    ("qwen2", "lora", 2, 16, "sdpa", "bf16"),
    # fp32 LoRA: `x.to(lora_A.weight.dtype)` is a no-op, so q_proj's and v_proj's lora_A save the
    # same input storage (activations_lora.py::uncast_input), counted once.
    ("llama", "lora", 2, 16, "sdpa", "fp32"),
]


@pytest.mark.parametrize("family, method, batch, seq, attention, dtype", CASES)
def test_saved_bytes_equal_what_autograd_saves(family: str, method: str, batch: int, seq: int, attention: str, dtype: str) -> None:
    kw = dict(batch=batch, seq=seq, attention=attention, dtype=dtype)
    assert predicted(family, method, **kw) == saved_by_torch(family, method, **kw)


# Phi-3 slices q, k, v out of one fused output: SDPA's saved v keeps all of it, LoRA on qkv_proj or not;
# full fine-tuning also saves the attention output's contiguous copy (its rope ends in torch.cat).
@pytest.mark.parametrize("method, targets", [("lora", ("qkv_proj",)), ("lora", ("o_proj", "gate_up_proj")), ("full", ())])
def test_phi3_saved_bytes_equal_what_autograd_saves(method: str, targets: tuple[str, ...]) -> None:
    kw = dict(batch=2, seq=16, attention="sdpa", dtype="bf16", targets=targets)
    assert predicted("phi3", method, **kw) == saved_by_torch("phi3", method, **kw)


# ---- hand derivations ---------------------------------------------------------------------------------

SPEC = spec_from_config(dict(TINY_CONFIGS["llama"], vocab_size=32_000), name="llama")  # h = 72, 2 layers, V = 32,000


@pytest.mark.parametrize("quant, e", [("bf16", 2), ("fp16", 2), ("fp32", 4)])
def test_logit_terms(quant: str, e: int) -> None:
    # transformers loss_utils.ForCausalLMLoss: logits (compute dtype) -> .float() -> cross_entropy,
    # whose log_softmax saves its fp32 output; backward holds it, its fp32 gradient and the fp32
    # gradient of the logits (REFERENCE.md "Attention and logits").
    b, s, v = 3, 100, 32_000
    a = activation_bytes(SPEC, Setup(model="x", quant=quant, seq_len=s, batch_size=b), plan_lora(SPEC, 8, None))
    assert a.logits_saved == 4 * b * s * v
    assert a.logits_backward_extra == 2 * 4 * b * s * v
    # the upcast is a copy only when the logits are not fp32 already
    assert a.logits_forward_extra == e * b * s * v + (4 * b * s * v if e != 4 else 0)


@pytest.mark.parametrize("quant", ["bf16", "fp32"])
def test_checkpointing_keeps_one_layer_input_per_layer(quant: str) -> None:
    # Non-reentrant checkpointing (GradientCheckpointingLayer): each layer keeps only its input,
    # b x s x h in the residual dtype.
    b, s, h, layers = 2, 64, 72, 2
    e = 4 if quant == "fp32" else 2
    setup = Setup(model="x", quant=quant, seq_len=s, batch_size=b, grad_checkpointing=True)
    a = activation_bytes(SPEC, setup, plan_lora(SPEC, 8, None))
    assert a.layers == layers * e * b * s * h
    assert a.recompute_layer > 0
    no_ckpt = activation_bytes(SPEC, replace(setup, grad_checkpointing=False), plan_lora(SPEC, 8, None))
    assert no_ckpt.recompute_layer == 0 and no_ckpt.layers > a.layers


def test_element_sizes() -> None:
    assert compute_bytes(Setup(model="x", quant="bf16")) == 2
    assert compute_bytes(Setup(model="x", quant="fp32")) == 4
    assert compute_bytes(Setup(model="x", quant="nf4", compute_dtype="fp16")) == 2
    # peft prepare_model_for_kbit_training casts norms/embeddings to fp32: the residual stream is fp32
    assert compute_bytes(Setup(model="x", quant="nf4", prepare_kbit_training=True)) == 4
    # autocast: matmul outputs low precision, residual stream fp32 (the master weights' dtype)
    ac = Setup(model="x", quant="fp32", autocast="bf16")
    assert (compute_bytes(ac), residual_bytes(ac)) == (2, 4)


def test_lora_layer_zero_saves_less_without_input_grads() -> None:
    # Layer 0's input (a frozen embedding's output) needs no grad under LoRA without checkpointing,
    # so its first norm saves nothing; full fine-tuning saves the same in every layer.
    lora = activation_bytes(SPEC, Setup(model="x", seq_len=32), plan_lora(SPEC, 8, None))
    full = activation_bytes(SPEC, Setup(model="x", method="full", seq_len=32), None)
    assert lora.first_layer < lora.per_layer
    assert full.first_layer == full.per_layer
    assert lora.layers == lora.first_layer + (SPEC.num_layers - 1) * lora.per_layer


families = st.sampled_from(["llama", "mistral", "qwen2", "phi3", "gemma2", "mixtral", "gpt2"])


@settings(max_examples=80, deadline=None)
@given(families, st.sampled_from(["lora", "full"]), st.sampled_from(["sdpa", "eager"]), st.booleans(),
       st.integers(1, 256), st.integers(1, 6), st.floats(0.0, 0.5))
def test_activations_are_affine_in_batch(family, method, attention, ckpt, seq, batch, dropout) -> None:
    """Every saved tensor has a batch dimension except a few constants (the rotary tables, the
    0-d loss, Gemma2's `1 + weight.float()` per norm): bytes(b) = c + k x b, so equal steps in
    batch add equal bytes."""
    if family == "gemma2":
        attention = "eager"
    spec = spec_from_config(TINY_CONFIGS[family], name=family)
    setup = Setup(model=family, method=method, attention=attention, grad_checkpointing=ckpt, seq_len=seq,
                  batch_size=batch, lora_dropout=dropout, device="cpu")
    plan = plan_lora(spec, 4, None) if method == "lora" else None
    one, two, three = (activation_bytes(spec, replace(setup, batch_size=k * batch), plan) for k in (1, 2, 3))
    for field in ("layers", "head", "logits_saved", "first_layer", "per_layer", "layer_backward_extra"):
        a, b, c = getattr(one, field), getattr(two, field), getattr(three, field)
        assert c - b == b - a > 0, field
    assert one.rotary == two.rotary == three.rotary


@settings(max_examples=80, deadline=None)
@given(families, st.sampled_from(["lora", "full"]), st.sampled_from(["sdpa", "eager"]), st.booleans(), st.integers(1, 512),
       st.integers(1, 512))
def test_longer_sequences_save_more(family, method, attention, ckpt, seq, extra) -> None:
    if family == "gemma2":
        attention = "eager"
    spec = spec_from_config(TINY_CONFIGS[family], name=family)
    setup = Setup(model=family, method=method, attention=attention, grad_checkpointing=ckpt, seq_len=seq, device="cpu")
    plan = plan_lora(spec, 4, None) if method == "lora" else None
    short, long = activation_bytes(spec, setup, plan), activation_bytes(spec, replace(setup, seq_len=seq + extra), plan)
    assert long.saved > short.saved
    assert long.layers > short.layers
