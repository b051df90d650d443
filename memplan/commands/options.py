"""Flags shared by the commands (the only module one command may import from another).

`setup_options` adds every estimator input as a flag (`estimate`, `fit`, `profile`);
`setup_from_kwargs` turns the parsed values into a validated `Setup`. `grid_options`
adds the grid flags of `sweep` and `report`; `grid_from_options` reads them into a `Grid`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from memplan.model.storage import QUANTS
from memplan.planning.labels import choices_text
from memplan.serving.launch import ENGINES
from memplan.training.parallel import OFFLOADS, PARALLELS, QUANT_STORAGES
from memplan.training.setup import ATTENTIONS, AUTOCASTS, DEVICES, METHODS, OPTIMIZERS, RECIPES, Setup

__all__ = ["MODEL_HELP", "setup_options", "setup_from_kwargs", "SETUP_FLAGS", "output_format", "GRID_FLAGS", "grid_options", "grid_from_options",
           "note_terms"]

MODEL_HELP = "Catalog name (see `memplan models`), a config.json path, or a folder with one."

# (flag declaration, keyword, click kwargs)
SETUP_FLAGS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--model", "-m"), dict(default=None, help=MODEL_HELP + "  [required unless --from names one]")),
    (("--method",), dict(default="lora", show_default=True, help=choices_text(METHODS))),
    (("--quant", "-q"), dict(default="bf16", show_default=True, help=choices_text(QUANTS))),
    (("--double-quant/--no-double-quant",), dict(default=False, show_default=True, help="bnb_4bit_use_double_quant (nf4/fp4).")),
    (("--compute-dtype",), dict(default="bf16", show_default=True, help="Load/compute dtype of a quantized base (bnb_4bit_compute_dtype).")),
    (("--lora-rank", "-r"), dict(default=8, type=int, show_default=True, help="LoRA rank r.")),
    (("--lora-targets",), dict(default=None, help="Comma list of module names (q_proj,v_proj) or all-linear; default: PEFT's per-family default.")),
    (("--lora-dropout",), dict(default=0.0, type=float, show_default=True, help="LoRA dropout p (copies each adapted input when > 0).")),
    (("--seq-len", "-s"), dict(default=512, type=int, show_default=True, help="Tokens per sequence.")),
    (("--batch-size", "-b"), dict(default=1, type=int, show_default=True, help="Sequences per step (micro-batch).")),
    (("--grad-checkpointing/--no-grad-checkpointing",), dict(default=None, help="Gradient checkpointing.  [default: on with --prepare-kbit-training (PEFT's default), else off]")),
    (("--optimizer",), dict(default="adamw", show_default=True, help=choices_text(OPTIMIZERS))),
    (("--attention",), dict(default=None, help=choices_text(ATTENTIONS) + "  [default: transformers' own choice: sdpa, or eager for gemma2]")),
    (("--device",), dict(default="cuda", show_default=True, help=choices_text(DEVICES))),
    (("--prepare-kbit-training/--no-prepare-kbit-training",), dict(default=False, show_default=True, help="PEFT prepare_model_for_kbit_training.")),
    (("--autocast",), dict(default="none", show_default=True, help=choices_text(AUTOCASTS) + ": fp32 master weights (--quant fp32) with the forward under torch.autocast (Trainer's bf16=True / fp16=True).")),
    (("--recipe",), dict(default="plain", show_default=True, help=choices_text(RECIPES) + ": who runs the step (memplan's loop, transformers Trainer, TRL SFTTrainer, axolotl).")),
    (("--modules-to-save",), dict(default=None, help="Comma list of modules PEFT trains as full copies beside the adapters (embed_tokens,lm_head).")),
    (("--gpus",), dict(default=1, type=int, show_default=True, help="World size: GPUs in the job (--batch-size stays per GPU).")),
    (("--gpus-per-node",), dict(default=None, type=int, help="GPUs per node  [default: min(--gpus, data/gpus.json's gpus_per_node: 8)]")),
    (("--parallel",), dict(default="none", show_default=True, help=choices_text(PARALLELS) + ": DDP, FSDP (full shard, shard-grad-op, hybrid) or DeepSpeed ZeRO stage.")),
    (("--fsdp-version",), dict(default=1, type=int, show_default=True, help="1: FullyShardedDataParallel (FlatParameter); 2: fully_shard (per-parameter).")),
    (("--offload",), dict(default="none", show_default=True, help=choices_text(OFFLOADS) + ": FSDP CPUOffload / DeepSpeed offload_optimizer, offload_param.")),
    (("--quant-storage",), dict(default="uint8", show_default=True, help=choices_text(QUANT_STORAGES) + ": bnb_4bit_quant_storage (FSDP and ZeRO-3 need the compute dtype).")),
)


def setup_options(fn: Callable) -> Callable:
    for decls, kwargs in reversed(SETUP_FLAGS):
        fn = click.option(*decls, **kwargs)(fn)
    # Not in SETUP_FLAGS: `profile` repeats those flags and takes its own --from (the campaign's base).
    return click.option("--from", "from_file", default=None, type=click.Path(exists=True),
                        help="Read the setup from an axolotl YAML, a TRL SFTConfig / TrainingArguments YAML or JSON, "
                             "a PEFT adapter_config.json or a model folder; flags given override it.")(fn)


def output_format(choices: tuple[str, ...] = ("table", "json", "csv")) -> Callable:
    return click.option("--format", "-f", "fmt", default=choices[0], show_default=True, type=click.Choice(choices), help="Output format.")


def note_terms(*, always: bool = False) -> None:
    """Say on stderr which CUDA device terms the estimates use: always (`validate`, `report`),
    or only when they are the user's calibration rather than the shipped defaults (`estimate`,
    `fit`, `sweep`, whose stderr stays empty otherwise)."""
    from memplan.training.device_terms import terms_file, terms_note

    if always or terms_file()[1]:
        click.echo(terms_note(), err=True)


def setup_from_kwargs(kwargs: dict[str, Any]) -> Setup:
    """Pop the setup flags out of a command's kwargs and build the `Setup`."""
    from memplan.model.lora import parse_lora_targets

    targets = parse_lora_targets(kwargs.pop("lora_targets"))
    names = ("model", "method", "quant", "double_quant", "compute_dtype", "lora_rank", "lora_dropout", "seq_len",
             "batch_size", "grad_checkpointing", "optimizer", "attention", "device", "prepare_kbit_training", "autocast", "recipe",
             "modules_to_save", "gpus", "gpus_per_node", "parallel", "fsdp_version", "offload", "quant_storage")
    values = {n: kwargs.pop(n) for n in names}
    from_file = kwargs.pop("from_file", None)
    if from_file is not None:
        from memplan.training.config_files import read_config

        plan = read_config(from_file)
        ctx = click.get_current_context()
        given = {n for n in names + ("lora_targets",)
                 if ctx.get_parameter_source(n) in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)}
        for name, value in plan.fields.items():
            if name == "lora_targets":
                if "lora_targets" not in given:
                    targets = value
            elif name not in given:
                values[name] = value
        for line in plan.summary():
            click.echo(line, err=True)
    if values["model"] is None:
        raise click.UsageError("Missing option '--model' / '-m' (or a --from file that names the model).")
    if isinstance(values["modules_to_save"], str):
        values["modules_to_save"] = tuple(n for n in values["modules_to_save"].split(","))
    if values["attention"] is None:
        from memplan.model.architectures import default_attention
        from memplan.model.catalog import load_model

        values["attention"] = default_attention(load_model(values["model"]))
    return Setup(lora_targets=targets, **values)


