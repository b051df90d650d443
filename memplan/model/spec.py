"""What a model is made of, as memplan sees it: frozen, typed, torch-free.

A `ModelSpec` lists every parameter tensor of the model exactly once (tied
weights counted once), grouped into `Linear` layers (the modules PEFT can wrap
and bitsandbytes can quantize) and `Tensor`s (embeddings, norms, biases kept
outside linears, fused expert weights). Everything else is derived from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Component", "COMPONENTS", "Linear", "Tensor", "Buffer", "ModelSpec", "ParameterBreakdown"]

Component = Literal["embeddings", "attention", "mlp", "experts", "router", "norms", "lm_head", "head"]
COMPONENTS: tuple[Component, ...] = ("embeddings", "attention", "mlp", "experts", "router", "norms", "lm_head", "head")


@dataclass(frozen=True)
class Linear:
    """One `nn.Linear` (or GPT-2 `Conv1D`) shape, repeated `count` times.

    `name` is the leaf module name PEFT matches (`q_proj`, `c_attn`, `query`);
    `path` is the full module path with `{i}` for the layer index.
    """

    name: str
    path: str
    in_features: int
    out_features: int
    bias: bool
    count: int
    component: Component
    is_output: bool = False  # the model's output embedding (lm_head / MLM decoder)
    tied: bool = False  # weight shared with the input embedding: counted there, never quantized

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def numel(self) -> int:
        """Parameters this instance owns: weight (unless tied) plus bias."""
        return (0 if self.tied else self.weight_numel) + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Tensor:
    """A parameter outside any linear (embedding table, norm weight, fused experts)."""

    name: str
    path: str
    numel: int
    count: int
    component: Component


@dataclass(frozen=True)
class Buffer:
    """A registered buffer (rotary `inv_freq`, BERT `position_ids`): stored, not trained."""

    path: str
    numel: int
    itemsize: int
    count: int = 1
    # True for a buffer made from a Python float under the default dtype that
    # `from_pretrained(dtype=...)` sets while building the model (Gemma2's
    # `torch.tensor(embed_scale)`): it takes the load dtype, not `itemsize`.
    follows_load_dtype: bool = False

    @property
    def bytes(self) -> int:
        return self.numel * self.itemsize * self.count

    def loaded_bytes(self, load_itemsize: int) -> int:
        """Bytes after loading in a dtype of `load_itemsize` bytes per element."""
        return self.numel * (load_itemsize if self.follows_load_dtype else self.itemsize) * self.count


@dataclass(frozen=True)
class ParameterBreakdown:
    """Parameter counts per component; `total` is their sum."""

    by_component: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_component.values())


@dataclass(frozen=True)
class ModelSpec:
    """A model architecture reduced to the numbers memory depends on."""

    name: str
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    linears: tuple[Linear, ...]
    tensors: tuple[Tensor, ...]
    buffers: tuple[Buffer, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0
    is_causal_lm: bool = True
    torch_dtype: str = "bfloat16"
    keep_in_fp32_modules: tuple[str, ...] = ()
    # Gemma2's tanh softcapping of the attention scores and of the logits (None: off).
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # A rotary embedding that ends in `torch.cat` (Phi-3's partial rotary: `modeling_phi3.py::
    # apply_rotary_pos_emb`) returns a head-major q, so SDPA's output is head-major too and
    # `sdpa_attention.py`'s `attn_output.transpose(1, 2).contiguous()` copies it (elementwise rope, as
    # llama's, keeps q's token-major strides and the transpose is free).
    rope_concatenates: bool = False
    source: str = ""
    config: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -------------------------------------------------------------
    def parameters(self) -> ParameterBreakdown:
        by: dict[str, int] = {c: 0 for c in COMPONENTS}
        for lin in self.linears:
            by[lin.component] += lin.numel * lin.count
        for t in self.tensors:
            by[t.component] += t.numel * t.count
        return ParameterBreakdown({k: v for k, v in by.items() if v})

    @property
    def total_parameters(self) -> int:
        return self.parameters().total

    @property
    def active_parameters(self) -> int:
        """Parameters touched per token: for MoE, only `experts_per_token` of the experts."""
        total = self.total_parameters
        if not self.num_experts:
            return total
        experts = sum(t.numel * t.count for t in self.tensors if t.component == "experts")
        return total - experts + experts * self.experts_per_token // self.num_experts

    @property
    def tied_table(self) -> "Tensor | None":
        """The input embedding table a tied output head shares (its weight is counted there, once),
        or None when the head has its own weight."""
        if not any(lin.is_output and lin.tied for lin in self.linears):
            return None
        return next((t for t in self.tensors if t.component == "embeddings" and t.numel == self.vocab_size * self.hidden_size), None)

    @property
    def tied_numel(self) -> int:
        """Elements of the tied table (`tied_table`) over all its instances; 0 without one."""
        t = self.tied_table
        return t.numel * t.count if t is not None else 0

    @property
    def fused_qkv(self) -> bool:
        """q, k and v come out of one projection (Phi-3's qkv_proj), of whose output v is a slice."""
        return any(lin.name == "qkv_proj" for lin in self.linears)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Leaf names of the linear modules, in model order, without duplicates."""
        return tuple(dict.fromkeys(lin.name for lin in self.linears))

    def linear(self, name: str) -> Linear:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(name)

    @property
    def kv_bytes_per_token_per_byte(self) -> int:
        """K and V elements per token across layers (multiply by the element size)."""
        # KV cache = 2 (K and V) * layers * kv_heads * head_dim elements per token
        # (vllm/v1/kv_cache_interface.py::AttentionSpec.page_size_bytes, per layer and block)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim
