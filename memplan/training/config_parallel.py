"""The multi-GPU sections of trainer configs (`--from`): FSDP and DeepSpeed settings into Setup fields.

- transformers TrainingArguments / TRL SFTConfig: `fsdp` ("full_shard auto_wrap", a list, "offload"),
  `fsdp_config` (a mapping or a JSON path: `version` / `fsdp_version`, `offload_params`,
  `reshard_after_forward`), `deepspeed` (a mapping or a JSON path: `zero_optimization.stage`,
  `offload_optimizer.device`, `offload_param.device`) -- transformers/training_args.py,
  transformers/integrations/deepspeed.py.
- axolotl: the same `fsdp` / `fsdp_config` (`fsdp_version`, `fsdp_offload_params`,
  `fsdp_sharding_strategy`, `reshard_after_forward`) and `deepspeed` keys.

The world size is not in these files (the launcher sets it): `--gpus N` gives it. Explicit DeepSpeed
bucket sizes are reported, not modelled: memplan uses Trainer's "auto" values for trainer recipes
(memplan.training.sharding.zero_buckets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from memplan.errors import SetupError

__all__ = ["PARALLEL_KEYS", "read_parallel"]

PARALLEL_KEYS = ("fsdp", "fsdp_config", "deepspeed")
# torch.distributed.fsdp.ShardingStrategy names (and TrainingArguments' lower-case `fsdp` options)
_STRATEGIES = {"full_shard": "fsdp", "shard_grad_op": "fsdp_shard_grad_op", "hybrid_shard": "fsdp_hybrid",
               "hybrid_shard_zero2": "fsdp_hybrid", "no_shard": "ddp"}


class _Plan(Protocol):
    path: str
    fields: dict[str, Any]
    notes: list[str]


def _mapping(value: Any, base: Path, what: str) -> dict[str, Any]:
    """A config section given inline or as a JSON file path (relative to the config's folder)."""
    if isinstance(value, dict):
        return value
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise SetupError(f"{what} {value!r}: no such file (looked in {path}); give the path relative to the config or inline")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SetupError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise SetupError(f"{what} {path}: expected a JSON object")
    return raw


def _fsdp(raw: dict[str, Any], plan: _Plan, base: Path) -> None:
    opts = raw.get("fsdp")
    words = opts.split() if isinstance(opts, str) else [str(o) for o in (opts or [])]
    cfg = _mapping(raw["fsdp_config"], base, "fsdp_config") if raw.get("fsdp_config") else {}
    strategy = str(cfg.get("fsdp_sharding_strategy", cfg.get("sharding_strategy", ""))).lower()
    chosen = next((_STRATEGIES[w] for w in words if w in _STRATEGIES), _STRATEGIES.get(strategy))
    if chosen is None and not words and not cfg:
        return
    f = plan.fields
    f["parallel"] = chosen or "fsdp"
    version = cfg.get("fsdp_version", cfg.get("version", 1))
    f["fsdp_version"] = int(version)
    if f["fsdp_version"] == 2 and cfg.get("reshard_after_forward", cfg.get("fsdp_reshard_after_forward", True)) is False:
        f["parallel"] = "fsdp_shard_grad_op"
    if "offload" in words or cfg.get("offload_params") or cfg.get("fsdp_offload_params"):
        f["offload"] = "params_and_optimizer"
    if f["parallel"] == "ddp":
        f["fsdp_version"] = 1


def _deepspeed(raw: dict[str, Any], plan: _Plan, base: Path) -> None:
    ds = _mapping(raw["deepspeed"], base, "deepspeed")
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage == 0:
        plan.fields["parallel"] = "ddp"
        plan.notes.append("deepspeed with ZeRO stage 0 is data parallel: modelled as DDP")
        return
    plan.fields["parallel"] = f"zero{stage}"
    if (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"):
        plan.fields["offload"] = "params_and_optimizer"
    elif (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
        plan.fields["offload"] = "optimizer"
    explicit = {k: v for k, v in zero.items() if k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                                       "stage3_param_persistence_threshold") and v != "auto"}
    if explicit:
        plan.notes.append("deepspeed " + ", ".join(f"{k}={v}" for k, v in explicit.items()) + " not modelled: memplan uses "
                          + ("DeepSpeed's defaults" if plan.fields.get("recipe") == "plain" else "Trainer's \"auto\" values (hidden²)"))


def read_parallel(raw: dict[str, Any], plan: _Plan, base: Path) -> None:
    """Map the file's fsdp/deepspeed sections into `plan.fields` (parallel, fsdp_version, offload, quant_storage)."""
    if raw.get("deepspeed"):
        _deepspeed(raw, plan, base)
    elif raw.get("fsdp") or raw.get("fsdp_config"):
        _fsdp(raw, plan, base)
    if "parallel" not in plan.fields:
        return
    f = plan.fields
    quant = f.get("quant")
    if quant in ("nf4", "fp4") and f["parallel"] not in ("ddp", "zero1", "zero2") and "quant_storage" not in f:
        # bitsandbytes docs/source/fsdp_qlora.md: the 4-bit storage must be the compute dtype to be flattened.
        f["quant_storage"] = f.get("compute_dtype", "bf16")
        plan.notes.append(f"bnb_4bit_quant_storage not given: set to {f['quant_storage']}, which FSDP / ZeRO-3 need to shard a 4-bit base")
    plan.notes.append(f"{f['parallel']} from the file: the world size comes from the launcher; give it with --gpus N")
