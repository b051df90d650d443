"""`sweep(...)`: a grid of setups as one tidy pandas DataFrame, one row per setup.

Every row is `memplan.training.estimate.estimate` of one `Setup` (the single-setup estimator,
called once per setup: there is no second copy of its maths here), checked against
every GPU of the grid with `memplan.training.fit.Fit`, and, when fleet inputs are given, the
`memplan.serving.fleet.plan` of its model, rank and base format.

Options that do not apply to a combination are collapsed rather than refused, so a
grid can cross them freely: full fine-tuning has no LoRA rank, targets or dropout
(NA in those columns), `compute_dtype` is a quantized base's (NA for bf16/fp16/fp32), `autocast`
is an fp32 base's (`none` elsewhere),
and `double_quant` / `prepare_kbit_training` apply only to quantized bases (False elsewhere),
`fsdp_version` to FSDP layouts (NA elsewhere), `quant_storage` to nf4/fp4 bases (uint8 elsewhere). Combinations the library refuses (full
fine-tuning of an nf4 base, gemma2 with sdpa, a sequence past GPT-2's positions, `gpus: 8` with
`parallel: none`, a uint8 4-bit base under FSDP...) are left out; `frame.attrs["refused"]` counts them by reason.

Under a parallel layout every memory column is per GPU (`memplan.training.sharding`), and the
fits/headroom/smallest/cheapest columns compare that per-GPU peak with one GPU of each type.

Columns (stable; `column_dtypes` gives every dtype; categories are in order of
first appearance):

| column | dtype | what |
|---|---|---|
| model, method, quant, optimizer, attention, device | category | the setup (`attention` as resolved per model) |
| compute_dtype | category | a quantized base's compute dtype; NA for bf16/fp16/fp32 bases |
| double_quant, grad_checkpointing, prepare_kbit_training | bool | the setup |
| autocast | category | none, bf16, fp16: mixed precision over fp32 weights; `none` for every other base |
| recipe | category | plain, trainer, trl-sft, axolotl: what the trainer does besides the loop (`memplan.training.recipes`) |
| gpus, gpus_per_node | int64 | the layout: world size, GPUs per node (as resolved: min(gpus, data/gpus.json's gpus_per_node) unless given) |
| parallel, offload, quant_storage | category | the layout (`memplan.training.parallel`); quant_storage is uint8 off nf4/fp4 |
| fsdp_version | Int64 | 1 or 2 under FSDP layouts; NA for the others |
| lora_rank | Int64 | NA for full fine-tuning |
| lora_targets | category | comma list as given, `default` (PEFT's per-family default), NA for full |
| lora_dropout | float64 | NaN for full fine-tuning |
| modules_to_save | category | PEFT's trainable copies as a comma list (`embed_tokens,lm_head`); NA for none |
| seq_len, batch_size | int64 | the setup |
| variants, rps, serve_gpu, serve_quant, ... | int64 / float64 / category / bool | fleet inputs, only those in the grid |
| total_parameters, trainable_parameters | int64 | `Estimate` |
| weights_bytes ... peak_bytes | int64 | `Estimate.memory`, per GPU: weights (base, incl. quant state), quant_state (part of weights), adapters, gradients, optimizer_states, optimizer_paged (part of optimizer_states), activations (saved by layers and head, without logits), logits, transients, overhead, allocated_peak, peak |
| peak_phase | category | when the peak happens |
| peak_breakdown_bytes.{part} | int64 | what the peak is made of; the parts sum to peak_bytes (master_weights, comm_buffers, gathered: 0 on one GPU) |
| host_per_gpu_bytes, host_per_node_bytes | int64 | host RAM the offloaded state takes (`--offload`), per GPU and per node; 0 without offload |
| adapter_file_bytes.{fp32,fp16,bf16} | Int64 | PEFT's adapter_model.safetensors; NA for full |
| fits.{gpu} | boolean | peak <= the GPU's usable memory; NA on device cpu |
| headroom_bytes.{gpu} | Int64 | usable - peak (negative: does not fit); NA on device cpu |
| smallest_gpu, cheapest_gpu | category | among the grid's GPUs (order of `memplan.training.search`); NA if none fits |
| cheapest_usd_per_hour | float64 | gpus x the price of cheapest_gpu: the job's GPUs per hour |
| gpus.{strategy}, usd_per_month.{strategy} | float64 | fleet plan per strategy (full_finetune, lora, lorax, vllm_multi_lora); LoRA strategies NA on full rows |
| fleet_error | category | why the fleet planner refused the row (NA when it did not) |
"""

