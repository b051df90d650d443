"""Hugging Face `config.json` -> `ModelSpec`, one builder per model family.

Each builder mirrors the `__init__` of the family's modeling file in
transformers 5.x (`models/<family>/modeling_<family>.py`): the same module
names, shapes, biases and tying. Tests check every builder against
transformers' own meta-device parameter count. No torch import here.
"""

from __future__ import annotations

from typing import Any, Callable

from memplan.errors import ConfigError, UnsupportedArchitectureError
from memplan.model.spec import Buffer, Linear, ModelSpec, Tensor

__all__ = ["SUPPORTED_MODEL_TYPES", "spec_from_config", "DEFAULT_LORA_TARGETS", "default_attention", "MAX_LAYERS"]

# No released model comes near this; a larger count is a typo or a hostile config, and
# per-layer accounting (adapter file headers) would take seconds.
MAX_LAYERS = 10_000


def default_attention(spec: "ModelSpec") -> str:
    """The attention transformers 5.x picks when none is asked for: SDPA where the model
    supports it; Gemma2 (`_supports_sdpa = False`, its softcapping) runs eager."""
    return "eager" if spec.model_type == "gemma2" else "sdpa"

# PEFT's per-family default `target_modules`
# (peft/utils/constants.py, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
# PEFT 0.21 has no entry for phi3 (LoraConfig() without target_modules raises there);
# memplan uses qkv_proj, the fused module holding PEFT's usual q_proj/v_proj choice.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
}