# ---- grid flags (`memplan sweep`, `memplan report`) ----------------------------------------------

# key -> (flag declarations, help). Keys are memplan.planning.grid.KEYS; flag names are `memplan estimate`'s.
GRID_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "model": (("--model", "-m"), "Catalog names or config.json paths."),
    "method": (("--method",), choices_text(METHODS, ", ") + "."),
    "quant": (("--quant", "-q"), choices_text(QUANTS, ", ") + "."),
    "double_quant": (("--double-quant",), "true, false (nf4/fp4 only)."),
    "compute_dtype": (("--compute-dtype",), "Compute dtype of a quantized base."),
    "lora_rank": (("--lora-rank", "-r"), "LoRA ranks."),
    "lora_targets": (("--lora-targets",), "ONE target set per flag: q_proj,v_proj | all-linear | default."),
    "lora_dropout": (("--lora-dropout",), "LoRA dropout values."),
    "seq_len": (("--seq-len", "-s"), "Sequence lengths."),
    "batch_size": (("--batch-size", "-b"), "Batch sizes."),
    "grad_checkpointing": (("--grad-checkpointing",), "true, false."),
    "optimizer": (("--optimizer",), choices_text(OPTIMIZERS, ", ") + "."),
    "attention": (("--attention",), choices_text(ATTENTIONS, ", ") + ", default (transformers' choice per model)."),
    "device": (("--device",), choices_text(DEVICES, ", ") + "."),
    "prepare_kbit_training": (("--prepare-kbit-training",), "true, false."),
    "autocast": (("--autocast",), choices_text(AUTOCASTS, ", ") + " (fp32 bases only: mixed precision)."),
    "recipe": (("--recipe",), choices_text(RECIPES, ", ") + " (who runs the step)."),
    "modules_to_save": (("--modules-to-save",), "ONE set per flag: embed_tokens,lm_head | none (PEFT's trainable copies)."),
    "gpus": (("--gpus",), "World sizes: GPUs per job (--batch-size stays per GPU; more than 1 needs --parallel)."),
    "gpus_per_node": (("--gpus-per-node",), "GPUs per node [default: min(--gpus, data/gpus.json's gpus_per_node: 8)]."),
    "parallel": (("--parallel",), choices_text(PARALLELS, ", ") + "."),
    "fsdp_version": (("--fsdp-version",), "1, 2 (FSDP layouts only)."),
    "offload": (("--offload",), choices_text(OFFLOADS, ", ") + " (FSDP / ZeRO layouts only)."),
    "quant_storage": (("--quant-storage",), choices_text(QUANT_STORAGES, ", ") + " (bnb_4bit_quant_storage, nf4/fp4 only)."),
    "gpu": (("--gpu", "-g"), "GPUs to check every setup against [default: the whole catalog]."),
    "variants": (("--variants", "-n"), "Fleet: numbers of fine-tuned variants N."),
    "rps": (("--rps",), "Fleet: requests per second over all variants."),
    "serve_gpu": (("--serve-gpu",), "Fleet: serving GPU."),
    "serve_quant": (("--serve-quant",), "Fleet: serving format of the weights."),
}


