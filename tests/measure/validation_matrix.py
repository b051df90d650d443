"""The CPU validation matrix of the training-memory model (issue: >= 40 real runs).

Each entry is a real profiled step on a tiny model whose config lives in
tests/data/tiny/. Together they cover: llama (MHA, 1k vocab), mistral (GQA, 32k),
qwen2 (q/k/v biases, tied, 152k vocab), phi3 (fused qkv/gate_up, 32k; a GQA one with 116 tokens),
mixtral (2 experts, LoRA on experts and router), gemma2
(softcapping, eager), gpt2 and bert (LayerNorm, GELU, dropout 0.1); bf16,
int8, nf4 and nf4 + double quant; full fine-tuning and LoRA; ranks 1-64; targets
q,v (or PEFT's default) and all-linear; sequences 64-1024; batches 1-4;
checkpointing on and off; adamw, sgd, sgd_momentum and the bnb 8-bit optimizers;
fp32 master weights under bf16 and fp16 autocast (Trainer's mixed precision).
"""

from __future__ import annotations

from pathlib import Path

from memplan.training.setup import Setup

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"


def _m(name: str) -> str:
    return str(TINY / name)


def matrix() -> list[Setup]:
    rows: list[dict] = []
    # llama: the broadest sweep (cheap: 1k vocabulary).
    for quant, dq in (("bf16", False), ("int8", False), ("nf4", False), ("nf4", True)):
        for ckpt in (False, True):
            rows.append(dict(model=_m("tiny-llama"), quant=quant, double_quant=dq, lora_rank=8, seq_len=256, batch_size=2, grad_checkpointing=ckpt))
    rows += [
        dict(model=_m("tiny-llama"), method="full", quant="bf16", seq_len=128, batch_size=2),
        dict(model=_m("tiny-llama"), method="full", quant="bf16", seq_len=128, batch_size=2, grad_checkpointing=True),
        dict(model=_m("tiny-llama"), method="full", quant="bf16", seq_len=64, batch_size=4, optimizer="sgd_momentum"),
        dict(model=_m("tiny-llama"), method="full", quant="bf16", seq_len=64, batch_size=1, optimizer="adamw_8bit"),
        dict(model=_m("tiny-llama"), method="full", quant="fp32", seq_len=64, batch_size=2),
        dict(model=_m("tiny-llama"), lora_rank=1, seq_len=1024, batch_size=1),
        dict(model=_m("tiny-llama"), lora_rank=64, lora_targets=("all-linear",), seq_len=512, batch_size=2),
        dict(model=_m("tiny-llama"), quant="nf4", double_quant=True, lora_rank=16, lora_targets=("all-linear",), seq_len=1024, batch_size=1, grad_checkpointing=True),
        dict(model=_m("tiny-llama"), lora_rank=32, seq_len=128, batch_size=4, optimizer="sgd"),
        dict(model=_m("tiny-llama"), lora_rank=8, seq_len=256, batch_size=2, attention="eager"),
        dict(model=_m("tiny-llama"), lora_rank=8, seq_len=128, batch_size=2, lora_dropout=0.1),
        dict(model=_m("tiny-llama"), quant="nf4", lora_rank=8, seq_len=256, batch_size=2, prepare_kbit_training=True),
        # prepare_model_for_kbit_training with all-linear targets (down_proj's adapter input freed
        # before the SwiGLU backward), with and without checkpointing: ledger -0.0% and +0.0%.
        dict(model=_m("tiny-mistral"), quant="nf4", lora_rank=8, lora_targets=("all-linear",), seq_len=256, batch_size=2, prepare_kbit_training=True),
        dict(model=_m("tiny-qwen2"), quant="nf4", lora_rank=8, lora_targets=("all-linear",), seq_len=128, batch_size=2, prepare_kbit_training=True,
             grad_checkpointing=False),
    ]
    # mistral: GQA (8 query heads over 2 KV heads), 32k vocabulary.
    rows += [
        dict(model=_m("tiny-mistral"), lora_rank=8, seq_len=128, batch_size=2),
        dict(model=_m("tiny-mistral"), quant="nf4", double_quant=True, lora_rank=16, seq_len=256, batch_size=1),
        dict(model=_m("tiny-mistral"), quant="int8", lora_rank=4, lora_targets=("all-linear",), seq_len=128, batch_size=2),
        dict(model=_m("tiny-mistral"), method="full", quant="bf16", seq_len=64, batch_size=2),
        dict(model=_m("tiny-mistral"), lora_rank=64, lora_targets=("all-linear",), seq_len=256, batch_size=1, grad_checkpointing=True),
        dict(model=_m("tiny-mistral"), quant="nf4", lora_rank=8, seq_len=512, batch_size=1, optimizer="adamw_8bit"),
        dict(model=_m("tiny-mistral"), lora_rank=8, seq_len=128, batch_size=2, attention="eager"),
        dict(model=_m("tiny-mistral"), quant="nf4", lora_rank=32, lora_targets=("all-linear",), seq_len=64, batch_size=4, optimizer="paged_adamw_8bit"),
    ]
    # qwen2: biases on q/k/v, tied embeddings, a 152k vocabulary (logits-dominated).
    rows += [
        dict(model=_m("tiny-qwen2"), lora_rank=8, seq_len=64, batch_size=1),
        dict(model=_m("tiny-qwen2"), quant="nf4", double_quant=True, lora_rank=8, seq_len=128, batch_size=1),
        dict(model=_m("tiny-qwen2"), quant="int8", lora_rank=16, seq_len=64, batch_size=2),
        dict(model=_m("tiny-qwen2"), lora_rank=4, lora_targets=("all-linear",), seq_len=128, batch_size=2, grad_checkpointing=True),
        dict(model=_m("tiny-qwen2"), method="full", quant="bf16", seq_len=64, batch_size=1, optimizer="sgd"),
        dict(model=_m("tiny-qwen2"), quant="nf4", lora_rank=2, seq_len=256, batch_size=1, grad_checkpointing=True),
        dict(model=_m("tiny-qwen2"), lora_rank=8, seq_len=64, batch_size=2, optimizer="paged_adamw_32bit"),
    ]
    # phi3: fused qkv_proj and gate_up_proj.
    rows += [
        dict(model=_m("tiny-phi3"), lora_rank=8, seq_len=128, batch_size=2),
        dict(model=_m("tiny-phi3"), quant="nf4", double_quant=True, lora_rank=8, seq_len=256, batch_size=2),
        dict(model=_m("tiny-phi3"), quant="int8", lora_rank=8, lora_targets=("all-linear",), seq_len=128, batch_size=1),
        dict(model=_m("tiny-phi3"), method="full", quant="bf16", seq_len=128, batch_size=1),
        dict(model=_m("tiny-phi3"), lora_rank=48, lora_targets=("all-linear",), seq_len=512, batch_size=1, grad_checkpointing=True),
        dict(model=_m("tiny-phi3"), quant="nf4", lora_rank=8, seq_len=64, batch_size=4, optimizer="adamw_8bit"),
        dict(model=_m("tiny-phi3"), method="full", quant="bf16", seq_len=64, batch_size=2, grad_checkpointing=True, optimizer="sgd_momentum"),
    ]
    # Mixed precision: fp32 master weights with the forward under bf16/fp16 autocast.
    rows += [
        dict(model=_m("tiny-llama"), quant="fp32", autocast="bf16", seq_len=256, batch_size=2),
        dict(model=_m("tiny-llama"), quant="fp32", autocast="bf16", seq_len=256, batch_size=2, grad_checkpointing=True),
        dict(model=_m("tiny-llama"), method="full", quant="fp32", autocast="bf16", seq_len=128, batch_size=2),
        dict(model=_m("tiny-llama"), method="full", quant="fp32", autocast="bf16", seq_len=128, batch_size=2, grad_checkpointing=True),
        dict(model=_m("tiny-llama"), method="full", quant="fp32", autocast="fp16", seq_len=64, batch_size=2),
        dict(model=_m("tiny-mistral"), quant="fp32", autocast="bf16", lora_rank=16, lora_targets=("all-linear",), seq_len=128, batch_size=2),
        dict(model=_m("tiny-qwen2"), quant="fp32", autocast="bf16", seq_len=64, batch_size=1),
        dict(model=_m("tiny-phi3"), method="full", quant="fp32", autocast="bf16", seq_len=64, batch_size=2),
        dict(model=_m("tiny-phi3"), quant="fp32", autocast="fp16", attention="eager", seq_len=128, batch_size=1),
    ]
    # torch.optim.AdamW(fused=True) (TrainingArguments' adamw_torch_fused, its default from torch 2.8).
    rows.append(dict(model=_m("tiny-llama"), method="full", quant="bf16", seq_len=64, batch_size=2, optimizer="adamw_fused"))
    # GPT-2 and BERT (dropout 0.1 everywhere: SDPA runs torch's math kernel on the CPU) and Gemma2
    # (softcapped eager attention, four norms per layer, tied 1k vocabulary): activations_classic.py
    # and the eager attention backward. Ledger when added: -0.00%, +0.82%, -1.44%, -0.01%, -0.00%. Not added:
    # gemma2 nf4 all-linear eager gc s256 (peak -1.87%, but the activations saved at the end of the forward
    # -11.2%, beyond the 5% category threshold: not analysed yet).
    rows += [
        dict(model=_m("tiny-gpt2"), lora_rank=8, seq_len=128, batch_size=2),
        dict(model=_m("tiny-gpt2"), method="full", quant="bf16", attention="eager", seq_len=64, batch_size=2),
        dict(model=_m("tiny-bert"), lora_rank=8, lora_targets=("all-linear",), seq_len=128, batch_size=2),
        dict(model=_m("tiny-gemma2"), lora_rank=8, attention="eager", seq_len=128, batch_size=2),
        dict(model=_m("tiny-gemma2"), method="full", quant="bf16", attention="eager", seq_len=64, batch_size=1),
        # Eager attention at 768 tokens on a 1k vocabulary: the peak is the top layer's softmax backward
        # (two fp32 s x s transients), not the loss. Ledger when added: +0.67% (before the phase: -1.02%).
        dict(model=_m("tiny-llama"), lora_rank=8, attention="eager", seq_len=768, batch_size=1),
    ]
    # Moments a small vocabulary exposes (the first four from random draws seed 760011 and 5150): the rebuilt
    # top layer inside an adapted MLP projection's LoRA forward (backward_recompute), the same in the
    # forward without checkpointing (forward_mlp), the final norm's backward, a tied table's two gradients
    # summed at the end of the backward, a rebuilt down_proj's branch stopped at lora_B's pack, and the
    # promoted add of a bf16 base. tiny-phi3-gqa: 6 query heads over 1 KV head, intermediate 557, 116
    # tokens, tied. Ledger when added (before these moments): -0.06% (-19.4%), -0.04% (-13.9%), -0.02%
    # (-7.6%), +0.67% (-10.5%), -0.05% (+0.72%), -0.25% (-1.25%).
    rows += [
        dict(model=_m("tiny-phi3-gqa"), quant="nf4", lora_rank=4, lora_targets=("all-linear",), seq_len=153, batch_size=2, grad_checkpointing=True),
        dict(model=_m("tiny-phi3-gqa"), quant="nf4", lora_rank=4, lora_targets=("all-linear",), seq_len=153, batch_size=2),
        dict(model=_m("tiny-phi3-gqa"), lora_rank=8, lora_targets=("qkv_proj",), seq_len=153, batch_size=2, optimizer="sgd"),
        dict(model=_m("tiny-bert"), method="full", quant="bf16", seq_len=10, batch_size=3, grad_checkpointing=True, optimizer="sgd"),
        dict(model=_m("tiny-llama"), quant="nf4", lora_rank=8, lora_targets=("down_proj",), seq_len=128, batch_size=2, grad_checkpointing=True),
        dict(model=_m("tiny-llama"), lora_rank=8, lora_targets=("all-linear",), seq_len=128, batch_size=2, grad_checkpointing=True),
    ]
    # Mixtral's experts and router as LoRA parameter targets (PEFT's ParamWrapper folds each into a merged
    # copy that the grouped matmuls save): tiny-mixtral, 2 experts, top-1, a random draw's config (seed
    # 4242). Ledger when added (before): -0.18% (-15.7%), +0.91% (-10.0%), +0.06% (-5.8%).
    rows += [
        dict(model=_m("tiny-mixtral"), lora_rank=16, lora_targets=("w1", "w3", "w2"), seq_len=128, batch_size=1, optimizer="sgd"),
        dict(model=_m("tiny-mixtral"), quant="nf4", lora_rank=16, lora_targets=("all-linear",), seq_len=128, batch_size=1, grad_checkpointing=True),
        dict(model=_m("tiny-mixtral"), lora_rank=16, lora_targets=("gate", "w2"), seq_len=128, batch_size=1),
    ]
    return [Setup(device="cpu", **r) for r in rows]


