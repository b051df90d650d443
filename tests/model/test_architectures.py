"""`spec_from_config` against transformers itself.

Reference: the model transformers builds from the same config on the `meta`
device (no memory, no download). Totals are `sum(p.numel())` over
`named_parameters()`, which lists a tied weight once; components group those
parameters by module path; the inventory is every `nn.Linear` / GPT-2 `Conv1D`.
All comparisons are exact.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import TINY_CONFIGS, build_model  # noqa: E402
from memplan.model.architectures import SUPPORTED_MODEL_TYPES, spec_from_config  # noqa: E402
from memplan.model.catalog import catalog, load_model  # noqa: E402
from memplan.model.spec import ModelSpec  # noqa: E402

CATALOG = [e.name for e in catalog()]
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# ---- the reference side: read off the meta model ---------------------------------------------
def component_of(name: str) -> str:
    """Component of a parameter, from its module path alone (independent of memplan)."""
    if re.search(r"norm|ln_\d|ln_f|LayerNorm", name):
        return "norms"
    if re.search(r"embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings", name):
        return "embeddings"
    if name.startswith("lm_head") or name.startswith("cls.predictions.decoder"):
        return "lm_head"
    if name.startswith("cls."):
        return "head"
    if ".experts." in name:
        return "experts"
    if ".mlp.gate." in name:
        return "router"
    if re.search(r"self_attn|\.attn\.|\.attention\.", name):
        return "attention"
    if re.search(r"\.mlp\.|\.intermediate\.|\.output\.dense", name):
        return "mlp"
    raise AssertionError(f"unclassified parameter {name}")


def reference_components(model) -> dict[str, int]:
    by: Counter[str] = Counter()
    for name, p in model.named_parameters():  # tied weights appear once
        by[component_of(name)] += p.numel()
    return dict(by)


def reference_linears(model) -> Counter:
    """(leaf name, in, out, owns bias, weight tied) -> count, for every nn.Linear / Conv1D."""
    import torch
    from transformers.pytorch_utils import Conv1D

    params = dict(model.named_parameters())
    inventory: Counter = Counter()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            d_in, d_out = mod.in_features, mod.out_features
        elif isinstance(mod, Conv1D):  # weight is (in, out)
            d_in, d_out = mod.weight.shape
        else:
            continue
        owns_bias = mod.bias is not None and f"{name}.bias" in params
        tied = f"{name}.weight" not in params
        inventory[(name.rsplit(".", 1)[-1], int(d_in), int(d_out), owns_bias, tied)] += 1
    return inventory


def spec_linears(spec: ModelSpec) -> Counter:
    inventory: Counter = Counter()
    for lin in spec.linears:
        inventory[(lin.name, lin.in_features, lin.out_features, lin.bias, lin.tied)] += lin.count
    return inventory


def reference_buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for _, b in model.named_buffers())


def assert_matches_transformers(spec: ModelSpec, model) -> None:
    total = sum(p.numel() for _, p in model.named_parameters())
    assert spec.total_parameters == total
    assert spec.parameters().by_component == reference_components(model)
    assert sum(spec.parameters().by_component.values()) == spec.total_parameters  # parts add up
    assert spec_linears(spec) == reference_linears(model)
    # fp32 meta model: every buffer in its creation dtype
    assert sum(b.loaded_bytes(4) for b in spec.buffers) == reference_buffer_bytes(model)


def catalog_config(name: str) -> dict:
    entry = next(e for e in catalog() if e.name == name)
    return json.loads(entry.path.read_text())["config"]


# ---- every catalog model -----------------------------------------------------------------------
@pytest.mark.parametrize("name", CATALOG)
def test_catalog_model_matches_transformers(name: str) -> None:
    spec = load_model(name)
    assert_matches_transformers(spec, build_model(catalog_config(name), meta=True))


def test_catalog_covers_every_family() -> None:
    assert {load_model(n).model_type for n in CATALOG} == set(SUPPORTED_MODEL_TYPES)


# ---- the tiny configs the other tests load for real ----------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_tiny_config_matches_transformers(family: str) -> None:
    cfg = TINY_CONFIGS[family]
    assert_matches_transformers(spec_from_config(cfg, name=family), build_model(cfg, meta=True))


# ---- random small configs of every family (hypothesis) --------------------------------------------
@st.composite
def decoder_configs(draw, model_type: str) -> dict:
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    cfg = dict(
        model_type=model_type,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        hidden_size=heads * head_dim,
        intermediate_size=draw(st.integers(4, 96)),
        num_hidden_layers=draw(st.integers(1, 3)),
        vocab_size=draw(st.integers(8, 300)),
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    if model_type in ("llama", "qwen2", "gemma2", "mistral", "phi3"):
        cfg["tie_word_embeddings"] = draw(st.booleans())
    if model_type == "llama":
        cfg["attention_bias"] = draw(st.booleans())
        cfg["mlp_bias"] = draw(st.booleans())
    if model_type == "gemma2":  # head_dim independent of hidden/heads
        cfg["head_dim"] = draw(st.sampled_from([4, 8, 24]))
    if model_type == "mixtral":
        cfg["num_local_experts"] = draw(st.integers(2, 5))
        cfg["num_experts_per_tok"] = draw(st.integers(1, 2))
    return cfg


@st.composite
def gpt2_configs(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        model_type="gpt2", n_head=heads, n_embd=heads * draw(st.sampled_from([4, 8, 16])),
        n_layer=draw(st.integers(1, 3)), n_positions=draw(st.integers(4, 64)), vocab_size=draw(st.integers(8, 300)),
        n_inner=draw(st.one_of(st.none(), st.integers(4, 96))), tie_word_embeddings=draw(st.booleans()),
        bos_token_id=0, eos_token_id=0,
    )


@st.composite
def bert_configs(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        model_type="bert", num_attention_heads=heads, hidden_size=heads * draw(st.sampled_from([4, 8, 16])),
        intermediate_size=draw(st.integers(4, 96)), num_hidden_layers=draw(st.integers(1, 3)),
        max_position_embeddings=draw(st.integers(4, 64)), type_vocab_size=draw(st.integers(1, 3)),
        vocab_size=draw(st.integers(8, 300)), pad_token_id=0,
    )


@pytest.mark.parametrize("model_type", ["llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3"])
@FEW
@given(data=st.data())
def test_random_decoder_configs_match_transformers(model_type: str, data) -> None:
    cfg = data.draw(decoder_configs(model_type))
    assert_matches_transformers(spec_from_config(cfg, name=model_type), build_model(cfg, meta=True))


@FEW
@given(cfg=gpt2_configs())
def test_random_gpt2_configs_match_transformers(cfg: dict) -> None:
    assert_matches_transformers(spec_from_config(cfg, name="gpt2"), build_model(cfg, meta=True))


@FEW
@given(cfg=bert_configs())
def test_random_bert_configs_match_transformers(cfg: dict) -> None:
    assert_matches_transformers(spec_from_config(cfg, name="bert"), build_model(cfg, meta=True))


# ---- what the spec says about MoE -------------------------------------------------------------------
def test_mixtral_router_and_experts_are_not_linears() -> None:
    """transformers 5 Mixtral: the router is MixtralTopKRouter (a bare Parameter) and the
    experts are 3D Parameters, so neither is an nn.Linear that bitsandbytes or PEFT's
    module targeting can see (checked against the meta model by the inventory above)."""
    spec = load_model("mixtral-8x7b")
    assert "gate" not in spec.linear_names
    model = build_model(catalog_config("mixtral-8x7b"), meta=True)
    assert {name for name, *_ in reference_linears(model)} == set(spec.linear_names)


def test_mixtral_active_parameters_count_top_k_experts() -> None:
    # Active per token = everything but the experts + k/E of the experts; the expert
    # share is read off the meta model.
    cfg = catalog_config("mixtral-8x7b")
    model = build_model(cfg, meta=True)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for _, p in model.named_parameters())
    k, e = cfg["num_experts_per_tok"], cfg["num_local_experts"]
    assert load_model("mixtral-8x7b").active_parameters == total - experts + experts * k // e
