"""Weight storage per format (`memplan.model.storage.weight_bytes`).

Reference: tiny models of several families, saved with random weights and
loaded through `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`
exactly as a user would; we count the bytes of every storage the loaded model
holds (parameters, buffers, bitsandbytes quant state), deduplicated by storage
address. Tolerance: none -- memplan must be exact (the issue allows 0.1%).
`get_memory_footprint()` is not used: it ignores the quant state.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import TINY_CONFIGS, TORCH_DTYPES, build_model, storage_bytes
from memplan.model.architectures import spec_from_config
from memplan.model.catalog import load_model
from memplan.model.storage import linear_quantized_bytes, weight_bytes

# ---- published per-weight costs (REFERENCE.md, "bitsandbytes storage"); no torch ---------------
N = 4096 * 4096  # Llama-2-7B q_proj


def test_nf4_costs_0_5625_bytes_per_weight() -> None:
    q = load_model("llama2-7b").linear("q_proj")
    packed, state = linear_quantized_bytes(q, "nf4", double_quant=False)
    # 0.5 (two codes per byte) + 4/64 (fp32 absmax per 64-block), plus one 16-entry fp32 code table
    assert packed + state == N * 0.5625 + 16 * 4


def test_double_quant_costs_about_0_5159_bytes_per_weight() -> None:
    q = load_model("llama2-7b").linear("q_proj")
    packed, state = linear_quantized_bytes(q, "nf4", double_quant=True)
    assert abs((packed + state) / N - (0.5 + 1 / 64 + 4 / (64 * 256))) < 1e-4


def test_int8_costs_one_byte_plus_a_row_scale() -> None:
    down = load_model("llama2-7b").linear("down_proj")  # 11008 -> 4096
    packed, state = linear_quantized_bytes(down, "int8", double_quant=False)
    assert packed + state == down.weight_numel * (1 + 4 / 11008)


@pytest.mark.parametrize("quant", ["bf16", "fp32", "int8", "nf4", "fp4"])
@pytest.mark.parametrize("name", ["llama2-7b", "gemma2-9b", "mixtral-8x7b", "gpt2", "bert-large"])
def test_parts_add_up(name: str, quant: str) -> None:
    for dq in ([False, True] if quant in ("nf4", "fp4") else [False]):
        wb = weight_bytes(load_model(name), quant, double_quant=dq)
        assert sum(wb.by_component.values()) == wb.total
        assert wb.quantized + wb.quant_state + wb.unquantized + wb.buffers == wb.total


def test_llama2_7b_bf16_is_two_bytes_per_parameter_plus_rotary_buffers() -> None:
    # 6,738,415,616 parameters (REFERENCE.md) x 2 bytes + inv_freq and original_inv_freq (64 fp32 each).
    assert weight_bytes(load_model("llama2-7b"), "bf16").total == 2 * 6_738_415_616 + 2 * 64 * 4


# ---- real loads --------------------------------------------------------------------------------------
# (memplan quant, double quant, load/compute dtype)
FORMATS = [
    ("bf16", False, "bf16"), ("fp16", False, "fp16"), ("fp32", False, "fp32"), ("int8", False, "bf16"),
    ("nf4", False, "bf16"), ("fp4", False, "bf16"), ("nf4", True, "bf16"), ("fp4", True, "bf16"),
]
FAMILIES = ["llama", "qwen2", "gemma2", "phi3", "gpt2", "mixtral", "bert"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = {}
    for family in FAMILIES + ["mistral"]:
        path = tmp_path_factory.mktemp(family)
        build_model(TINY_CONFIGS[family]).save_pretrained(path)
        out[family] = path
    return out


def load_quantized(path: Path, family: str, quant: str, double_quant: bool, dtype: str, device: str):
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = None
    if quant in ("int8", "nf4", "fp4"):
        pytest.importorskip("bitsandbytes")
        from transformers import BitsAndBytesConfig

        if quant == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant,
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=getattr(torch, TORCH_DTYPES[dtype]),
            )
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(
        path, dtype=getattr(torch, TORCH_DTYPES[dtype]), quantization_config=config, device_map=device
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("quant", "double_quant", "dtype"), FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_bytes_equal_loaded_storage(saved_models, family, quant, double_quant, dtype, device) -> None:
    model = load_quantized(saved_models[family], family, quant, double_quant, dtype, device)
    spec = load_model(str(saved_models[family] / "config.json"))
    expected = weight_bytes(spec, quant, double_quant=double_quant, compute_dtype=dtype)
    assert expected.total == storage_bytes(model)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_fp16_compute_dtype(saved_models, double_quant, device) -> None:
    model = load_quantized(saved_models["mistral"], "mistral", "nf4", double_quant, "fp16", device)
    spec = load_model(str(saved_models["mistral"] / "config.json"))
    assert weight_bytes(spec, "nf4", double_quant=double_quant, compute_dtype="fp16").total == storage_bytes(model)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_modules_are_the_ones_memplan_quantizes(saved_models, family, quant) -> None:
    """transformers replaces every nn.Linear/Conv1D except the output layer; Mixtral's router
    and 3D experts stay in the load dtype."""
    model = load_quantized(saved_models[family], family, quant, False, "bf16", "cpu")
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    real = Counter(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, kinds))
    spec = spec_from_config(TINY_CONFIGS[family], name=family)
    expected: Counter = Counter()
    for lin in spec.linears:
        if not (lin.is_output or lin.tied):
            expected[lin.name] += lin.count
    assert real == expected
