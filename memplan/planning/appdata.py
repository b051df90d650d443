"""Plain data for the web app (`app/`): options, rows and labels, straight from the library.

No formulas and no streamlit here: every number is a field of a library result
(`estimate`, `fit_on`, `limits_on`, `plan`, `sweep`, `calibrate`), and bytes become
text only through `memplan.units`. The app's pages call these helpers and draw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from memplan.model.architectures import default_attention  # noqa: F401  (re-exported for the app)
from memplan.model.catalog import MAX_CONFIG_BYTES, catalog
from memplan.errors import ConfigError, MemplanError, ProfileError
from memplan.training.estimate import Estimate
from memplan.training.fit import fits_on_catalog
from memplan.hardware.gpus import GPU, GPUCatalog
from memplan.model.spec import ModelSpec
from memplan.planning.labels import PART_LABELS  # noqa: F401  (re-exported for the app)
from memplan.planning import appdata_layout as _layout
from memplan.planning.appdata_layout import (FSDP_VERSIONS, MAX_APP_GPUS, fsdp_version_applies, host_rows,  # noqa: F401  (GPUs and
                                             is_per_gpu, layout_caption, offload_choices, parallel_choices,  # sharding: re-exported
                                             parallel_label, quant_storage_choices)  # for the app)
from memplan.units import format_bytes, to_gib

if TYPE_CHECKING:
    import pandas as pd

    from memplan.serving.fleet import Plan, VariantSweep

__all__ = [
    "PART_LABELS",
    "BreakdownPart",
    "to_gib",
    "catalog_names",
    "gpu_label",
    "default_attention",
    "MAX_UPLOAD_LAYERS",
    "spec_from_upload",
    "breakdown",
    "breakdown_rows",
    "fit_rows",
    "price_rows",
    "catalog_with_price_rows",
    "usd",
    "seconds",
    "gpus_text",
    "STRATEGY_TITLES",
    "plan_caption",
    "strategy_cards",
    "CARD_FIGURES",
    "strategy_table",
    "coinciding",
    "AXIS_UNITS",
    "axis_unit",
    "in_unit",
    "crossover_rows",
    "crossover_text",
    "assumption_rows",
    "PROFILES_ENV",
    "profiles_folders",
    "profiles_caption",
    "comparison_rows",
    "calibration_points",
    "error_stats",
    "worst_rows",
    "calibration_summary",
    "REPORT_COLUMNS",
    "report_view",
    "report_caption",
    "refused_rows",
    *_layout.__all__,
]

# Published decoders have at most a few hundred layers (Llama 3.1 405B: 126). Per-layer work
# (the adapter file's header names every layer's tensors) grows with the count, so an uploaded
# config with millions of layers would stall the server for minutes: the app refuses it.
MAX_UPLOAD_LAYERS = 1024


@dataclass(frozen=True)
class BreakdownPart:
    key: str
    label: str
    bytes: int
    gib: float  # the same bytes in GiB (2**30)
    text: str  # format_bytes(bytes)
    value: float = 0.0  # the same bytes in the chart axis' unit (`axis_unit`)


# The breakdown chart's axis: GiB, or TiB once the bar or the GPU reaches 1 TiB (a "1.20 TiB"
# segment on a GiB axis read as a misprint).
AXIS_UNITS = {"GiB": 2**30, "TiB": 2**40}


def axis_unit(largest_bytes: int) -> str:
    return "TiB" if largest_bytes >= AXIS_UNITS["TiB"] else "GiB"


def in_unit(n: int, unit: str) -> float:
    """Bytes as a number of `unit` (an `AXIS_UNITS` key), for a chart axis; text goes through `format_bytes`."""
    return n / AXIS_UNITS[unit]


def catalog_names() -> list[str]:
    return [e.name for e in catalog()]


def gpu_label(gpu: GPU) -> str:
    """Short enough for the sidebar's select box (the full name is in the page and the tables)."""
    return f"{gpu.key} ({format_bytes(gpu.usable_bytes)})"


