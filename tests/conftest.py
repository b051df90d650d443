"""Shared fixtures: tiny configs of every supported family and torch-side helpers.

The reference numbers in the tests come from transformers, PEFT and
bitsandbytes themselves (a model built from the same config), never from
memplan. torch is imported inside the helpers, so estimator-only tests run
without it.
"""

from __future__ import annotations

import pytest

# One tiny config per family: hidden 64-128, 2 layers, vocab <= 500. Some linears have a
# numel that is not a multiple of the 64-value NF4 block (llama gate/up/down: 72 x 100),
# and qwen2/bert/gpt2 carry biases. `pad_token_id=0` keeps every padding index in range.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300, pad_token_id=0),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, vocab_size=200, pad_token_id=0),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True, pad_token_id=0),
    "mixtral": dict(model_type="mixtral", hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=500, pad_token_id=0),
    "gemma2": dict(model_type="gemma2", hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=48, vocab_size=500, pad_token_id=0),
    "phi3": dict(model_type="phi3", hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=500, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=96, n_layer=2, n_head=4, n_inner=200, n_positions=64, vocab_size=500,
                 bos_token_id=0, eos_token_id=0),
    "bert": dict(model_type="bert", hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, vocab_size=500, pad_token_id=0),
}

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Report tables a test leaves for the end of the run (printed even under -q and output capture).
REPORTS: pytest.StashKey[dict[str, str]] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/measure/conftest.py: pytest reads options from initial conftests only.
    parser.addoption("--validation-seed", type=int, default=None,
                     help="seed of the random CPU validation draw (tests/measure/conftest.py); default: a fresh one, printed")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORTS] = {}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for title, text in config.stash.get(REPORTS, {}).items():
        terminalreporter.section(title)
        terminalreporter.write(text)


@pytest.fixture(autouse=True, scope="session")
def _no_user_device_terms(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests see the shipped device terms, never a calibration in the developer's config folder."""
    import os

    os.environ["MEMPLAN_DEVICE_TERMS"] = str(tmp_path_factory.mktemp("user-config") / "device_terms.json")


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, dict]:
    return {k: dict(v) for k, v in TINY_CONFIGS.items()}


def hf_config(cfg: dict):
    """transformers' own config object for a config dict."""
    from transformers import AutoConfig

    raw = dict(cfg)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def build_model(cfg: dict, *, meta: bool = False, dtype: str | None = None):
    """The transformers model for `cfg` (MLM head for bert), random weights or on `meta`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if cfg["model_type"] == "bert" else AutoModelForCausalLM
    kwargs = {"dtype": getattr(torch, TORCH_DTYPES[dtype])} if dtype else {}
    if meta:
        with torch.device("meta"):
            return auto.from_config(hf_config(cfg), **kwargs)
    torch.manual_seed(0)
    return auto.from_config(hf_config(cfg), **kwargs)


def storage_bytes(model) -> int:
    """Bytes of every distinct storage a loaded model holds: parameters, buffers and the
    bitsandbytes quant state (Params4bit.quant_state and its nested state2, Int8Params SCB/CB),
    deduplicated by storage address."""
    import torch

    seen: dict[tuple[str, int], int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[(str(t.device), s.data_ptr())] = s.nbytes()

    for _, p in model.named_parameters(remove_duplicate=False):
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(p, "SCB", None))
        add(getattr(p, "CB", None))
    for _, b in model.named_buffers(remove_duplicate=False):
        add(b)
    for m in model.modules():  # bnb Linear8bitLt keeps SCB/CB on `state` too
        state = getattr(m, "state", None)
        add(getattr(state, "SCB", None))
        add(getattr(state, "CB", None))
    return sum(seen.values())
