"""Sharded CPU runs at world size 2 (issue 13 part 3): the setups and one call that measures them.

`run_campaign` runs sharded jobs itself (one rank group of N processes per world size, every
rank's record appended), so a session campaign can add `Job(s, None, SHARDED_STEPS)` for these
setups to its own job list; `run_sharded` is the same thing on its own.

Model: tests/data/tiny/tiny-llama (hidden 256, 2 layers, 1k vocabulary), so each FSDP unit's
shard is mostly data, not padding; two full fine-tuning rows use tiny mistral and phi3 (32k
vocabularies), whose embedding and head gradients end the backward. QLoRA bases use bnb_4bit_quant_storage = bf16, which FSDP
needs to flatten them (bitsandbytes docs/source/fsdp_qlora.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memplan.training.setup import Setup

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"
TINY_LLAMA, TINY_MISTRAL, TINY_PHI3, TINY_PHI3_GQA = (str(TINY / m) for m in ("tiny-llama", "tiny-mistral", "tiny-phi3", "tiny-phi3-gqa"))
SHARDED_STEPS = 3
_BASE = dict(model=TINY_LLAMA, device="cpu", gpus=2, seq_len=128, batch_size=2)
_QLORA = dict(method="lora", quant="nf4", compute_dtype="bf16", quant_storage="bf16")


def fsdp_setups() -> list[Setup]:
    """FSDP1 and FSDP2 (full shard and shard-grad-op) and DDP over full bf16, LoRA bf16 and QLoRA,
    with and without checkpointing, at 37 to 306 tokens: 16 runs, 32 records."""
    rows: list[dict[str, Any]] = [
        # 96 tokens (fewer than the hidden size): the layers' unsharded gradients, not their activations,
        # set the peak (FSDP1: a layer's post-backward; FSDP2: layer 0's input-norm backward).
        dict(parallel="fsdp", fsdp_version=1, method="full", quant="bf16", seq_len=96, batch_size=1),
        dict(parallel="fsdp", fsdp_version=2, method="full", quant="bf16", grad_checkpointing=True, seq_len=96, batch_size=1),
        # 32k vocabularies: the root's (FSDP1) and the embedding group's (FSDP2) post-backward.
        dict(parallel="fsdp", fsdp_version=1, method="full", quant="bf16", model=TINY_PHI3, seq_len=64, batch_size=1),
        dict(parallel="fsdp", fsdp_version=2, method="full", quant="bf16", model=TINY_MISTRAL, seq_len=96, batch_size=1),
        dict(parallel="fsdp", fsdp_version=1, method="lora", quant="bf16", grad_checkpointing=True),
        dict(parallel="fsdp", fsdp_version=2, method="lora", quant="bf16"),
        dict(parallel="fsdp", fsdp_version=1, **_QLORA),
        dict(parallel="fsdp", fsdp_version=2, **_QLORA, grad_checkpointing=True),
        dict(parallel="fsdp", fsdp_version=1, **_QLORA, grad_checkpointing=True),
        dict(parallel="fsdp", fsdp_version=2, **_QLORA),
        dict(parallel="fsdp_shard_grad_op", fsdp_version=1, method="lora", quant="bf16"),
        dict(parallel="fsdp_shard_grad_op", fsdp_version=2, method="full", quant="bf16", grad_checkpointing=True, seq_len=200),
        dict(parallel="ddp", method="full", quant="bf16"),
        dict(parallel="ddp", method="lora", quant="nf4", compute_dtype="bf16", grad_checkpointing=True),
        # A random draw that failed CI (seed 760011): the rebuilt top layer's fused gate_up_proj LoRA
        # forward is the peak (6 query heads over 1 KV head, a 116-token vocabulary); -19.2% before.
        dict(parallel="fsdp", fsdp_version=1, **_QLORA, model=TINY_PHI3_GQA, lora_rank=4, lora_targets=("all-linear",),
             grad_checkpointing=True, seq_len=153, batch_size=2),
        # FSDP2 shard-grad-op peaking at the loss: the whole model gathered and the tail's flat all-gather
        # output (a random llama full s37 b1 draw: -6.5% without that output; this row -1.3%).
        dict(parallel="fsdp_shard_grad_op", fsdp_version=2, method="full", quant="bf16", model=TINY_PHI3, seq_len=37, batch_size=1),
    ]
    return [Setup(**{**_BASE, **row}) for row in rows]


def zero_setups() -> list[Setup]:
    """DeepSpeed ZeRO-2 and ZeRO-3 over full bf16, LoRA bf16 and QLoRA (bf16 quant storage), with and
    without checkpointing, two of them with optimizer (and parameter) offload: 10 runs, 20 records.
    Recipe `trainer`: Trainer's "auto" bucket sizes (hidden²),
    as `transformers/integrations/deepspeed.py` fills them (DeepSpeed's own 5e8-element default is 1 GB
    per rank on any model)."""
    rows: list[dict[str, Any]] = [
        dict(parallel="zero2", method="full", quant="bf16"),
        dict(parallel="zero3", method="full", quant="bf16", grad_checkpointing=True),
        dict(parallel="zero2", method="lora", quant="bf16", grad_checkpointing=True),
        dict(parallel="zero3", method="lora", quant="bf16"),
        dict(parallel="zero2", **_QLORA),
        dict(parallel="zero3", **_QLORA, grad_checkpointing=True),
        dict(parallel="zero2", **_QLORA, grad_checkpointing=True),
        dict(parallel="zero3", **_QLORA),
        # ZeRO-Offload (the profiler's config AdamW has torch_adam: torch.optim.AdamW steps the host copies;
        # DeepSpeed's CPU accelerator keeps "device" and host state in one RAM, so the ledger sees their sum):
        # a 32k vocabulary, whose largest parameter's fp64 norm ends the backward; ZeRO-3 with parameters too.
        dict(parallel="zero2", method="full", quant="bf16", offload="optimizer", model=TINY_MISTRAL, seq_len=96, batch_size=1),
        dict(parallel="zero3", **_QLORA, offload="params_and_optimizer", grad_checkpointing=True),
    ]
    return [Setup(**{**_BASE, "recipe": "trainer", **row}) for row in rows]


def run_sharded(setups: list[Setup], *, out: Path, checkpoint_dir: Path, workers: int = 2, timeout_s: float = 600,
                steps: int = SHARDED_STEPS) -> list[dict[str, Any]]:
    """Measure `setups` (rank groups through `run_campaign`); every record written to `out`."""
    from memplan.measure.profiler.campaign import Job, run_campaign
    from memplan.measure.profiler.device import collect_env
    from memplan.measure.records import read_records

    result = run_campaign([Job(s, None, steps) for s in setups], out=out, env=collect_env("cpu"), workers=workers,
                          timeout_s=timeout_s, checkpoint_dir=checkpoint_dir)
    if result.interrupted:
        raise KeyboardInterrupt
    return read_records([out]) if out.is_file() else []