def spec_from_upload(filename: str, data: bytes) -> ModelSpec:
    """A `ModelSpec` from an uploaded `config.json`: JSON only (never code), at most
    `MAX_CONFIG_BYTES`, a Hugging Face config or a memplan catalog file."""
    from memplan.model.architectures import spec_from_config

    where = filename or "the uploaded file"
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is {len(data):,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,} bytes")
    if not data.strip():
        raise ConfigError(f"{where} is empty; upload a Hugging Face config.json")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text; upload a Hugging Face config.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a config.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} holds a JSON {type(raw).__name__}; a config.json is a JSON object")
    source = f"uploaded {where}"
    if "config" in raw and "name" in raw:  # a memplan catalog file
        config, name, source = raw["config"], str(raw["name"]), str(raw.get("source") or source)
    else:
        config = raw
        given = raw.get("_name_or_path")
        name = given if isinstance(given, str) and given else None
        name = name or (Path(where).stem if Path(where).stem not in ("", "config") else "uploaded-model")
    try:
        spec = spec_from_config(config, name=name, source=source)
    except MemplanError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # a field of the wrong JSON type
        raise ConfigError(f"{where} has a malformed field ({type(exc).__name__}: {exc}); compare it with a Hugging Face config.json") from None
    if spec.num_layers > MAX_UPLOAD_LAYERS:
        raise ConfigError(f"{where} has {spec.num_layers:,} layers; the app sizes models of at most {MAX_UPLOAD_LAYERS:,} "
                          "(use `memplan estimate --model` for larger ones)")
    return spec


def breakdown(est: Estimate, *, unit: str = "GiB") -> list[BreakdownPart]:
    """The peak's parts (they sum to `est.memory.peak`), in stacking order, zeros left out."""
    parts = [BreakdownPart(k, PART_LABELS[k], v, to_gib(v), format_bytes(v), in_unit(v, unit))
             for k, v in est.peak_parts.items() if v]
    return sorted(parts, key=lambda p: list(PART_LABELS).index(p.key))


def breakdown_rows(est: Estimate) -> list[dict[str, Any]]:
    """The breakdown as a table, to the byte, with the peak as its last row."""
    rows = [{"part": p.label, "size": p.text, "bytes": f"{p.bytes:,}"} for p in breakdown(est)]
    return rows + [{"part": f"peak ({est.memory.peak_phase})", "size": format_bytes(est.memory.peak), "bytes": f"{est.memory.peak:,}"}]


def fit_rows(est: Estimate, gpus: GPUCatalog) -> list[dict[str, Any]]:
    """One row per catalog GPU: does the estimate fit, with how much headroom."""
    by_key = {g.key: g for g in gpus.gpus}
    rows = []
    for f in sorted(fits_on_catalog(est, gpus), key=lambda f: (f.usable_bytes, f.gpu)):
        g = by_key[f.gpu]
        rows.append({
            "GPU": g.key,
            "name": g.name,
            "fits": "yes" if f.fits else "no",
            "usable": format_bytes(f.usable_bytes),
            "headroom": format_bytes(f.headroom_bytes),
            "$/hour": f"${g.usd_per_hour:,.3f}",  # the catalog's price as written (3 decimals)
        })
    return rows


# ---- fleet and cost -----------------------------------------------------------------------

STRATEGY_TITLES = {"full_finetune": "Full fine-tuning", "lora": "LoRA (merged)", "lorax": "LoRAX (shared base)",
                   "vllm_multi_lora": "vLLM multi-LoRA (shared base)"}


def price_rows(gpus: GPUCatalog) -> list[dict[str, Any]]:
    """The editable price table, prefilled from the catalog."""
    return [{"GPU": g.key, "name": g.name, "usd_per_hour": g.usd_per_hour, "source": f"{g.price_provider} {g.price_date}".strip()}
            for g in gpus.gpus]


