"""memplan.measure.profiler.build: random checkpoints, the real loading path, quant state.

Reference values come from transformers, bitsandbytes and PEFT themselves: the meta model's
parameter count, `BitsAndBytesConfig`'s own fields, the quant state bitsandbytes attaches to
each `Params4bit` / `Int8Params` (REFERENCE.md "bitsandbytes storage": one fp32 absmax per
64-value block for NF4, one uint8 absmax per block plus one fp32 absmax per 256 blocks with
double quantization, one fp32 scale per output row for LLM.int8).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import TINY_CONFIGS, build_model  # noqa: E402
from memplan.measure.profiler import build  # noqa: E402
from memplan.model.architectures import spec_from_config  # noqa: E402
from memplan.training.setup import Setup  # noqa: E402

LLAMA = spec_from_config(TINY_CONFIGS["llama"], name="tiny-llama")


# ---- checkpoints ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def test_checkpoint_is_written_once_and_reused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build.checkpoint_for(LLAMA, "bf16", cache)
    assert (first / "config.json").is_file() and list(first.glob("*.safetensors"))
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}

    def never(*_a, **_k):
        raise AssertionError("checkpoint rebuilt")

    monkeypatch.setattr(build, "_make_checkpoint", never)
    assert build.checkpoint_for(LLAMA, "bf16", cache) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp
    # nothing half-written left beside it
    assert [p for p in cache.iterdir() if ".tmp-" in p.name] == []


def test_checkpoint_loads_to_the_meta_models_parameters(cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = build.checkpoint_for(LLAMA, "bf16", cache)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    reference = build_model(TINY_CONFIGS["llama"], meta=True)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in reference.parameters())
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}  # saved in the dtype asked for
    assert loaded.config.hidden_size == 72 and loaded.config.num_hidden_layers == 2


def test_a_different_dtype_or_config_is_a_different_checkpoint(cache: Path) -> None:
    bf16 = build.checkpoint_for(LLAMA, "bf16", cache)
    fp32 = build.checkpoint_for(LLAMA, "fp32", cache)
    other = build.checkpoint_for(spec_from_config(dict(TINY_CONFIGS["llama"], vocab_size=301), name="tiny-llama"), "bf16", cache)
    assert len({bf16, fp32, other}) == 3
    # fp32 holds twice the bytes of bf16 (same tensors); safetensors adds a small header
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert 2 * size(bf16) - 4096 < size(fp32) < 2 * size(bf16)


# ---- quantization config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setup, expected",
    [
        (Setup(model="x", quant="int8", method="lora"), dict(load_in_8bit=True, load_in_4bit=False)),
        (Setup(model="x", quant="nf4"), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                             bnb_4bit_compute_dtype=torch.bfloat16)),
        (Setup(model="x", quant="fp4", double_quant=True, compute_dtype="fp16"),
         dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)),
        (Setup(model="x", quant="nf4", double_quant=True),
         dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    ],
)
def test_quantization_config_fields(setup: Setup, expected: dict) -> None:
    from transformers import BitsAndBytesConfig

    cfg = build._quantization_config(setup)
    assert isinstance(cfg, BitsAndBytesConfig)
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field


@pytest.mark.parametrize("quant", ["bf16", "fp16", "fp32"])
def test_unquantized_formats_have_no_quantization_config(quant: str) -> None:
    assert build._quantization_config(Setup(model="x", quant=quant)) is None


# ---- quant state of a real load --------------------------------------------------------------------------


def _quantized_linears(spec) -> list[tuple[int, int]]:
    """(in, out) of every linear transformers quantizes: all but the output layer (REFERENCE.md)."""
    return [(lin.in_features, lin.out_features) for lin in spec.linears if not lin.is_output for _ in range(lin.count)]


@pytest.fixture(scope="module")
def loaded(cache: Path):
    pytest.importorskip("bitsandbytes")
    path = build.checkpoint_for(LLAMA, "bf16", cache)
    return {
        key: build.load_model(LLAMA, Setup(model="tiny", device="cpu", **kw), path)
        for key, kw in (("nf4", dict(quant="nf4")), ("nf4-dq", dict(quant="nf4", double_quant=True)),
                        ("int8", dict(quant="int8")))
    }


def test_nf4_quant_state_is_one_fp32_absmax_per_64_values(loaded) -> None:
    model = loaded["nf4"]
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    linears = _quantized_linears(LLAMA)
    assert len(states) == len(linears)
    got = {t.untyped_storage().data_ptr() for t in build.quant_state_tensors(model)}
    for qs in states:
        assert qs.absmax.untyped_storage().data_ptr() in got
        assert qs.code.untyped_storage().data_ptr() in got
        assert qs.absmax.dtype == torch.float32
    # block size 64: ceil(n / 64) absmax values per weight (llama's 72 x 100 MLP is not a multiple of 64)
    expected_blocks = sorted(math.ceil(i * o / 64) for i, o in linears)
    assert sorted(qs.absmax.numel() for qs in states) == expected_blocks


def test_double_quant_adds_the_nested_state(loaded) -> None:
    model = loaded["nf4-dq"]
    tensors = build.quant_state_tensors(model)
    got = {t.untyped_storage().data_ptr() for t in tensors}
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    for qs in states:
        assert qs.absmax.dtype == torch.uint8  # the block absmax quantized to 8 bits
        assert qs.state2 is not None
        assert qs.state2.absmax.untyped_storage().data_ptr() in got
        # one fp32 absmax per 256 blocks of 64
        assert qs.state2.absmax.numel() == math.ceil(qs.absmax.numel() / 256)
    assert all(isinstance(t, torch.Tensor) for t in tensors)


def test_int8_scales_are_one_fp32_per_output_row(loaded) -> None:
    model = loaded["int8"]
    tensors = build.quant_state_tensors(model)
    scb = [p.SCB for p in model.parameters() if getattr(p, "SCB", None) is not None]
    assert sorted(t.numel() for t in scb) == sorted(o for _, o in _quantized_linears(LLAMA))
    assert all(t.dtype == torch.float32 for t in scb)
    got = {t.untyped_storage().data_ptr() for t in tensors}
    assert all(t.untyped_storage().data_ptr() in got for t in scb)


def test_an_unquantized_model_has_no_quant_state(cache: Path) -> None:
    model = build.load_model(LLAMA, Setup(model="tiny", device="cpu"), build.checkpoint_for(LLAMA, "bf16", cache))
    assert build.quant_state_tensors(model) == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---- training setup pieces ---------------------------------------------------------------------------------


def test_default_lora_targets_are_peft_defaults_and_phi3_falls_back() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    assert set(build._lora_targets(LLAMA, Setup(model="x"))) == set(PEFT_DEFAULTS["llama"])
    assert build._lora_targets(LLAMA, Setup(model="x", lora_targets=("all-linear",))) == "all-linear"
    assert build._lora_targets(LLAMA, Setup(model="x", lora_targets=("k_proj", "o_proj"))) == ["k_proj", "o_proj"]
    phi3 = spec_from_config(TINY_CONFIGS["phi3"], name="phi3")
    assert build._lora_targets(phi3, Setup(model="x"))  # PEFT 0.21 has none: memplan's documented default


def test_apply_training_setup_trains_only_the_adapters(cache: Path) -> None:
    from memplan.model.lora import plan_lora

    model = build.load_model(LLAMA, Setup(model="tiny", device="cpu"), build.checkpoint_for(LLAMA, "bf16", cache))
    setup = Setup(model="tiny", device="cpu", lora_rank=4)
    model = build.apply_training_setup(model, LLAMA, setup)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # REFERENCE.md formula r x (d_in + d_out) per adapted linear, for q_proj (72 -> 72) and v_proj (72 -> 36), 2 layers
    assert sum(p.numel() for p in trainable) == 2 * 4 * ((72 + 72) + (72 + 36))
    assert sum(p.numel() for p in trainable) == plan_lora(LLAMA, 4, None).trainable_parameters
    assert model.training


@pytest.mark.parametrize(
    "optimizer, cls",
    [("adamw", "torch.optim.adamw.AdamW"), ("sgd", "torch.optim.sgd.SGD"), ("sgd_momentum", "torch.optim.sgd.SGD"),
     ("adamw_8bit", "AdamW8bit"), ("paged_adamw_32bit", "PagedAdamW32bit"), ("paged_adamw_8bit", "PagedAdamW8bit")],
)
def test_optimizer_names_follow_transformers(optimizer: str, cls: str) -> None:
    if "8bit" in optimizer or "paged" in optimizer:
        pytest.importorskip("bitsandbytes")
    opt = build.make_optimizer(Setup(model="x", optimizer=optimizer), [torch.nn.Parameter(torch.zeros(4))])
    name = f"{type(opt).__module__}.{type(opt).__qualname__}"
    assert name.endswith(cls)
    if optimizer == "sgd_momentum":
        assert opt.param_groups[0]["momentum"] == 0.9


def test_autocast_forward_and_grad_scaler() -> None:
    model = torch.nn.Linear(4, 4)
    assert build.training_forward(model, Setup(model="x")) is model
    assert build.grad_scaler(Setup(model="x")) is None
    assert build.grad_scaler(Setup(model="x", quant="fp32", autocast="bf16")) is None  # bf16 needs no loss scaling
    assert isinstance(build.grad_scaler(Setup(model="x", quant="fp32", autocast="fp16", device="cpu")), torch.amp.GradScaler)
    fwd = build.training_forward(model, Setup(model="x", quant="fp32", autocast="bf16", device="cpu"))
    out = fwd(torch.ones(2, 4))
    assert out.dtype == torch.float32  # accelerate's convert_outputs_to_fp32