from __future__ import annotations

from collections import Counter
from itertools import product
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from memplan.errors import MemplanError
from memplan.model.lora import lora_targets_text
from memplan.model.storage import is_quantized
from memplan.model.storage import is_four_bit
from memplan.training.parallel import is_fsdp
from memplan.training.setup import autocast_applies, double_quant_applies, prepare_kbit_applies
from memplan.serving.fleet import STRATEGIES, PlanContext
from memplan.planning.grid import FLEET_KEYS, SETUP_KEYS, Grid, GridError, parse_grid
from memplan.planning.sweep_files import EXPORT_FORMATS, MAX_EXCEL_ROWS, check_output, read_sweep, write_sweep

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["sweep", "sweep_grid", "column_dtypes", "read_sweep", "write_sweep", "check_output", "EXPORT_FORMATS", "MEMORY_FIELDS",
           "PEAK_PARTS", "ADAPTER_DTYPES", "STRATEGIES", "MAX_EXCEL_ROWS"]

MEMORY_FIELDS = ("weights", "quant_state", "adapters", "gradients", "optimizer_states", "optimizer_paged", "activations",
                 "logits", "transients", "overhead", "allocated_peak", "peak")
PEAK_PARTS = ("weights", "adapters", "optimizer_states", "gradients", "activations", "logits", "transients", "overhead",
              "master_weights", "comm_buffers", "gathered")  # the last three: a parallel layout's own (0 on one GPU)
_ONE_GPU_PARTS = PEAK_PARTS[:8]  # what `Estimate.peak_parts` holds without a layout
HOST_FIELDS = ("host_per_gpu", "host_per_node")
ADAPTER_DTYPES = ("fp32", "fp16", "bf16")

_CATEGORY = ("model", "method", "quant", "compute_dtype", "lora_targets", "optimizer", "attention", "device", "autocast", "recipe",
             "modules_to_save",
             "parallel", "offload", "quant_storage",
             "serve_gpu", "serve_quant", "popularity", "train_gpu", "peak_phase", "smallest_gpu", "cheapest_gpu",
             "fleet_error")
_BOOL = ("double_quant", "grad_checkpointing", "prepare_kbit_training", "scale_to_zero")
_INT_NAMES = ("total_parameters", "trainable_parameters", *(f"{f}_bytes" for f in MEMORY_FIELDS),
              *(f"peak_breakdown_bytes.{p}" for p in PEAK_PARTS), *(f"{f}_bytes" for f in HOST_FIELDS))  # the estimate's integers, in column order
_INT = ("seq_len", "batch_size", "gpus", "gpus_per_node", "variants", "prompt_tokens", "output_tokens", "dataset_tokens", *_INT_NAMES)
_FLOAT = ("lora_dropout", "rps", "zipf_exponent", "utilization", "epochs", "cheapest_usd_per_hour")
_FLEET_FIELD = {"serve_gpu": "gpu", "serve_quant": "quant"}  # grid key -> memplan.serving.fleet.PlanInputs field
_PROGRESS_EVERY = 1024


def column_dtypes(columns: Sequence[str]) -> dict[str, str]:
    """The documented dtype of every sweep column (also used to restore an exported file)."""
    out: dict[str, str] = {}
    for c in columns:
        head = c.split(".", 1)[0]
        if c in _CATEGORY:
            out[c] = "category"
        elif c in _BOOL:
            out[c] = "bool"
        elif c in _INT:
            out[c] = "int64"
        elif c in _FLOAT or head in ("gpus", "usd_per_month"):
            out[c] = "float64"
        elif c in ("lora_rank", "fsdp_version") or head in ("headroom_bytes", "adapter_file_bytes"):
            out[c] = "Int64"
        elif head == "fits":
            out[c] = "boolean"
        else:
            raise ValueError(f"{c!r} is not a sweep column")
    return out