def catalog_with_price_rows(gpus: GPUCatalog, rows: Iterable[dict[str, Any]], *,
                            storage_usd_per_gb_month: float | None = None) -> GPUCatalog:
    """The catalog with the prices of an edited price table (the changed ones become user overrides)."""
    current = {g.key: g.usd_per_hour for g in gpus.gpus}
    changed: dict[str, float] = {}
    for row in rows:
        key, price = row.get("GPU"), row.get("usd_per_hour")
        if key not in current:
            continue
        if price != current[key]:
            changed[str(key)] = price  # checked by with_prices (check_gpu_price)
    out = gpus.with_prices(changed) if changed else gpus
    if storage_usd_per_gb_month is not None and storage_usd_per_gb_month != out.storage_usd_per_gb_month:
        out = out.with_storage_price(storage_usd_per_gb_month)
    return out


def usd(x: float | None) -> str:
    """Dollars as `memplan plan` prints them."""
    from memplan.units import format_usd as _usd

    return _usd(x)


def seconds(x: float | None) -> str:
    """Seconds as `memplan plan` prints them (ms below one second)."""
    from memplan.units import format_seconds as _secs

    return _secs(x)


def gpus_text(x: float) -> str:
    """A GPU count as `memplan plan` prints it (time-averaged counts say so)."""
    from memplan.units import format_gpus as _gpus

    return _gpus(x)


def plan_caption(p: Plan) -> str:
    inp, g = p.inputs, p.gpu
    pop = "uniform" if inp.popularity == "uniform" else f"Zipf s = {inp.zipf_exponent:g}"
    return (f"{inp.model}: {inp.variants:,} variants, {inp.rps:g} requests/s in all ({pop}), {inp.prompt_tokens:,} + "
            f"{inp.output_tokens:,} tokens per request, served in {inp.quant} "
            + (f"on {g.key} at ${g.usd_per_hour:g}/GPU-hour. " if g is not None else "on each strategy's cheapest GPU. ") +
            f"Checkpoint {format_bytes(p.checkpoint_bytes, decimal=True)}, LoRA r = {inp.lora_rank} adapter "
            f"{format_bytes(p.adapter_file_bytes, decimal=True)}. GB = 10⁹ bytes.")


def strategy_cards(p: Plan) -> list[dict[str, Any]]:
    """One card per strategy of a `memplan.serving.fleet.Plan`: its figures as text, and its note."""
    cheapest = min(p.strategies, key=lambda n: p.strategies[n].usd_per_month)
    cards = []
    for name, s in p.strategies.items():
        cards.append({
            "strategy": name,
            "title": STRATEGY_TITLES.get(name, name),
            "cheapest": name == cheapest,
            "GPUs": gpus_text(s.gpus),
            "$/month": usd(s.usd_per_month),
            "Storage": format_bytes(s.storage_bytes, decimal=True),
            "Cold start": seconds(s.cold_start_s),
            "Adapter swap": seconds(s.swap_latency_s),
            "Training (one-time)": usd(s.training_usd),
            "replica": f"{gpus_text(s.replicas)} replica(s) of {s.memory.tp} x {s.gpu.key if s.gpu else ''} on {s.engine}",
            "note": s.note,
        })
    return cards


# The figures of a strategy card, in the order the fleet page's table lists them, with their hints.
CARD_FIGURES = (("$/month", "GPUs x hours per month + storage"), ("GPUs", "GPUs running (a time average with scale-to-zero)"),
                ("Storage", "checkpoints and adapters; GB = 10⁹ bytes"), ("Training (one-time)", "fine-tuning all N variants once"),
                ("Cold start", "bring up one replica: the bytes it loads / storage bandwidth"),
                ("Adapter swap", "one adapter from disk to the GPU"))


