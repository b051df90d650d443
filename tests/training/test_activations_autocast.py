"""Mixed precision: what autograd saves under autocast, measured tensor by tensor.

Ground truth: `torch.autograd.graph.saved_tensors_hooks` over a real forward of the tiny
models (fp32 weights, forward wrapped in `torch.autocast` and accelerate's
`convert_outputs_to_fp32`, as Trainer runs bf16=True / fp16=True). The distinct storages
the graph saves, parameters excluded, must equal the estimator's activations + logits.
The whole step (peak, gradients, optimizer) is checked by the validation matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memplan.training.estimate import estimate
from memplan.training.setup import Setup

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"


def saved_bytes(setup: Setup) -> int:
    from accelerate.utils import convert_outputs_to_fp32

    cfg = transformers.AutoConfig.from_pretrained(setup.model)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=setup.attention)
    if setup.method == "lora":
        targets = list(setup.lora_targets) if setup.lora_targets else None
        targets = "all-linear" if targets == ["all-linear"] else targets  # PEFT's keyword is a string
        model = peft.get_peft_model(model, peft.LoraConfig(r=setup.lora_rank, target_modules=targets))
    model.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[setup.autocast]
    forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=dtype)(model.forward))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, cfg.vocab_size, (setup.batch_size, setup.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(input_ids=ids, labels=ids, use_cache=False)
    assert out.loss.dtype == torch.float32
    return sum(seen.values())


CASES = [
    dict(model="tiny-llama", method="full", autocast="bf16"),
    dict(model="tiny-llama", method="lora", autocast="bf16"),
    dict(model="tiny-llama", method="lora", autocast="fp16", lora_rank=16, lora_targets=("all-linear",)),
    dict(model="tiny-llama", method="full", autocast="bf16", attention="eager"),
    dict(model="tiny-mistral", method="full", autocast="bf16"),  # GQA
    dict(model="tiny-mistral", method="lora", autocast="bf16", lora_targets=("k_proj", "o_proj", "down_proj")),
    dict(model="tiny-qwen2", method="lora", autocast="bf16"),  # q/k/v biases, tied embeddings
    dict(model="tiny-phi3", method="full", autocast="bf16"),  # fused qkv_proj / gate_up_proj
    dict(model="tiny-phi3", method="lora", autocast="fp16", lora_targets=("qkv_proj", "o_proj")),
    dict(model="tiny-phi3", method="lora", autocast="bf16", lora_targets=("qkv_proj", "o_proj"), attention="eager"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) if not isinstance(v, tuple) else ",".join(v) for v in c.values()))
def test_saved_tensors_equal_the_estimate(case: dict) -> None:
    case = dict(case)
    setup = Setup(model=str(TINY / case.pop("model")), quant="fp32", device="cpu", seq_len=64, batch_size=2, **case)
    est = estimate(setup)
    assert est.memory.activations + est.memory.logits == saved_bytes(setup)