def sweep(
    *,
    model: str | Sequence[str],
    method: str | Sequence[str] = "lora",
    quant: str | Sequence[str] = "bf16",
    double_quant: bool | Sequence[bool] = False,
    compute_dtype: str | Sequence[str] = "bf16",
    lora_rank: int | Sequence[int] = 8,
    lora_targets: str | Sequence[Any] | None = None,
    lora_dropout: float | Sequence[float] = 0.0,
    seq_len: int | Sequence[int] = 512,
    batch_size: int | Sequence[int] = 1,
    grad_checkpointing: bool | Sequence[bool] | None = None,
    optimizer: str | Sequence[str] = "adamw",
    attention: str | Sequence[str | None] | None = None,
    device: str | Sequence[str] = "cuda",
    prepare_kbit_training: bool | Sequence[bool] = False,
    autocast: str | Sequence[str] = "none",
    gpus: int | Sequence[int] = 1,
    gpus_per_node: int | Sequence[int | None] | None = None,
    parallel: str | Sequence[str] = "none",
    fsdp_version: int | Sequence[int] = 1,
    offload: str | Sequence[str] = "none",
    quant_storage: str | Sequence[str] = "uint8",
    gpu: str | Sequence[str] | None = None,
    variants: int | Sequence[int] | None = None,
    rps: float | Sequence[float] | None = None,
    serve_gpu: str | Sequence[str] | None = None,
    fleet_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> "pd.DataFrame":
    """Estimate every combination of the given values; one row per setup (see the module
    docstring for the columns). Every argument takes a value or a list of values.

    `gpu`: GPUs to check each setup against (default: every catalog GPU). `variants`,
    `rps` and `serve_gpu` (together) add the fleet plan's GPUs and $/month per strategy;
    `fleet_options` sets the other `memplan plan` inputs (`serve_quant`, `popularity`,
    `prompt_tokens`, `engine`, ...). `progress(done, total)` is called as the grid runs.
    Raises `GridError` for a bad value before estimating anything."""
    raw: dict[str, Any] = {
        "model": model, "method": method, "quant": quant, "double_quant": double_quant, "compute_dtype": compute_dtype,
        "lora_rank": lora_rank, "lora_targets": lora_targets, "lora_dropout": lora_dropout, "seq_len": seq_len,
        "batch_size": batch_size, "grad_checkpointing": grad_checkpointing, "optimizer": optimizer, "attention": attention,
        "device": device, "prepare_kbit_training": prepare_kbit_training,
        "autocast": autocast, "gpus": gpus, "gpus_per_node": gpus_per_node, "parallel": parallel, "fsdp_version": fsdp_version,
        "offload": offload, "quant_storage": quant_storage,
    }
    if grad_checkpointing is None:  # PEFT's default, per prepare_kbit_training (the grid's default)
        del raw["grad_checkpointing"]
    for key, value in (("gpu", gpu), ("variants", variants), ("rps", rps), ("serve_gpu", serve_gpu)):
        if value is not None:
            raw[key] = value
    for key, value in (fleet_options or {}).items():
        if key not in FLEET_KEYS or key in raw:
            raise GridError(f"memplan.sweep(): fleet_options key {key!r} is not a fleet option; "
                            f"use one of {', '.join(k for k in FLEET_KEYS if k not in ('variants', 'rps', 'serve_gpu'))}")
        raw[key] = value
    return sweep_grid(parse_grid(raw, source="memplan.sweep()"), progress=progress)


_LORA_ONLY = ("lora_rank", "lora_targets", "lora_dropout")
_QUANTIZED_ONLY = ("compute_dtype",)  # bnb_4bit_compute_dtype: a bf16/fp16/fp32 base computes in its own dtype


def _points(grid: Grid, default_attention: Mapping[str, str]) -> Iterator[tuple[Any, ...]]:
    """Every distinct setup of the grid, as a tuple of Setup field values in SETUP_KEYS order.

    An option that cannot apply to a (model, method, quant) takes Setup's default, once:
    full fine-tuning has no rank, targets or dropout; compute_dtype is a quantized base's;
    double quantization needs nf4/fp4; prepare_kbit_training needs a quantized base, and
    an unset grad_checkpointing follows PEFT's default (on with it, Setup's rule); the
    FSDP version applies to FSDP layouts, the 4-bit quant storage to nf4/fp4 bases."""
    from dataclasses import fields

    from memplan.training.setup import Setup

    defaults = {f.name: f.default for f in fields(Setup)}
    g = grid.setup
    for model, method, quant in product(g["model"], g["method"], g["quant"]):
        values = dict(g, model=(model,), method=(method,), quant=(quant,))
        values["attention"] = tuple(dict.fromkeys(default_attention[model] if a is None else a for a in g["attention"]))
        if method != "lora":
            values.update({k: (defaults[k],) for k in _LORA_ONLY}, modules_to_save=(None,))
        if not double_quant_applies(quant):
            values["double_quant"] = (False,)
        if not autocast_applies(quant):
            values["autocast"] = (defaults["autocast"],)
        if not prepare_kbit_applies(quant):  # also where compute_dtype applies: a quantized base
            values.update({k: (defaults[k],) for k in _QUANTIZED_ONLY}, prepare_kbit_training=(False,))
        if not is_four_bit(quant):  # bnb_4bit_quant_storage
            values["quant_storage"] = (defaults["quant_storage"],)
        for kbit, parallel in product(values["prepare_kbit_training"], values["parallel"]):
            inner = dict(values, prepare_kbit_training=(kbit,), parallel=(parallel,))
            # Unset (None) follows PEFT's default: on with prepare_kbit_training, else off.
            inner["grad_checkpointing"] = tuple(dict.fromkeys(kbit if v is None else v for v in values["grad_checkpointing"]))
            if not is_fsdp(parallel):
                inner["fsdp_version"] = (defaults["fsdp_version"],)
            yield from product(*(inner[k] for k in SETUP_KEYS))


def sweep_grid(grid: Grid, *, progress: Callable[[int, int], None] | None = None) -> "pd.DataFrame":
    """`sweep` over an already checked `Grid` (from `memplan.planning.grid.parse_grid` or `load_grid`)."""
    from memplan.model.architectures import default_attention
    from memplan.training.estimate import estimate
    from memplan.training.setup import Setup

    keys = SETUP_KEYS
    fleet_keys = tuple(grid.fleet)
    fleet_combos = list(product(*grid.fleet.values())) if fleet_keys else [()]
    total = grid.combinations
    # Three blocks per row, each turned into arrays in one call: setup values, integers, the rest.
    setup_rows: list[tuple[Any, ...]] = []
    int_rows: list[tuple[int, ...]] = []
    other_rows: list[tuple[Any, ...]] = []
    refused: Counter[str] = Counter()
    fleet_cache: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    fleet_contexts: dict[tuple[Any, ...], PlanContext | str] = {}  # plan_context (or its error) per fleet input without N
    specs = grid.specs
    attention = {name: default_attention(spec) for name, spec in specs.items()}
    at_rank, at_targets, at_dropout = (keys.index(k) for k in _LORA_ONLY)
    at_compute, at_copies = keys.index("compute_dtype"), keys.index("modules_to_save")
    at_fsdp, at_per_node = keys.index("fsdp_version"), keys.index("gpus_per_node")
    peak_parts, file_sizes = itemgetter(*_ONE_GPU_PARTS), itemgetter(*ADAPTER_DTYPES)
    layout_parts = itemgetter(*PEAK_PARTS[len(_ONE_GPU_PARTS):])
    no_layout = (0,) * (len(PEAK_PARTS) - len(_ONE_GPU_PARTS) + len(HOST_FIELDS))
    no_files = (None,) * len(ADAPTER_DTYPES)
    for i, point in enumerate(_points(grid, attention)):
        if progress is not None and i % _PROGRESS_EVERY == 0:
            progress(i * len(fleet_combos), total)
        try:
            setup = Setup(**dict(zip(keys, point)))
            est = estimate(setup, model=specs[setup.model])
        except MemplanError as exc:
            refused[str(exc)] += 1
            continue
        m = est.memory
        values = list(point)
        if setup.method == "lora":
            values[at_targets] = lora_targets_text(setup.lora_targets)
        else:
            values[at_rank], values[at_targets], values[at_dropout] = None, None, None
        values[at_copies] = ",".join(setup.modules_to_save) if setup.modules_to_save else None
        if not is_quantized(setup.quant):
            values[at_compute] = None
        if not is_fsdp(setup.parallel):
            values[at_fsdp] = None
        values[at_per_node] = setup.gpus_per_node  # as Setup resolved it
        head = tuple(values)
        sh = est.sharding
        layout = no_layout if sh is None else (*layout_parts(est.peak_parts), sh.host_per_gpu, sh.host_per_node)
        ints = (est.total_parameters, est.trainable_parameters, m.weights, est.weight_storage.quant_state, m.adapters,
                m.gradients, m.optimizer_states, m.optimizer_paged, m.activations, m.logits, m.transients, m.overhead,
                m.allocated_peak, m.peak, *peak_parts(est.peak_parts), *layout)
        other = (m.peak_phase, *(file_sizes(est.adapter_file_bytes) if est.adapter_file_bytes else no_files))
        for fc in fleet_combos:
            setup_rows.append(head)
            int_rows.append(ints)
            fleet = _fleet_columns(setup, dict(zip(fleet_keys, fc)), fleet_cache, fleet_contexts) if fleet_keys else ()
            other_rows.append(other + fc + fleet)
    if progress is not None:
        progress(total, total)
    frame = _frame(grid, fleet_keys, setup_rows, int_rows, other_rows)
    frame.attrs["refused"] = dict(refused)
    return frame


def _fleet_columns(setup: Any, values: dict[str, Any], cache: dict[tuple[Any, ...], tuple[Any, ...]],
                   contexts: dict[tuple[Any, ...], PlanContext | str]) -> tuple[Any, ...]:
    """(GPUs per strategy, $/month per strategy, error) of `memplan.serving.fleet.plan`, cached per distinct input;
    the N-independent part (`plan_context`, or the error it raised) is cached per input without `variants`."""
    lora = setup.method == "lora"
    head = (setup.model, setup.quant, setup.lora_rank if lora else None, setup.lora_targets if lora else None)
    key = (*head, *values.items())
    if key not in cache:
        from memplan.serving.fleet import PlanInputs, plan_at, plan_context

        opts = {_FLEET_FIELD.get(k, k): v for k, v in values.items()}
        if lora:
            opts.update(lora_rank=setup.lora_rank, lora_targets=setup.lora_targets)
        try:
            inputs = PlanInputs(model=setup.model, train_quant=setup.quant, **opts)
            ctx_key = (*head, *((k, v) for k, v in values.items() if k != "variants"))
            if ctx_key not in contexts:
                try:
                    contexts[ctx_key] = plan_context(inputs)
                except MemplanError as exc:
                    contexts[ctx_key] = str(exc)
            ctx = contexts[ctx_key]
            error, p = (ctx, None) if isinstance(ctx, str) else (None, plan_at(ctx, inputs.variants))
        except MemplanError as exc:
            error, p = str(exc), None
        if p is None:
            cache[key] = (None,) * (2 * len(STRATEGIES)) + (error,)
        else:
            # A full fine-tuning row has no rank: only the full_finetune strategy applies to it.
            shown = [p.strategies[s] if lora or s == "full_finetune" else None for s in STRATEGIES]
            cache[key] = (*(None if r is None else r.gpus for r in shown),
                          *(None if r is None else r.usd_per_month for r in shown), None)
    return cache[key]


def _column(values: Any, dtype: str) -> Any:
    """One column (an object ndarray, None for NA) in its documented dtype."""
    import numpy as np
    import pandas as pd

    if dtype == "category":  # categories in order of first appearance
        codes, uniques = pd.factorize(np.asarray(values, dtype=object))
        return pd.Categorical.from_codes(codes, categories=pd.Index(uniques, dtype="str"))
    mask = np.asarray(pd.isna(values), dtype=bool)
    if dtype == "Int64":
        return pd.arrays.IntegerArray(np.where(mask, 0, values).astype(np.int64), mask)
    if dtype == "boolean":
        return pd.arrays.BooleanArray(np.where(mask, False, values).astype(bool), mask)
    if dtype == "float64":
        return np.where(mask, np.nan, values).astype(np.float64)
    return np.asarray(values).astype(dtype)


def _frame(grid: Grid, fleet_keys: tuple[str, ...], setup_rows: list[tuple[Any, ...]], int_rows: list[tuple[int, ...]],
           other_rows: list[tuple[Any, ...]]) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    from memplan.training.fit import Fit
    from memplan.hardware.gpus import gpu_catalog

    n = len(setup_rows)
    other_names = ["peak_phase", *(f"adapter_file_bytes.{d}" for d in ADAPTER_DTYPES), *fleet_keys]
    if fleet_keys:
        other_names += [*(f"gpus.{s}" for s in STRATEGIES), *(f"usd_per_month.{s}" for s in STRATEGIES), "fleet_error"]
    setups = np.empty((n, len(SETUP_KEYS)), dtype=object)
    others = np.empty((n, len(other_names)), dtype=object)
    if n:
        setups[:] = setup_rows
        others[:] = other_rows
    ints = np.array(int_rows, dtype=np.int64).reshape(n, len(_INT_NAMES))
    raw = {**{c: setups[:, j] for j, c in enumerate(SETUP_KEYS)}, **{c: others[:, j] for j, c in enumerate(other_names)}}
    dtypes = column_dtypes(list(raw))
    data: dict[str, Any] = {c: _column(raw[c], dtypes[c]) for c in (*SETUP_KEYS, *fleet_keys)}
    for j, c in enumerate(_INT_NAMES):
        data[c] = ints[:, j].copy()
        if c == "peak_bytes":
            data["peak_phase"] = _column(raw["peak_phase"], "category")
    for d in ADAPTER_DTYPES:
        data[f"adapter_file_bytes.{d}"] = _column(raw[f"adapter_file_bytes.{d}"], "Int64")

    # `Fit`'s arithmetic is elementwise: memplan.training.fit's one definition of headroom serves the whole column.
    not_cuda = np.asarray(raw["device"] != "cuda", dtype=bool)
    catalog = gpu_catalog()
    gpus = [catalog.get(key) for key in grid.gpus]
    fitting = {}
    headroom = {}
    for g in gpus:
        f = Fit(gpu=g.key, usable_bytes=g.usable_bytes, peak_bytes=data["peak_bytes"])  # type: ignore[arg-type]
        fitting[g.key] = np.asarray(f.fits, dtype=bool) & ~not_cuda
        data[f"fits.{g.key}"] = pd.arrays.BooleanArray(np.asarray(f.fits, dtype=bool), not_cuda.copy())
        headroom[f"headroom_bytes.{g.key}"] = pd.arrays.IntegerArray(np.asarray(f.headroom_bytes, dtype=np.int64), not_cuda.copy())
    data.update(headroom)
    # memplan.training.search's orders: smallest by (usable, price), cheapest by (price, usable); the first that fits wins.
    for col, rank in (("smallest_gpu", lambda g: (g.usable_bytes, g.usd_per_hour)), ("cheapest_gpu", lambda g: (g.usd_per_hour, g.usable_bytes))):
        order = sorted(gpus, key=rank)
        table = np.column_stack([fitting[g.key] for g in order]).reshape(n, len(order))
        first, found = table.argmax(axis=1), table.any(axis=1)
        picked = np.asarray([g.key for g in order], dtype=object)[first]
        picked[~found] = None
        data[col] = _column(picked, "category")
        if col == "cheapest_gpu":  # the job's GPUs per hour: gpus x one GPU's price
            price = np.asarray([g.usd_per_hour for g in order])[first] * data["gpus"]
            data["cheapest_usd_per_hour"] = np.where(found, price, np.nan)
    for c in other_names[1 + len(ADAPTER_DTYPES) + len(fleet_keys):]:
        data[c] = _column(raw[c], dtypes[c])
    return pd.DataFrame(data, index=pd.RangeIndex(n))
