"""memplan.training.activations_mask: the masks a decoder builds for eager attention, against
transformers' own forward.

Reference values: the tensors transformers' mask builders (`masking_utils.create_causal_mask`,
`create_sliding_window_causal_mask`, as each model's module calls them) return during a real forward of a
tiny random-weight model (tests/conftest.py TINY_CONFIGS), and the attention type its config class gives
each layer (`config.layer_types`; llama's has none: every layer full); no tolerance: bytes are exact.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest

from conftest import TINY_CONFIGS, build_model  # tests/conftest.py

from memplan.model.architectures import spec_from_config
from memplan.training.activations_mask import eager_masks
from memplan.training.setup import Setup

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "gemma2", "phi3")
BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


def _masks_made(model, family: str, *, batch: int, seq: int) -> int:
    """Bytes of the tensors the model's mask builders return in one forward."""
    module = sys.modules[type(model.model).__module__]
    made: list[int] = []
    originals = {name: getattr(module, name) for name in BUILDERS if hasattr(module, name)}

    def recording(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                made.append(out.untyped_storage().nbytes())
            return out
        return call

    try:
        for name, fn in originals.items():
            setattr(module, name, recording(fn))
        with torch.no_grad():
            model(input_ids=torch.zeros(batch, seq, dtype=torch.long), use_cache=False)
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    return sum(made)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_masks_made_are_the_ones_transformers_builds(family: str, dtype: str) -> None:
    batch, seq = 2, 9
    cfg = dict(TINY_CONFIGS[family])
    model = build_model(cfg, dtype=dtype)
    model.config._attn_implementation = "eager"
    spec = spec_from_config(cfg, name=family)
    setup = Setup(model=family, method="full", quant=dtype, compute_dtype=dtype if dtype != "fp32" else "bf16",
                  attention="eager", seq_len=seq, batch_size=batch, device="cpu")
    assert eager_masks(spec, setup)[0] == _masks_made(model, family, batch=batch, seq=seq)


def test_sdpa_builds_no_mask_memplan_counts() -> None:
    spec = spec_from_config(TINY_CONFIGS["llama"], name="llama")
    setup = Setup(model="llama", method="full", quant="bf16", attention="sdpa", seq_len=9, batch_size=2, device="cpu")
    model = build_model(TINY_CONFIGS["llama"], dtype="bf16")
    model.config._attn_implementation = "sdpa"
    assert eager_masks(spec, setup) == (0, 0) and _masks_made(model, "llama", batch=2, seq=9) == 0


@pytest.mark.parametrize("family,layers,extra", [
    ("gemma2", 1, {}), ("gemma2", 3, {}), ("qwen2", 2, {}), ("llama", 2, {}),
    # Qwen2's sliding layers start at max_window_layers (28 when the config leaves it out).
    ("qwen2", 30, {"use_sliding_window": True}), ("qwen2", 3, {"use_sliding_window": True, "max_window_layers": 1}),
    ("qwen2", 30, {"use_sliding_window": True, "sliding_window": None}),
])
def test_masks_taken_are_one_per_attention_type_the_layers_use(family: str, layers: int, extra: dict) -> None:
    from transformers import AutoConfig

    cfg = {**TINY_CONFIGS[family], "num_hidden_layers": layers, **extra}
    config = AutoConfig.for_model(**cfg)
    spec = spec_from_config(cfg, name=family)
    setup = Setup(model=family, method="full", quant="bf16", attention="eager", seq_len=9, batch_size=2, device="cpu")
    made, taken = eager_masks(spec, setup)
    one = 2 * 2 * 9 * 9  # bf16 (batch, 1, seq, seq)
    types = getattr(config, "layer_types", None) or ["full_attention"] * layers  # llama's config has none
    assert taken == one * len(set(types))
    assert made >= taken
    assert eager_masks(spec, dataclasses.replace(setup, grad_checkpointing=True)) == (made, taken)
