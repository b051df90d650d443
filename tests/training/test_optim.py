"""Optimizer states and gradients (`memplan.training.optim`, and their use in `estimate`).

Reference: a real training step on a tiny model; after `optimizer.step()` we sum
the bytes of every distinct tensor storage in `optimizer.state` (and of every
`p.grad`). Tolerance: none (exact). bitsandbytes' 8-bit and paged optimizers run
on the CPU in bnb 0.50 (nothing is paged there); the paged/unified-memory split
is checked on CUDA by the `gpu` test.
"""

from __future__ import annotations

import pytest

from conftest import TINY_CONFIGS, build_model
from memplan.model.architectures import spec_from_config
from memplan.training.estimate import estimate
from memplan.training.optim import MIN_8BIT_SIZE, optimizer_bytes
from memplan.training.setup import Setup

torch = pytest.importorskip("torch")


def state_bytes(opt, *, device: str | None = None, paged: bool | None = None) -> int:
    """Distinct storages in optimizer.state, optionally only those on `device`, paged or not."""
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for v in st.values():
            if not isinstance(v, torch.Tensor):
                continue
            if device is not None and v.device.type != device:
                continue
            if paged is not None and bool(getattr(v, "is_paged", False)) != paged:
                continue
            s = v.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def make_optimizer(name: str, params):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adamw_fused":  # TrainingArguments optim="adamw_torch_fused"
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    bnb = pytest.importorskip("bitsandbytes")
    return {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name](params, lr=1e-3)


def train_step(model, opt) -> None:
    ids = torch.randint(1, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


OPTIMIZERS = ["adamw", "adamw_fused", "sgd", "sgd_momentum", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_full_finetune_state_bytes_on_cpu(optimizer: str, dtype: str) -> None:
    pytest.importorskip("transformers")
    model = build_model(TINY_CONFIGS["llama"], dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    # the tiny llama mixes tensors above and below bnb's 4096-value 8-bit threshold
    assert min(p.numel() for p in params) < MIN_8BIT_SIZE < max(p.numel() for p in params)
    opt = make_optimizer(optimizer, params)
    train_step(model, opt)
    itemsize = params[0].element_size()
    expected = optimizer_bytes(optimizer, [p.numel() for p in params], itemsize, device="cpu")
    assert expected.paged == 0
    assert expected.total == state_bytes(opt)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "sgd_momentum"])
def test_estimate_full_finetune_matches_a_real_step(optimizer: str) -> None:
    pytest.importorskip("transformers")
    cfg = TINY_CONFIGS["llama"]
    model = build_model(cfg, dtype="bf16")
    opt = make_optimizer(optimizer, list(model.parameters()))
    train_step(model, opt)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    setup = Setup(model="tiny-llama", method="full", quant="bf16", optimizer=optimizer, device="cpu")
    mem = estimate(setup, model=spec_from_config(cfg, name="tiny-llama")).memory
    assert mem.optimizer_states == state_bytes(opt)
    assert mem.gradients == grads


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("all-linear",)])
def test_estimate_lora_matches_a_real_step(optimizer: str, targets: tuple[str, ...]) -> None:
    """PEFT on a bf16 base: fp32 adapters, so fp32 gradients and AdamW states."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    cfg = TINY_CONFIGS["llama"]
    peft_targets = "all-linear" if targets == ("all-linear",) else list(targets)
    model = get_peft_model(build_model(cfg, dtype="bf16"), LoraConfig(r=8, target_modules=peft_targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(optimizer, trainable)
    train_step(model, opt)
    setup = Setup(model="tiny-llama", lora_rank=8, lora_targets=targets, optimizer=optimizer, device="cpu")
    mem = estimate(setup, model=spec_from_config(cfg, name="tiny-llama")).memory
    assert mem.adapters == sum(p.numel() * p.element_size() for p in trainable)
    assert mem.gradients == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    assert mem.optimizer_states == state_bytes(opt)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_bytes_on_cuda_and_paged_split(optimizer: str) -> None:
    """On CUDA: torch keeps AdamW's `step` on the CPU; bnb pages (unified memory) the
    state of tensors with >= 1e5 values. One tensor of each kind."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    shapes = [(1000, 128), (64, 64), (30, 40), (70,)]  # 128,000 >= 1e5 is paged; 4,096 and 1,200 straddle min_8bit_size
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16)) for s in shapes]
    opt = make_optimizer(optimizer, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    expected = optimizer_bytes(optimizer, [p.numel() for p in params], 2, device="cuda")
    # bnb's paged buffers are cudaMallocManaged memory wrapped as CPU-typed tensors with `is_paged`
    assert expected.resident == state_bytes(opt, device="cuda", paged=False)
    assert expected.paged == state_bytes(opt, paged=True)
    assert (expected.paged > 0) == optimizer.startswith("paged")


def test_fused_adamw_keeps_its_step_counters_on_the_device() -> None:
    """torch/optim/adam.py::_init_group: `step` is a 0-d fp32 tensor on the parameter's device when
    fused (or capturable): 4 bytes per tensor on CUDA too, where plain AdamW keeps it on the host.
    CPU ledger, tiny llama full bf16: 8,377,428 optimizer bytes for 2,094,336 parameters in 21 tensors."""
    from pathlib import Path

    from memplan.model.catalog import load_model
    from memplan.training.estimate import trainable_numels

    numels = trainable_numels(load_model(str(Path(__file__).resolve().parents[1] / "data" / "tiny" / "tiny-llama")), None)
    assert (len(numels), sum(numels)) == (21, 2_094_336)
    assert optimizer_bytes("adamw_fused", numels, 2, device="cpu").total == 8_377_428
    assert optimizer_bytes("adamw_fused", numels, 2, device="cuda").total == 8_377_428
    assert optimizer_bytes("adamw", numels, 2, device="cuda").total == 8_377_428 - 4 * 21