def strategy_table(cards: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cards side by side as a table: one row per figure, one column per strategy ("n/a" for a
    figure that does not apply: a lone "-" would render as a markdown bullet)."""
    return [{"": label, **{c["title"]: "n/a" if c[label] == "-" else c[label] for c in cards}} for label, _ in CARD_FIGURES]


def coinciding(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of strategies whose $/month is the same at every N of `crossover_rows` (their lines overlap)."""
    by: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append((r["variants"], r["usd_per_month"]))
    names = list(by)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if sorted(by[a]) == sorted(by[b])]


def crossover_rows(sw: VariantSweep) -> list[dict[str, Any]]:
    """(variants, strategy, usd_per_month) for every plan of a `memplan.serving.fleet.Sweep`."""
    from memplan.serving.fleet import frame_rows

    return [{"variants": r["variants"], "strategy": r["strategy"], "usd_per_month": r["usd_per_month"]} for r in frame_rows(sw)]


def crossover_text(crossovers: Iterable[dict[str, Any]], *, variants: tuple[int, ...]) -> str:
    lines = [f"{STRATEGY_TITLES.get(c['cheaper_from'], c['cheaper_from'])} costs less per month than "
             f"{STRATEGY_TITLES.get(c['cheaper_before'], c['cheaper_before'])} from N = {c['variants']:,}" for c in crossovers]
    return "; ".join(lines) + "." if lines else f"No crossover between N = {min(variants):,} and {max(variants):,}: the cheapest strategy stays the cheapest."


def assumption_rows(p: Plan) -> list[dict[str, Any]]:
    """Every number behind a plan, with its unit and source (`Plan.assumptions`)."""
    return [{"name": k, "value": str(v["value"]), "unit": v.get("unit", ""), "source": v.get("source", "")} for k, v in p.assumptions.items()]


# ---- calibration ----------------------------------------------------------------------------

# `memplan app --profiles PATH` hands the folder to the app through this variable: the page
# never reads a path typed into the browser.
PROFILES_ENV = "MEMPLAN_APP_PROFILES"


def profiles_folders() -> list[Path]:
    """The profile records the calibration page reads: `memplan app --profiles PATH`, else what
    `memplan validate`, `calibrate` and `report` read (`memplan.measure.records.default_record_folders`:
    the shipped records plus the user's `./profiles/` in the working directory, when it exists)."""
    import os

    from memplan.measure.records import default_record_folders

    given = os.environ.get(PROFILES_ENV)
    return [Path(given)] if given else default_record_folders()


def profiles_caption(folders: Sequence[Path]) -> str:
    """Which folders the calibration page read, each saying whose it is."""
    import os

    from memplan.paths import profiles_dir

    if os.environ.get(PROFILES_ENV):
        return f"Profile records from {', '.join(map(str, folders))} (given to `memplan app --profiles`)."
    if not folders:
        return "No profile records: memplan ships none here and there is no ./profiles/ in the working directory."
    named = [f"{f} (shipped with memplan)" if f == profiles_dir() else f"{f} (yours: ./profiles/)" for f in folders]
    return (f"Profile records from {' + '.join(named)}, as `memplan validate` reads them "
            "(`memplan app --profiles PATH` reads another folder or file instead).")



def comparison_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """`memplan.measure.compare.compare_record` for every record, each row with a device kind and a label."""
    from memplan.measure.compare import compare_record
    from memplan.training.setup import Setup

    out = []
    for rec in records:
        rows = compare_record(rec)
        label = Setup.from_dict(rec["setup"]).label(layers=rec.get("layers")) if rows else ""
        for row in rows:
            if row["measured_bytes"] is None or row["rel_error"] is None:
                continue
            kind = f"{row['device']}: {row['device_name']}" if row.get("device_name") else str(row["device"])
            out.append({**row, "kind": kind, "label": label})
    return out


