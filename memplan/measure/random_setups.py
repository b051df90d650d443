"""Random small models and training setups: validation that cannot be tuned to.

`draw_cases(n, seed=S, folder=DIR)` draws `n` (model config, setup) pairs with
`random.Random(S)` and writes each config to `DIR/<i>-<family>/config.json`, so a
profiler run and the estimator read the same file. Families come round-robin in a
shuffled order (every supported family in every 8 draws); each config gets random
small dimensions (hidden, heads and KV heads, head_dim, intermediate, 1-3 layers,
vocabulary, tying, experts), each setup every flag `memplan estimate` takes. Only
valid combinations are kept: `Setup`'s own checks and `estimate()`'s refusals
(gemma2 without SDPA, GPT-2/BERT positions, autocast outside its families, a LoRA
rank beyond a target) reject a draw, and the setup is drawn again. Nothing here
imports torch; the draw is a pure function of the seed and of those checks, so a seed
reproduces a draw on the same memplan version (a new refusal changes later draws).
"""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from memplan.errors import MemplanError
from memplan.training.setup import OPTIMIZERS, Setup

__all__ = ["FAMILIES", "RandomCase", "draw_config", "draw_setup", "draw_case", "draw_cases", "fresh_seed"]

FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3", "gpt2", "bert")
# Families whose config honours an explicit head_dim that differs from hidden / heads.
_FREE_HEAD_DIM = ("llama", "mistral", "mixtral", "qwen2", "gemma2")
_MAX_TRIES = 200


@dataclass(frozen=True)
class RandomCase:
    family: str
    config: dict[str, Any]
    setup: Setup  # setup.model is the path of the written config.json


def fresh_seed() -> int:
    """A new seed for a run that did not ask for one (short enough to retype)."""
    return secrets.randbelow(10**6)


def _heads(rng: random.Random, gqa: bool) -> tuple[int, int]:
    heads = rng.choice((1, 2, 4, 6, 8))
    kv = rng.choice([d for d in range(1, heads + 1) if heads % d == 0]) if gqa else heads
    return heads, kv


