"""Random sharded setups: a fresh model config and a parallel layout nobody listed.

`draw_sharded_cases(n, seed=S, folder=F)` draws, for the families whose activations memplan claims
(llama, mistral, qwen2, phi3), a random small config (`random_setups.draw_config`) and a random
world-size-2 layout (DDP, FSDP1/2 full shard or shard-grad-op, ZeRO-2/3) over full bf16, LoRA bf16 or
QLoRA (nf4, bf16 quant storage where the layout shards parameters), with random rank, targets,
sequence, batch and checkpointing. Setups the estimator refuses are redrawn, as the single-process
draw does. The same seed gives the same cases.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from memplan.measure.random_setups import CLAIMED_FAMILIES, RandomCase, _targets, draw_case
from memplan.training.parallel import shards_parameters
from memplan.training.setup import Setup

__all__ = ["draw_sharded_cases", "LAYOUTS"]

# (parallel, fsdp_version)
LAYOUTS = (("ddp", 1), ("fsdp", 1), ("fsdp", 2), ("fsdp_shard_grad_op", 1), ("fsdp_shard_grad_op", 2), ("zero2", 1), ("zero3", 1))


def draw_sharded_setup(rng: random.Random, family: str, config: dict[str, Any], model: str) -> Setup:
    parallel, version = rng.choice(LAYOUTS)
    kind = rng.choice(("full", "lora", "qlora", "qlora"))
    quant = "nf4" if kind == "qlora" else "bf16"
    positions = config.get("max_position_embeddings") or 256
    fields: dict[str, Any] = dict(
        model=model, device="cpu", gpus=2, parallel=parallel, fsdp_version=version,
        method="full" if kind == "full" else "lora", quant=quant, compute_dtype="bf16",
        double_quant=quant == "nf4" and rng.random() < 0.5,
        quant_storage="bf16" if quant == "nf4" and shards_parameters(parallel) else "uint8",
        seq_len=rng.randint(16, min(160, positions)), batch_size=rng.randint(1, 2),
        grad_checkpointing=rng.random() < 0.5, optimizer="adamw",
        # DeepSpeed through Trainer ("auto" buckets); FSDP/DDP through memplan's own loop, as the profiler runs them.
        recipe="trainer" if parallel.startswith("zero") else "plain",
    )
    if kind != "full":
        fields.update(lora_rank=rng.choice((4, 8, 16, 32)), lora_targets=_targets(rng, family, config))
    return Setup(**fields)


def draw_sharded_cases(n: int, *, seed: int, folder: str | Path) -> list[RandomCase]:
    rng = random.Random(seed)
    root = Path(folder)
    cases: list[RandomCase] = []
    for i in range(n):
        family = rng.choice(CLAIMED_FAMILIES)
        cases.append(draw_case(rng, family, root / f"{i:03d}-{family}-sharded" / "config.json", draw_sharded_setup))
    return cases