def calibration_points(rows: Iterable[dict[str, Any]], *, kind: str, component: str) -> list[dict[str, Any]]:
    """The scatter's points: one per record of `kind` for `component`, in GiB for the axes."""
    return [{**r, "measured_gib": to_gib(r["measured_bytes"]), "predicted_gib": to_gib(r["predicted_bytes"]),
             "error_text": f"{r['rel_error']:+.1%}"}
            for r in rows if r["kind"] == kind and r["component"] == component]


def error_stats(points: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Records, median and largest |relative error|, and the mean signed error (bias), as text."""
    from memplan.measure.stats import error_stats as summarize

    s = summarize(p["rel_error"] for p in points)
    if s is None:
        return {"records": "0", "median |error|": "-", "max |error|": "-", "mean error (bias)": "-"}
    return {"records": f"{s.count:,}", "median |error|": f"{s.median_abs:.1%}",
            "max |error|": f"{s.max_abs:.1%}", "mean error (bias)": f"{s.mean:+.1%}"}


def worst_rows(points: Sequence[dict[str, Any]], *, n: int = 10) -> list[dict[str, Any]]:
    """The `n` records with the largest |relative error|."""
    worst = sorted(points, key=lambda p: -abs(p["rel_error"]))[:n]
    return [{"setup": p["label"], "predicted": format_bytes(p["predicted_bytes"]), "measured": format_bytes(p["measured_bytes"]),
             "error": p["error_text"], "record": p["id"]} for p in worst]


def calibration_summary(records: list[dict[str, Any]]) -> dict[str, str] | None:
    """`memplan.measure.calibrate`'s fitted CUDA terms and held-out errors as text; None without 2 CUDA runs."""
    from memplan.measure.calibrate import calibrate

    try:
        cal = calibrate(records)
    except ProfileError:
        return None
    s = cal.summary()

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    return {"CUDA context": format_bytes(cal.terms.cuda_context_bytes), "workspace": format_bytes(cal.terms.workspace_bytes),
            "allocator slack": f"{cal.terms.allocator_fraction:.2%}", "fitted / held out": f"{s['fit_records']} / {s['held_out_records']}",
            "held-out median |error|": pct(s["allocated_median_abs_error"]), "held-out max |error|": pct(s["allocated_max_abs_error"])}


# ---- report ------------------------------------------------------------------------------------

REPORT_COLUMNS = ("model", "method", "quant", "lora_rank", "seq_len", "batch_size", "peak", "fits", "headroom",
                  "trainable_parameters", "peak_bytes")


def report_view(frame: pd.DataFrame, gpu: str) -> pd.DataFrame:
    """The columns of a `memplan.planning.sweep` frame worth reading on screen, bytes also as text."""
    view = frame[[c for c in REPORT_COLUMNS if c in frame.columns]].copy()
    view.insert(view.columns.get_loc("batch_size") + 1, "peak", [format_bytes(int(b)) for b in frame["peak_bytes"]])
    view.insert(view.columns.get_loc("peak") + 1, "fits", frame[f"fits.{gpu}"])
    view.insert(view.columns.get_loc("fits") + 1, "headroom", [format_bytes(int(b)) for b in frame[f"headroom_bytes.{gpu}"]])
    return view


def report_caption(frame: pd.DataFrame, gpu: str) -> str:
    refused = sum(frame.attrs.get("refused", {}).values())
    fitting = int(frame[f"fits.{gpu}"].sum()) if len(frame) else 0
    return (f"{len(frame):,} setups: {fitting:,} fit on {gpu}" + (f"; {refused:,} left out (below)" if refused else "")
            + ". The CSV holds every column of `memplan.planning.sweep` in bytes; the table shows binary units (GiB = 2³⁰ bytes).")


def refused_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Why `memplan.planning.sweep` left combinations out, with how many."""
    return [{"combinations": n, "reason": reason} for reason, n in frame.attrs.get("refused", {}).items()]
