"""Setup flags shared by `estimate`, `fit`, `profile` and `sweep`.

`setup_options` adds every estimator input as a flag; `setup_from_kwargs`
turns the parsed values into a validated `Setup`.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from memplan.errors import SetupError
from memplan.training.setup import Setup

__all__ = ["setup_options", "setup_from_kwargs", "SETUP_FLAGS", "output_format"]

# (flag declaration, keyword, click kwargs)
SETUP_FLAGS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--model", "-m"), dict(required=True, help="Catalog name (see `memplan models`), a config.json path, or a folder with one.")),
    (("--method",), dict(default="lora", show_default=True, help="full | lora")),
    (("--quant", "-q"), dict(default="bf16", show_default=True, help="bf16 | fp16 | fp32 | int8 | nf4 | fp4")),
    (("--double-quant/--no-double-quant",), dict(default=False, show_default=True, help="bnb_4bit_use_double_quant (nf4/fp4).")),
    (("--compute-dtype",), dict(default="bf16", show_default=True, help="Load/compute dtype of a quantized base (bnb_4bit_compute_dtype).")),
    (("--lora-rank", "-r"), dict(default=8, type=int, show_default=True, help="LoRA rank r.")),
    (("--lora-targets",), dict(default=None, help="Comma list of module names (q_proj,v_proj) or all-linear; default: PEFT's per-family default.")),
    (("--lora-dropout",), dict(default=0.0, type=float, show_default=True, help="LoRA dropout p (copies each adapted input when > 0).")),
    (("--seq-len", "-s"), dict(default=512, type=int, show_default=True, help="Tokens per sequence.")),
    (("--batch-size", "-b"), dict(default=1, type=int, show_default=True, help="Sequences per step (micro-batch).")),
    (("--grad-checkpointing/--no-grad-checkpointing",), dict(default=False, show_default=True, help="Gradient checkpointing.")),
    (("--optimizer",), dict(default="adamw", show_default=True, help="adamw | adamw_8bit | paged_adamw_32bit | paged_adamw_8bit | sgd | sgd_momentum")),
    (("--attention",), dict(default=None, help="sdpa | eager | flash  [default: transformers' own choice: sdpa, or eager for gemma2]")),
    (("--device",), dict(default="cuda", show_default=True, help="cuda | cpu")),
    (("--prepare-kbit-training/--no-prepare-kbit-training",), dict(default=False, show_default=True, help="PEFT prepare_model_for_kbit_training.")),
    (("--autocast",), dict(default="none", show_default=True, help="none | bf16 | fp16: fp32 master weights (--quant fp32) with the forward under torch.autocast (Trainer's bf16=True / fp16=True).")),
)


def setup_options(fn: Callable) -> Callable:
    for decls, kwargs in reversed(SETUP_FLAGS):
        fn = click.option(*decls, **kwargs)(fn)
    return fn


def output_format(choices: tuple[str, ...] = ("table", "json", "csv")) -> Callable:
    return click.option("--format", "-f", "fmt", default=choices[0], show_default=True, type=click.Choice(choices), help="Output format.")


def setup_from_kwargs(kwargs: dict[str, Any]) -> Setup:
    """Pop the setup flags out of a command's kwargs and build the `Setup`."""
    targets_raw = kwargs.pop("lora_targets")
    targets = None
    if targets_raw is not None:
        targets = tuple(t.strip() for t in targets_raw.split(",") if t.strip())
        if not targets:
            raise SetupError("--lora-targets is empty; give module names (e.g. q_proj,v_proj) or all-linear")
    names = ("model", "method", "quant", "double_quant", "compute_dtype", "lora_rank", "lora_dropout", "seq_len",
             "batch_size", "grad_checkpointing", "optimizer", "attention", "device", "prepare_kbit_training", "autocast")
    values = {n: kwargs.pop(n) for n in names}
    if values["attention"] is None:
        from memplan.model.architectures import default_attention
        from memplan.model.catalog import load_model

        values["attention"] = default_attention(load_model(values["model"]))
    return Setup(lora_targets=targets, **values)