def grid_options(fn: Callable) -> Callable:
    """Every grid flag, plus --grid FILE and --from FILE (the base values)."""
    for key, (decls, help_text) in reversed(GRID_FLAGS.items()):
        fn = click.option(*decls, key, multiple=True, default=(), metavar="LIST", help=help_text)(fn)
    fn = click.option("--from", "from_file", default=None, type=click.Path(exists=True),
                      help="Base values from an axolotl YAML, a TRL SFTConfig / TrainingArguments YAML or JSON, a PEFT "
                           "adapter_config.json or a model folder (as `memplan estimate --from`); --grid keys and flags override them.")(fn)
    return click.option("--grid", "grid_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="YAML or JSON grid file (keys: the flag names in snake_case).")(fn)


def grid_from_options(grid_file: Path | None, kwargs: dict[str, Any]) -> Any:
    """Pop the grid flags out of `kwargs`; read and check the grid (raises GridError before any work).

    Precedence, lowest first: a `--from` file's fields (its summary goes to stderr, as
    `estimate --from` prints it), the `--grid` file's keys, the flags."""
    from memplan.errors import MemplanError
    from memplan.planning.grid import config_base, load_grid, parse_grid, values_from_text

    flags = {}
    for key in GRID_FLAGS:
        texts = kwargs.pop(key)
        if texts:
            values = values_from_text(key, texts)
            flags[key] = values if len(values) > 1 else values[0]
    base: dict[str, Any] = {}
    from_file = kwargs.pop("from_file", None)
    if from_file is not None:
        from memplan.training.config_files import read_config

        plan = read_config(from_file)
        base, left_out = config_base(plan.fields)
        for line in plan.summary():
            click.echo(line, err=True)
        if left_out:
            click.echo(f"not a grid key, left out of the grid: {', '.join(left_out)}", err=True)
    source = f"--from {from_file}" if from_file is not None else ""
    if grid_file is not None:
        return load_grid(grid_file, overrides=flags, base=base, base_source=source)
    if not flags and not base:
        raise MemplanError("give a grid: --grid grid.yaml, --from a trainer config, or flags such as --model llama2-7b --quant bf16,nf4")
    return parse_grid({**base, **flags}, source=" + ".join(x for x in (source, "flags" if flags else "") if x))
