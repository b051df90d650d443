"""The attention masks a decoder builds once per forward for eager attention.

transformers 5 (`masking_utils.py::create_causal_mask`, `create_sliding_window_causal_mask`) hands eager
attention a float mask of shape (batch, 1, seq, seq) in the input embeddings' dtype (`eager_mask`:
`torch.where(mask, 0, min_dtype)`), made once in the model's forward and passed to every layer; SDPA and
flash take none when nothing is padded (`sdpa_mask` with `allow_is_causal_skip`), as in the profiler's
batches. Llama, Mistral, Phi-3 and Mixtral make one (`mask_function`); Gemma2 always makes both a full
and a sliding-window one (`modeling_gemma2.py::Gemma2Model.forward`); Qwen2 adds the sliding one only when
some layer slides (`has_sliding_layers`).

The model's forward drops its masks when it returns, before the logits: without checkpointing they are
alive only inside the layers' forward (no op saves them: eager attention adds the mask to the scores).
With checkpointing every layer keeps its arguments for its rebuild, its mask among them, until its
backward: the masks the layers take live from the forward to layer 0's backward, like the rotary tables.
Ledger: tiny phi3 nf4 LoRA down_proj,gate_up_proj, eager s256 b1 gc, kbit-prep: the fp32 mask
(`masking_utils.py::eager_mask`, 262,144 bytes) alive at the loss's backward, -7.8% without it.
"""

from __future__ import annotations

from memplan.model.spec import ModelSpec
from memplan.training.activations_lora import GATED_FAMILIES, residual_bytes
from memplan.training.setup import Setup

__all__ = ["eager_masks"]


def _layer_types(spec: ModelSpec) -> list[str]:
    """Each layer's attention type as the config gives it (`layer_types`), or as the family's config class
    fills it in (`__post_init__`): Gemma2 alternates sliding and full from layer 0; Qwen2 slides from
    `max_window_layers` (default 28) on when `use_sliding_window` and `sliding_window` (default 4096) is
    set."""
    given = spec.config.get("layer_types")
    if isinstance(given, list) and len(given) == spec.num_layers:
        return [str(x) for x in given]
    if spec.model_type == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(spec.num_layers)]
    cfg = spec.config
    if spec.model_type == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window", 4096) is not None:
        first = int(cfg.get("max_window_layers", 28))
        return ["sliding_attention" if i >= first else "full_attention" for i in range(spec.num_layers)]
    return ["full_attention"] * spec.num_layers


def eager_masks(spec: ModelSpec, setup: Setup) -> tuple[int, int]:
    """(bytes of the masks made, bytes of those the layers take) for one forward; (0, 0) but for eager
    attention on a llama-style decoder (GPT-2 and BERT: `activations_classic`)."""
    if setup.attention != "eager" or spec.model_type not in GATED_FAMILIES:
        return 0, 0
    used = set(_layer_types(spec))
    if spec.model_type == "gemma2":
        made = 2
    elif spec.model_type == "qwen2":
        made = 1 + ("sliding_attention" in used)
    else:
        made = 1
    one = residual_bytes(setup) * setup.batch_size * setup.seq_len * setup.seq_len
    return made * one, min(len(used), made) * one
