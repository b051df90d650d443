"""memplan.training.estimate: the whole memory picture of one training step.

Reference values, by test:
- the committed H100 runs in profiles/cuda-h100.jsonl (measured weights, trainable
  parameters, gradients, optimizer state and allocated peak of real steps);
- REFERENCE.md: Llama-2-7B's published parameter counts, and PEFT's fp32 adapters with
  "4 + 4 + 8 = 16 bytes per trainable parameter" under torch AdamW;
- transformers / PEFT / bitsandbytes themselves: the meta model's trainable tensors, and
  the storages of a tiny NF4 model after `prepare_model_for_kbit_training` on the CPU;
- properties any correct max-over-phases obeys (drawn with hypothesis).
"""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import TINY_CONFIGS, build_model, storage_bytes
from memplan.errors import SetupError
from memplan.model.architectures import spec_from_config
from memplan.model.catalog import load_model, with_layers
from memplan.paths import profiles_dir
from memplan.training.device_terms import DeviceTerms
from memplan.training.estimate import Memory, estimate, trainable_numels
from memplan.training.setup import Setup

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- the committed GPU runs -----------------------------------------------------------------------


def _gpu_records() -> list[dict]:
    path = profiles_dir() / "cuda-h100.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if r["outcome"] == "ok"]


RECORDS = _gpu_records()
# Known gap, reported in the issue: int8 + all-linear + checkpointing (record 4307ad0f) is
# under-predicted by 12% at the allocated peak (bnb's int8 backward temporaries under
# recomputation are not modelled).
KNOWN_GAPS = {"4307ad0f": "int8 backward temporaries under checkpointing: -12% at the allocated peak"}


def _estimate_record(r: dict):
    setup = Setup.from_dict(r["setup"])
    return estimate(setup, model=with_layers(load_model(setup.model), r.get("layers")))


@pytest.mark.skipif(not RECORDS, reason="no committed CUDA profile records")
@pytest.mark.parametrize("rec", RECORDS, ids=[r["id"][:8] for r in RECORDS])
def test_persistent_memory_equals_the_measured_run(rec: dict) -> None:
    """Weights (incl. quant state and buffers), trainable count, gradients and optimizer
    state are exact: they are storage sizes, not fits."""
    est, m = _estimate_record(rec), rec["measured"]
    assert est.memory.weights == m["weights_bytes"]
    assert est.trainable_parameters == m["trainable_parameters"]
    assert est.memory.gradients == m["gradients_bytes"]
    assert est.memory.optimizer_states == m["optimizer_state_bytes"]
    assert est.memory.optimizer_paged == m["optimizer_paged_bytes"]


@pytest.mark.skipif(not RECORDS, reason="no committed CUDA profile records")
@pytest.mark.parametrize(
    "rec",
    [pytest.param(r, marks=pytest.mark.xfail(reason=KNOWN_GAPS[r["id"][:8]], strict=True)) if r["id"][:8] in KNOWN_GAPS else r
     for r in RECORDS],
    ids=[r["id"][:8] for r in RECORDS],
)
def test_allocated_peak_within_4_percent_of_the_measured_run(rec: dict) -> None:
    # Tolerance 4%: the largest error of the other committed records is 3.7% (int8, no
    # checkpointing); torch.cuda.max_memory_allocated rounds each block to 512 bytes.
    est = _estimate_record(rec)
    assert est.memory.allocated_peak == pytest.approx(rec["measured"]["steady_peak_bytes"], rel=0.04)


# ---- persistent bytes, hand-derived -----------------------------------------------------------------


@pytest.mark.parametrize(
    "model, rank, targets, published",
    [
        # REFERENCE.md "Exact counts that tests can pin".
        ("llama2-7b", 8, ("q_proj", "v_proj"), 4_194_304),
        ("llama2-7b", 16, ALL7 + ("lm_head",), 40_554_496),
        ("llama2-13b", 8, ("q_proj", "v_proj"), 6_553_600),
    ],
)
def test_lora_adamw_costs_16_bytes_per_trainable_parameter(model: str, rank: int, targets: tuple, published: int) -> None:
    # REFERENCE.md (PEFT autocast_adapter_dtype=True): fp32 adapter 4 + fp32 grad 4 + two fp32 Adam states 8.
    est = estimate(Setup(model=model, lora_rank=rank, lora_targets=targets))
    m = est.memory
    assert est.trainable_parameters == published
    assert (m.adapters, m.gradients, m.optimizer_states) == (4 * published, 4 * published, 8 * published)
    assert est.total_parameters == load_model(model).total_parameters
    assert est.adapter_dtype == "fp32"


def test_llama2_7b_bf16_weights_are_two_bytes_per_published_parameter() -> None:
    # REFERENCE.md: 6,738,415,616 parameters x 2 bytes, plus the rotary `inv_freq` buffers
    # (head_dim / 2 = 64 fp32 values each in transformers' LlamaRotaryEmbedding: inv_freq and
    # original_inv_freq, 2 x 256 bytes) = the 13,476,831,744 bytes the H100 run measured.
    est = estimate(Setup(model="llama2-7b"))
    assert est.total_parameters == 6_738_415_616
    assert est.memory.weights == 6_738_415_616 * 2 + 2 * 64 * 4 == 13_476_831_744


def test_full_finetune_adamw_bf16_states_are_in_the_parameter_dtype() -> None:
    # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (REFERENCE.md):
    # bf16 grads 2 + states 2 x 2 bytes per parameter. TinyLlama's 1,100,048,384 parameters are
    # the count the H100 record 0e7df903 measured as trainable.
    est = estimate(Setup(model="tinyllama-1.1b", method="full"))
    n = est.trainable_parameters
    assert n == est.total_parameters == 1_100_048_384
    assert (est.memory.adapters, est.memory.gradients, est.memory.optimizer_states) == (0, 2 * n, 4 * n)
    assert est.adapter_dtype is None and est.adapter_file_bytes == {}


def test_sgd_without_momentum_keeps_no_state() -> None:
    # torch.optim.SGD(momentum=0) creates no per-parameter state.
    est = estimate(Setup(model="tinyllama-1.1b", optimizer="sgd"))
    assert est.memory.optimizer_states == 0


# ---- against transformers / PEFT / bitsandbytes ------------------------------------------------------


# GPT-2/BERT specs hold a LayerNorm's weight and bias as one 2h tensor, so the per-tensor list
# differs from torch's (the sum does not). It matters only where a per-tensor threshold falls
# between h and 2h (bnb's 4096-element min_8bit_size for 2048 <= h < 4096). Reported in the issue.
_LAYERNORM_AS_ONE = pytest.mark.xfail(reason="LayerNorm weight+bias listed as one tensor", strict=True)


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=_LAYERNORM_AS_ONE) if f in ("gpt2", "bert") else f for f in sorted(TINY_CONFIGS)]
)
def test_full_trainable_tensors_are_the_meta_models_parameters(family: str) -> None:
    pytest.importorskip("transformers")
    cfg = TINY_CONFIGS[family]
    model = build_model(cfg, meta=True)
    numels = trainable_numels(spec_from_config(cfg, name=family), None)
    assert sum(numels) == sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    assert sorted(numels) == sorted(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_prepare_kbit_training_weights_equal_the_real_model(tmp_path, family: str, double_quant: bool) -> None:
    """PEFT's prepare_model_for_kbit_training casts every non-quantized parameter to fp32
    (REFERENCE.md); the estimate's weights must follow, byte for byte."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build_model(TINY_CONFIGS[family]).save_pretrained(tmp_path)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=qcfg, device_map="cpu")
    loaded = storage_bytes(model)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    prepared = storage_bytes(model)
    spec = spec_from_config(TINY_CONFIGS[family], name=family)
    setup = Setup(model=family, quant="nf4", double_quant=double_quant, device="cpu")
    assert estimate(setup, model=spec).memory.weights == loaded
    assert estimate(replace(setup, prepare_kbit_training=True), model=spec).memory.weights == prepared
    assert prepared > loaded


# ---- properties of the breakdown --------------------------------------------------------------------

SPECS = {f: spec_from_config(dict(TINY_CONFIGS[f], vocab_size=32_000), name=f) for f in ("llama", "mistral", "qwen2", "phi3", "gpt2")}

drawn = st.fixed_dictionaries(
    dict(
        family=st.sampled_from(sorted(SPECS)),
        method=st.sampled_from(["lora", "full"]),
        quant=st.sampled_from(["bf16", "fp16", "fp32", "int8", "nf4"]),
        rank=st.integers(1, 16),
        seq=st.integers(1, 64),
        batch=st.integers(1, 8),
        ckpt=st.booleans(),
        optimizer=st.sampled_from(["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"]),
        device=st.sampled_from(["cuda", "cpu"]),
    )
)


def _setup(d: dict) -> Setup:
    quantized = d["quant"] in ("int8", "nf4")
    return Setup(model=d["family"], method="lora" if quantized else d["method"], quant=d["quant"], lora_rank=d["rank"],
                 seq_len=d["seq"], batch_size=d["batch"], grad_checkpointing=d["ckpt"], optimizer=d["optimizer"],
                 device=d["device"])


@settings(max_examples=120, deadline=None)
@given(drawn)
def test_peak_breakdown_is_consistent_with_the_memory_fields(d: dict) -> None:
    """Beyond `parts sum to peak` (which estimate asserts itself): the persistent parts are the
    Memory fields, the phase-dependent parts never exceed their whole, and the peak is at least
    every phase it is the maximum of that can be written from the Memory fields alone."""
    spec, setup = SPECS[d["family"]], _setup(d)
    try:
        est = estimate(setup, model=spec)
    except SetupError:
        assume(False)
    m, parts = est.memory, est.peak_parts
    assert set(parts) == {"weights", "adapters", "optimizer_states", "gradients", "activations", "logits", "transients", "overhead"}
    assert (parts["weights"], parts["adapters"], parts["optimizer_states"], parts["overhead"]) == (
        m.weights, m.adapters, m.optimizer_states, m.overhead)
    assert 0 <= parts["gradients"] <= m.gradients
    assert parts["logits"] in (0, m.logits)
    assert parts["transients"] == m.transients
    persistent = m.weights + m.adapters + m.optimizer_states
    modelled = m.peak - m.overhead
    assert modelled >= persistent + m.gradients  # the optimizer step: every gradient alive
    assert modelled >= persistent + m.activations + m.logits  # the end of the forward
    assert m.overhead == est.device_terms.overhead_bytes(modelled)
    assert m.peak_phase in ("forward_layers", "forward_mlp", "forward", "backward_loss", "backward_final_norm", "backward_recompute",
                            "backward_layers", "backward_attention", "backward_layer_norm", "backward_layer_end",
                            "backward_first_layer", "backward_first_layer_norm", "backward_end", "optimizer_step")


def test_explicit_terms_replace_the_committed_ones() -> None:
    setup = Setup(model="llama2-7b")
    zero = estimate(setup, terms=DeviceTerms(device="cuda"))
    t = DeviceTerms(device="cuda", cuda_context_bytes=10**9, workspace_bytes=10**6, allocator_fraction=0.1)
    with_terms = estimate(setup, terms=t)
    assert zero.memory.overhead == 0 and zero.memory.peak == zero.memory.allocated_peak
    assert with_terms.memory.peak - with_terms.memory.overhead == zero.memory.peak
    assert with_terms.memory.overhead == 10**9 + 10**6 + int(0.1 * (zero.memory.peak + 10**6))


def test_to_dict_groups_the_fields_it_names() -> None:
    est = estimate(Setup(model="llama2-7b", quant="nf4", double_quant=True))
    d = json.loads(json.dumps(est.to_dict()))  # plain JSON
    mb, m = d["memory_bytes"], est.memory
    # A key named like a `Memory` field means exactly that field; sums say what they add.
    for name in set(mb) & {f.name for f in fields(Memory)}:
        assert mb[name] == getattr(m, name), name
    assert mb["weights"] == m.weights and "base_weights" not in mb
    assert mb["weights_and_adapters"] == m.weights + m.adapters > mb["weights"]
    assert mb["activations"] == m.activations
    assert mb["activations_and_logits"] == m.activations + m.logits > mb["activations"]
    assert mb["quant_state"] == est.weight_storage.quant_state > 0
    assert sum(d["peak_breakdown_bytes"].values()) == mb["peak"]
    assert d["parameters"]["trainable"] == 4_194_304  # REFERENCE.md, r=8 q,v (PEFT's llama default)
    assert sum(d["parameters"]["by_component"].values()) == d["parameters"]["total"] == 6_738_415_616
    assert d["setup"]["quant"] == "nf4" and d["lora"]["adapter_dtype"] == "fp32"
    # adapter files, per save dtype: 4 or 2 bytes per parameter plus a small safetensors header
    files = d["lora"]["adapter_file_bytes"]
    assert 4 * 4_194_304 < files["fp32"] < 4 * 4_194_304 + 100_000
    for half in ("bf16", "fp16"):  # headers differ by the dtype names ("BF16" vs "F16")
        assert 2 * 4_194_304 < files[half] < 2 * 4_194_304 + 100_000


def test_interleaved_specs_do_not_share_cached_parts() -> None:
    # The fixed parts are memoised by the spec's identity: two specs that differ only in
    # vocabulary must still get their own embedding bytes (2 bytes x 72 hidden x extra rows, x2 untied).
    a = spec_from_config(TINY_CONFIGS["llama"], name="a")
    b = spec_from_config(dict(TINY_CONFIGS["llama"], vocab_size=400), name="b")
    setup = Setup(model="x", method="full", device="cpu")
    wa, wb, wa2 = (estimate(setup, model=s).memory.weights for s in (a, b, a))
    assert wb - wa == 2 * 2 * 72 * 100
    assert wa2 == wa


# ---- input errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup, message",
    [
        # transformers 5: Gemma2ForCausalLM._supports_sdpa is False.
        (Setup(model="gemma2-9b", attention="sdpa"), "gemma2 has no SDPA attention.*--attention eager"),
        # GPT-2 has 1,024 learned positions (n_positions in its config.json).
        (Setup(model="gpt2", seq_len=1025), "exceeds gpt2's 1024 learned positions; use --seq-len <= 1024"),
        (Setup(model="mixtral-8x7b", quant="fp32", autocast="bf16"), "--autocast is modelled for .*not mixtral"),
    ],
)
def test_setups_the_model_cannot_run_are_errors(setup: Setup, message: str) -> None:
    with pytest.raises(SetupError, match=message):
        estimate(setup)


def test_gpt2_at_its_last_position_is_fine() -> None:
    assert estimate(Setup(model="gpt2", seq_len=1024, attention="eager")).memory.peak > 0