# The regression subset CI runs on every run (`python -m pytest -q`; the whole matrix is the
# `full_matrix` tier): 28 of the runs above that together cover every quant (bf16, fp32, int8,
# nf4, nf4 + double quant), both methods, all eight families, all seven optimizers, autocast
# none/bf16/fp16, checkpointing, eager attention, LoRA dropout, prepare_model_for_kbit_training
# and all-linear targets. test_validation_cpu.py checks that coverage.
# Indices into matrix(): a row inserted above one shifts them, and test_validation_cpu's coverage
# test says which value the subset lost.
REGRESSION = (7, 10, 12, 18, 19, 24, 29, 34, 36, 42, 46, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68)


def regression() -> list[Setup]:
    setups = matrix()
    return [setups[i] for i in REGRESSION]


# test_profiler.py's acceptance setups on a tiny Llama (tests/conftest.py TINY_CONFIGS["llama"]),
# seq 24, batch 2, two steps; they run in the session's shared campaign (tests/measure/conftest.py).
PROFILE_CASES = {  # name -> setup fields beyond those defaults
    "bf16-lora": {"quant": "bf16"},
    "int8-lora": {"quant": "int8"},
    "nf4-lora": {"quant": "nf4"},
    "nf4-dq-lora": {"quant": "nf4", "double_quant": True},
    "bf16-full": {"method": "full", "quant": "bf16"},
    "bf16-lora-checkpointing": {"quant": "bf16", "grad_checkpointing": True},
}
PROFILE_DEFAULTS = {"device": "cpu", "seq_len": 24, "batch_size": 2}
PROFILE_STEPS = 2