class _Cfg:
    """Typed, validating access to a config dict; errors name the field."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def int(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.raw.get(key, default)
        if value is None:
            if default is not None:
                return default
            raise ConfigError(f"{self.where}: missing field '{key}' (a positive integer); add it to the config")
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{self.where}: field '{key}' must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.where}: field '{key}' must be >= {minimum}, got {value}")
        if value > 10**9:
            raise ConfigError(f"{self.where}: field '{key}' = {value} is implausibly large")
        return value

    def opt_int(self, key: str, default: int) -> int:
        return self.int(key, default) if self.raw.get(key) is not None else default

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: field '{key}' must be true or false, got {value!r}")
        return value

    def float(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.where}: field '{key}' must be a number, got {value!r}")
        return float(value)

    def str(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        return default if value is None else str(value)


def _rotary_buffers(head_dim: int, partial: float = 1.0) -> tuple[Buffer, ...]:
    # transformers/modeling_rope_utils.py + <Family>RotaryEmbedding: `inv_freq` and
    # `original_inv_freq`, each rotary_dim // 2 fp32 values (non-persistent buffers).
    half = int(head_dim * partial) // 2
    return (Buffer("model.rotary_emb.inv_freq", half, 4), Buffer("model.rotary_emb.original_inv_freq", half, 4))


def _decoder(
    c: _Cfg,
    *,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    tie_default: bool,
    fused: bool = False,
    norms_per_layer: int = 2,
    experts: int = 0,
    head_dim: int | None = None,
) -> dict[str, Any]:
    """Shared shape of llama-style decoders (llama, mistral, qwen2, gemma2, phi3, mixtral)."""
    h = c.int("hidden_size")
    n_layers = c.int("num_hidden_layers")
    n_heads = c.int("num_attention_heads")
    n_kv = c.opt_int("num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"{c.where}: num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})")
    if head_dim is None:
        if c.raw.get("head_dim") is not None:
            head_dim = c.int("head_dim")
        else:
            if h % n_heads:
                raise ConfigError(f"{c.where}: hidden_size ({h}) must be divisible by num_attention_heads ({n_heads}), or give head_dim")
            head_dim = h // n_heads
    inter = c.int("intermediate_size")
    vocab = c.int("vocab_size")
    tie = c.bool("tie_word_embeddings", tie_default)
    L = n_layers
    q_out, kv_out = n_heads * head_dim, n_kv * head_dim
    att = "model.layers.{i}.self_attn."
    mlp = "model.layers.{i}.mlp."
    if fused:  # phi3: modeling_phi3.py Phi3Attention.qkv_proj, Phi3MLP.gate_up_proj
        linears = [
            Linear("qkv_proj", att + "qkv_proj", h, q_out + 2 * kv_out, qkv_bias, L, "attention"),
            Linear("o_proj", att + "o_proj", q_out, h, o_bias, L, "attention"),
            Linear("gate_up_proj", mlp + "gate_up_proj", h, 2 * inter, mlp_bias, L, "mlp"),
            Linear("down_proj", mlp + "down_proj", inter, h, mlp_bias, L, "mlp"),
        ]
    else:
        linears = [
            Linear("q_proj", att + "q_proj", h, q_out, qkv_bias, L, "attention"),
            Linear("k_proj", att + "k_proj", h, kv_out, qkv_bias, L, "attention"),
            Linear("v_proj", att + "v_proj", h, kv_out, qkv_bias, L, "attention"),
            Linear("o_proj", att + "o_proj", q_out, h, o_bias, L, "attention"),
        ]
        if not experts:
            linears += [
                Linear("gate_proj", mlp + "gate_proj", h, inter, mlp_bias, L, "mlp"),
                Linear("up_proj", mlp + "up_proj", h, inter, mlp_bias, L, "mlp"),
                Linear("down_proj", mlp + "down_proj", inter, h, mlp_bias, L, "mlp"),
            ]
    linears.append(Linear("lm_head", "lm_head", h, vocab, False, 1, "lm_head", is_output=True, tied=tie))
    tensors = [Tensor("embed_tokens", "model.embed_tokens.weight", vocab * h, 1, "embeddings")]
    if experts:
        # modeling_mixtral.py (transformers 5): the router is `MixtralTopKRouter`, a bare
        # (experts x hidden) Parameter used through F.linear -- not an nn.Linear, so
        # bitsandbytes leaves it unquantized and PEFT reaches it only as a
        # `target_parameters` entry (see lora.py). MixtralExperts holds the experts as
        # 3D Parameters (also never quantized).
        tensors += [
            Tensor("gate", mlp + "gate.weight", experts * h, L, "router"),
            Tensor("experts.gate_up_proj", mlp + "experts.gate_up_proj", experts * 2 * inter * h, L, "experts"),
            Tensor("experts.down_proj", mlp + "experts.down_proj", experts * h * inter, L, "experts"),
        ]
    tensors += [
        Tensor("layernorm", "model.layers.{i}.*_layernorm.weight", h, L * norms_per_layer, "norms"),
        Tensor("norm", "model.norm.weight", h, 1, "norms"),
    ]
    return dict(
        hidden_size=h,
        num_layers=L,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=c.opt_int("max_position_embeddings", 2048),
        tie_word_embeddings=tie,
        hidden_act=c.str("hidden_act", "silu"),
        linears=tuple(linears),
        tensors=tuple(tensors),
        buffers=_rotary_buffers(head_dim, c.float("partial_rotary_factor", 1.0)),
    )


def _llama(c: _Cfg) -> dict[str, Any]:
    # modeling_llama.py: attention_bias on q,k,v,o; mlp_bias on gate,up,down.
    ab, mb = c.bool("attention_bias", False), c.bool("mlp_bias", False)
    return _decoder(c, qkv_bias=ab, o_bias=ab, mlp_bias=mb, tie_default=False)


def _mistral(c: _Cfg) -> dict[str, Any]:
    return _decoder(c, qkv_bias=False, o_bias=False, mlp_bias=False, tie_default=False)


def _qwen2(c: _Cfg) -> dict[str, Any]:
    # modeling_qwen2.py: q_proj, k_proj, v_proj have bias=True; o_proj and the MLP none.
    return _decoder(c, qkv_bias=True, o_bias=False, mlp_bias=False, tie_default=False)


def _mixtral(c: _Cfg) -> dict[str, Any]:
    d = _decoder(c, qkv_bias=False, o_bias=False, mlp_bias=False, tie_default=False, experts=c.int("num_local_experts"))
    d["num_experts"] = c.int("num_local_experts")
    d["experts_per_token"] = c.int("num_experts_per_tok", 2)
    return d


def _gemma2(c: _Cfg) -> dict[str, Any]:
    # modeling_gemma2.py: head_dim from config (default 256), four norms per layer,
    # tied embeddings, and a 0-d `embed_scale` buffer on the embedding (in the load dtype).
    ab = c.bool("attention_bias", False)
    d = _decoder(c, qkv_bias=ab, o_bias=ab, mlp_bias=False, tie_default=True, norms_per_layer=4, head_dim=c.int("head_dim", 256))
    d["buffers"] = d["buffers"] + (Buffer("model.embed_tokens.embed_scale", 1, 4, follows_load_dtype=True),)
    d["hidden_act"] = c.str("hidden_activation", c.str("hidden_act", "gelu_pytorch_tanh"))
    # configuration_gemma2.py::Gemma2Config: attn_logit_softcapping=50.0, final_logit_softcapping=30.0
    # when the config leaves them out; an explicit null turns one off.
    for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
        d[key] = c.float(key, default) if c.raw.get(key, default) is not None else None
    return d


def _phi3(c: _Cfg) -> dict[str, Any]:
    d = _decoder(c, qkv_bias=False, o_bias=False, mlp_bias=False, tie_default=False, fused=True)
    d["rope_concatenates"] = True  # modeling_phi3.py::apply_rotary_pos_emb: torch.cat([rotated, passed])
    return d


def _gpt2(c: _Cfg) -> dict[str, Any]:
    # modeling_gpt2.py: Conv1D c_attn (H -> 3H), c_proj, c_fc (H -> n_inner), all with bias;
    # LayerNorms with weight and bias; wte + wpe; lm_head tied to wte by default.
    h = c.int("n_embd")
    L = c.int("n_layer")
    heads = c.int("n_head")
    if h % heads:
        raise ConfigError(f"{c.where}: n_embd ({h}) must be divisible by n_head ({heads})")
    inner = c.opt_int("n_inner", 4 * h)
    vocab = c.int("vocab_size")
    pos = c.int("n_positions")
    tie = c.bool("tie_word_embeddings", True)
    blk = "transformer.h.{i}."
    linears = (
        Linear("c_attn", blk + "attn.c_attn", h, 3 * h, True, L, "attention"),
        Linear("c_proj", blk + "attn.c_proj", h, h, True, L, "attention"),
        Linear("c_fc", blk + "mlp.c_fc", h, inner, True, L, "mlp"),
        Linear("c_proj", blk + "mlp.c_proj", inner, h, True, L, "mlp"),
        Linear("lm_head", "lm_head", h, vocab, False, 1, "lm_head", is_output=True, tied=tie),
    )
    tensors = (
        Tensor("wte", "transformer.wte.weight", vocab * h, 1, "embeddings"),
        Tensor("wpe", "transformer.wpe.weight", pos * h, 1, "embeddings"),
        Tensor("ln", "transformer.h.{i}.ln_*", 2 * h, 2 * L, "norms"),
        Tensor("ln_f", "transformer.ln_f", 2 * h, 1, "norms"),
    )
    return dict(
        hidden_size=h, num_layers=L, num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
        intermediate_size=inner, vocab_size=vocab, max_position_embeddings=pos, tie_word_embeddings=tie,
        hidden_act=c.str("activation_function", "gelu_new"), linears=linears, tensors=tensors,
    )


def _bert(c: _Cfg) -> dict[str, Any]:
    # modeling_bert.py, BertForMaskedLM: BertModel without pooler + BertOnlyMLMHead
    # (transform.dense H->H, transform.LayerNorm, decoder tied to word embeddings,
    # decoder bias = cls.predictions.bias). Buffers: position_ids, token_type_ids (int64).
    h = c.int("hidden_size")
    L = c.int("num_hidden_layers")
    heads = c.int("num_attention_heads")
    if h % heads:
        raise ConfigError(f"{c.where}: hidden_size ({h}) must be divisible by num_attention_heads ({heads})")
    inter = c.int("intermediate_size")
    vocab = c.int("vocab_size")
    pos = c.int("max_position_embeddings")
    types = c.int("type_vocab_size", 2)
    tie = c.bool("tie_word_embeddings", True)
    lay = "bert.encoder.layer.{i}."
    linears = (
        Linear("query", lay + "attention.self.query", h, h, True, L, "attention"),
        Linear("key", lay + "attention.self.key", h, h, True, L, "attention"),
        Linear("value", lay + "attention.self.value", h, h, True, L, "attention"),
        Linear("dense", lay + "attention.output.dense", h, h, True, L, "attention"),
        Linear("dense", lay + "intermediate.dense", h, inter, True, L, "mlp"),
        Linear("dense", lay + "output.dense", inter, h, True, L, "mlp"),
        Linear("dense", "cls.predictions.transform.dense", h, h, True, 1, "head"),
        Linear("decoder", "cls.predictions.decoder", h, vocab, False, 1, "lm_head", is_output=True, tied=tie),
    )
    tensors = (
        Tensor("word_embeddings", "bert.embeddings.word_embeddings.weight", vocab * h, 1, "embeddings"),
        Tensor("position_embeddings", "bert.embeddings.position_embeddings.weight", pos * h, 1, "embeddings"),
        Tensor("token_type_embeddings", "bert.embeddings.token_type_embeddings.weight", types * h, 1, "embeddings"),
        Tensor("LayerNorm", "*.LayerNorm", 2 * h, 2 * L + 2, "norms"),
        Tensor("predictions.bias", "cls.predictions.bias", vocab, 1, "head"),
    )
    buffers = (Buffer("bert.embeddings.position_ids", pos, 8), Buffer("bert.embeddings.token_type_ids", pos, 8))
    return dict(
        hidden_size=h, num_layers=L, num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=pos, tie_word_embeddings=tie,
        hidden_act=c.str("hidden_act", "gelu"), linears=linears, tensors=tensors, buffers=buffers,
        is_causal_lm=False,
    )


_BUILDERS: dict[str, tuple[Callable[[_Cfg], dict[str, Any]], str]] = {
    "llama": (_llama, "LlamaForCausalLM"),
    "mistral": (_mistral, "MistralForCausalLM"),
    "mixtral": (_mixtral, "MixtralForCausalLM"),
    "qwen2": (_qwen2, "Qwen2ForCausalLM"),
    "gemma2": (_gemma2, "Gemma2ForCausalLM"),
    "phi3": (_phi3, "Phi3ForCausalLM"),
    "gpt2": (_gpt2, "GPT2LMHeadModel"),
    "bert": (_bert, "BertForMaskedLM"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def spec_from_config(config: dict[str, Any], *, name: str, source: str = "") -> ModelSpec:
    """Build a `ModelSpec` from a parsed `config.json` dict."""
    if not isinstance(config, dict):
        raise ConfigError(f"{name}: a config must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        raise ConfigError(f"{name}: missing field 'model_type'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in _BUILDERS:
        raise UnsupportedArchitectureError(
            f"{name}: model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    builder, default_arch = _BUILDERS[model_type]
    fields = builder(_Cfg(config, name))
    archs = config.get("architectures") or [default_arch]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{name}: field 'architectures' must be a list of class names, got {archs!r}")
    if fields["num_layers"] > MAX_LAYERS:
        raise ConfigError(f"{name}: {fields['num_layers']:,} layers is implausibly large (at most {MAX_LAYERS:,}); check the config")
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    keep_fp32 = tuple(config.get("_keep_in_fp32_modules") or ())
    return ModelSpec(
        name=name,
        model_type=model_type,
        architecture=str(archs[0]),
        torch_dtype=str(dtype),
        keep_in_fp32_modules=keep_fp32,
        source=source,
        config=config,
        **fields,
    )