def draw_config(rng: random.Random, family: str, *, min_positions: int = 512) -> dict[str, Any]:
    """A small, valid transformers config of `family` (pad/bos/eos ids 0, inside any vocabulary)."""
    layers = rng.randint(1, 3)
    vocab = rng.randint(32, 3000)
    if family in ("gpt2", "bert"):
        heads, _ = _heads(rng, gqa=False)
        hidden = heads * rng.choice((8, 12, 16, 24, 32))
        inner = rng.randint(hidden // 2, 4 * hidden)
        positions = rng.randint(min_positions, 2 * min_positions)
        if family == "gpt2":
            cfg = dict(model_type="gpt2", n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions, vocab_size=vocab,
                       bos_token_id=0, eos_token_id=0)
            if rng.random() < 0.7:
                cfg["n_inner"] = inner  # else GPT-2's default 4 x n_embd
            return cfg
        return dict(model_type="bert", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=inner, max_position_embeddings=positions, vocab_size=vocab,
                    type_vocab_size=rng.randint(1, 4), pad_token_id=0)
    heads, kv = _heads(rng, gqa=True)
    head_dim = rng.choice((8, 16, 24, 32))
    cfg: dict[str, Any] = dict(model_type=family, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                               vocab_size=vocab, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if family in _FREE_HEAD_DIM and (family == "gemma2" or rng.random() < 0.4):
        # transformers 5 checks hidden % heads even with an explicit head_dim (validate_architecture).
        cfg["hidden_size"] = heads * rng.choice((8, 16, 24, 32, 40))
        cfg["head_dim"] = head_dim
    else:
        cfg["hidden_size"] = heads * head_dim
    hidden = cfg["hidden_size"]
    cfg["intermediate_size"] = rng.randint(hidden // 2, 4 * hidden)
    if family == "mixtral":
        # MixtralExperts runs torch._grouped_mm, which needs 16-byte-aligned strides
        # ("strides should be multiple of 16 bytes" otherwise): intermediate % 8 == 0 in bf16.
        cfg["intermediate_size"] = max(8, cfg["intermediate_size"] // 8 * 8)
    if family != "gemma2":  # gemma2 ties its embeddings (its default, and every released checkpoint)
        cfg["tie_word_embeddings"] = rng.random() < 0.3
    if family == "mixtral":
        experts = rng.randint(2, 6)
        cfg["num_local_experts"] = experts
        cfg["num_experts_per_tok"] = rng.randint(1, min(experts, 3))
    if family == "llama" and rng.random() < 0.3:
        cfg["attention_bias"] = True
    return cfg


def _targets(rng: random.Random, family: str, config: dict[str, Any]) -> tuple[str, ...] | None:
    from memplan.model.architectures import spec_from_config

    roll = rng.random()
    if roll < 0.35:
        return None  # PEFT's default for the family
    if roll < 0.6:
        return ("all-linear",)
    names = sorted({lin.name for lin in spec_from_config(config, name=family).linears if not lin.is_output})
    return tuple(sorted(rng.sample(names, rng.randint(1, len(names)))))


def draw_setup(rng: random.Random, family: str, config: dict[str, Any], model: str) -> Setup:
    """Every flag drawn at random; raises MemplanError where the combination is impossible."""
    mixed = rng.random() < 0.15  # fp32 master weights under bf16/fp16 autocast (refused outside its families)
    quant = "fp32" if mixed else rng.choice(("bf16", "bf16", "fp16", "fp32", "int8", "nf4", "nf4", "fp4"))
    quantized = quant in ("int8", "nf4", "fp4")
    method = "full" if not quantized and rng.random() < 0.3 else "lora"
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    fields: dict[str, Any] = dict(
        model=model,
        device="cpu",
        method=method,
        quant=quant,
        double_quant=quant in ("nf4", "fp4") and rng.random() < 0.5,
        compute_dtype=rng.choice(("bf16", "bf16", "fp16", "fp32")) if quantized else "bf16",
        seq_len=rng.randint(8, min(256, positions or 256)),
        batch_size=rng.randint(1, 4),
        grad_checkpointing=rng.random() < 0.4,
        optimizer=rng.choice(OPTIMIZERS),
        attention="eager" if family == "gemma2" else rng.choice(("sdpa", "sdpa", "eager")),
        prepare_kbit_training=quantized and rng.random() < 0.3,
        autocast=rng.choice(("bf16", "fp16")) if mixed else "none",
    )
    if method == "lora":
        fields.update(lora_rank=rng.choice((1, 2, 4, 8, 16, 32, 64)), lora_targets=_targets(rng, family, config),
                      lora_dropout=rng.choice((0.0, 0.0, 0.05, 0.1)))
    return Setup(**fields)


def _valid(setup: Setup, config: dict[str, Any], family: str) -> bool:
    """The estimator's own refusals count as invalid: what `memplan estimate` would reject is not drawn."""
    from memplan.model.architectures import spec_from_config
    from memplan.training.estimate import estimate

    try:
        estimate(setup, model=spec_from_config(config, name=family))
    except MemplanError:
        return False
    return True


def draw_cases(n: int, *, seed: int, folder: str | Path) -> list[RandomCase]:
    """`n` valid random cases, configs written under `folder`; the same seed gives the same cases."""
    rng = random.Random(seed)
    root = Path(folder)
    cases: list[RandomCase] = []
    order: list[str] = []
    for i in range(n):
        if not order:
            order = rng.sample(FAMILIES, len(FAMILIES))
        family = order.pop()
        cases.append(draw_case(rng, family, root / f"{i:03d}-{family}" / "config.json", draw_setup))
    return cases


def draw_case(rng: random.Random, family: str, path: Path, draw: Callable[..., Setup]) -> RandomCase:
    """A random config of `family` written to `path`, with the first setup `draw(rng, family, config,
    model)` gives that the estimator accepts (its refusals are redrawn)."""
    config = draw_config(rng, family)
    for _ in range(_MAX_TRIES):
        try:
            setup = draw(rng, family, config, str(path))
        except MemplanError:
            continue
        if _valid(setup, config, family):
            break
    else:  # pragma: no cover - every family has valid setups (bf16 LoRA, default targets)
        raise MemplanError(f"no valid setup for the random {family} config {config} after {_MAX_TRIES} draws")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return RandomCase(family, config, setup)


# The estimator's accuracy claim (README, "How the numbers are made": activations "byte-exact on
# the CPU ledger for llama, mistral, qwen2 and phi3"), which the fixed CPU matrix checks. Gemma2,
# GPT-2 and BERT have fixed runs too (within 2%, not byte-exact everywhere) and mixtral none, so
# their errors are reported per family, not claimed.
CLAIMED_FAMILIES = ("llama", "mistral", "qwen2", "phi3")


def random_campaign(n: int, *, seed: int, folder: str | Path, out: str | Path, workers: int = 1, steps: int = 3,
                    timeout_s: float | None = 600, on_record: Any = None) -> tuple[list[RandomCase], list[dict[str, Any]], bool]:
    """Draw `n` cases into `folder`, profile them on the CPU (`workers` at a time, resumable in `out`)
    -> (cases, their records, interrupted). Imports the profiler, hence torch."""
    from memplan.measure.profiler.campaign import Job, run_campaign
    from memplan.measure.profiler.device import collect_env
    from memplan.measure.records import read_records

    cases = draw_cases(n, seed=seed, folder=folder)
    result = run_campaign([Job(c.setup, None, steps) for c in cases], out=Path(out), env=collect_env("cpu"), workers=workers,
                          timeout_s=timeout_s, checkpoint_dir=Path(folder) / "checkpoints", on_record=on_record)
    return cases, case_records(cases, read_records([out]) if Path(out).is_file() else []), result.interrupted


def case_records(cases: list[RandomCase], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest record of each case (matched on its setup), in case order; cases without one are left out."""
    latest = {json.dumps(r["setup"], sort_keys=True): r for r in records}
    keys = [json.dumps(c.setup.to_dict(), sort_keys=True) for c in cases]
    return [latest[k] for k in keys if k in latest]


def _label(setup: Setup) -> str:
    """`Setup.label` plus the flags it leaves out (compute dtype of a quantized base, kbit prep, dropout)."""
    extra = []
    if setup.quant in ("int8", "nf4", "fp4") and setup.compute_dtype != "bf16":
        extra.append(f"compute-{setup.compute_dtype}")
    if setup.prepare_kbit_training:
        extra.append("kbit-prep")
    if setup.method == "lora" and setup.lora_dropout:
        extra.append(f"dropout{setup.lora_dropout:g}")
    return " ".join([setup.label(), *extra])


def peak_frame(records: list[dict[str, Any]]) -> Any:
    """One row per record: family, claimed, label, outcome, predicted/measured steady peak and
    weights, and their relative errors (`memplan.measure.compare`'s definition)."""
    import pandas as pd

    from memplan.measure.compare import compare_record

    rows = []
    for r in records:
        config = (r.get("model_info") or {}).get("config") or {}
        family = str(config.get("model_type", "?"))
        row: dict[str, Any] = {"family": family, "claimed": family in CLAIMED_FAMILIES, "label": _label(Setup.from_dict(r["setup"])),
                               "outcome": r["outcome"],
                               "error_message": (r.get("error") or {}).get("message")}
        for c in compare_record(r) if r["outcome"] == "ok" else []:
            if c["component"] in ("peak", "weights"):
                prefix = "peak" if c["component"] == "peak" else "weights"
                row[f"{prefix}_predicted_bytes"] = c["predicted_bytes"]
                row[f"{prefix}_measured_bytes"] = c["measured_bytes"]
                row[f"{prefix}_rel_error"] = c["rel_error"]
        rows.append(row)
    columns = ["family", "claimed", "label", "outcome", "error_message", "peak_predicted_bytes", "peak_measured_bytes",
               "peak_rel_error", "weights_predicted_bytes", "weights_measured_bytes", "weights_rel_error"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"claimed": bool})  # an empty frame would hold object columns