# Real trainer steps (`--recipe trainer|trl-sft`, memplan.measure.profiler.trainer: transformers
# Trainer / TRL 1.16 SFTTrainer, max_steps=3) on the tiny models, in the session's shared campaign;
# checked by test_recipes_cpu.py (steady peak: median |error| <= 1%, max <= 3%). They cover nf4,
# nf4 + double quant, int8 and bf16; LoRA and full fine-tuning; checkpointing on and off; TRL's bf16
# adapter cast, fused LM head and enable_input_require_grads; Trainer + prepare_model_for_kbit_training.
RECIPE_STEPS = 3


def recipe_matrix() -> list[Setup]:
    llama = _m("tiny-llama")
    rows = [
        dict(model=llama, recipe="trl-sft", quant="nf4", seq_len=128, batch_size=2),  # gc: SFTConfig's default
        dict(model=llama, recipe="trl-sft", quant="nf4", double_quant=True, lora_targets=("all-linear",), seq_len=128, batch_size=2,
             grad_checkpointing=False),
        dict(model=llama, recipe="trl-sft", quant="int8", seq_len=128, batch_size=2),
        dict(model=llama, recipe="trl-sft", quant="bf16", seq_len=128, batch_size=2),
        dict(model=llama, recipe="trl-sft", method="full", quant="bf16", seq_len=64, batch_size=2, grad_checkpointing=False),
        dict(model=llama, recipe="trl-sft", method="full", quant="bf16", seq_len=64, batch_size=2),
        dict(model=_m("tiny-mistral"), recipe="trl-sft", quant="nf4", seq_len=64, batch_size=1),
        dict(model=llama, recipe="trainer", quant="nf4", seq_len=128, batch_size=2),
        dict(model=llama, recipe="trainer", quant="nf4", seq_len=128, batch_size=2, prepare_kbit_training=True),
        dict(model=llama, recipe="trainer", quant="int8", seq_len=128, batch_size=2, grad_checkpointing=True),
        dict(model=llama, recipe="trainer", quant="bf16", seq_len=128, batch_size=2, grad_checkpointing=True),
        dict(model=llama, recipe="trainer", method="full", quant="bf16", seq_len=64, batch_size=2),
        # PEFT modules_to_save copies (memplan.training.modules_to_save): ledger -0.03% (Trainer), -0.01% (SFTTrainer).
        dict(model=llama, recipe="trainer", quant="nf4", seq_len=128, batch_size=2, modules_to_save=("embed_tokens", "lm_head")),
        # TrainingArguments optim="adamw_torch_fused" (torch.optim.AdamW(fused=True)): ledger -0.01%.
        dict(model=llama, recipe="trainer", method="full", quant="bf16", seq_len=64, batch_size=2, optimizer="adamw_fused"),
        dict(model=llama, recipe="trl-sft", quant="nf4", seq_len=128, batch_size=2, modules_to_save=("embed_tokens", "lm_head")),
        # SFTConfig's default bf16=True autocast over fp32 adapters on a bf16 base (recipes.lora_under_autocast): +0.03%.
        dict(model=llama, recipe="trl-sft", quant="bf16", lora_targets=("all-linear",), seq_len=128, batch_size=2, grad_checkpointing=False),
    ]
    return [Setup(device="cpu", **r) for r in rows]


# The trainer runs every CI run measures (10 of the 16; the rest: `python -m pytest -m full_matrix`):
# both trainers, nf4/nf4+dq/int8/bf16, LoRA and full, checkpointing on and off, prepare-kbit, the
# full-fine-tuning Trainer run that is the matrix's worst case, modules_to_save under both trainers,
# the fused AdamW and SFTTrainer's bf16 autocast over fp32 adapters.
RECIPE_REGRESSION = (0, 1, 2, 5, 8, 11, 12, 13, 14, 15)


def recipe_regression() -> list[Setup]:
    setups = recipe_matrix()
    return [setups[i] for i in RECIPE_REGRESSION]
