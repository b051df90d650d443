"""A sweep's grid: every estimator input (and optionally the fleet inputs) as a value or
a list of values, from keyword arguments, CLI flags or a YAML/JSON file.

The grid is checked whole before any estimate runs: an unknown key (with close
matches), an empty list, a value of the wrong type or a value the library refuses
(`quant: nf5`, an unknown model or GPU, a LoRA target no model of the grid has) is a
`GridError` whose one-line message names the key and the value.

Keys (one list each; a scalar is a list of one):
- setup: every `Setup` field, named as the `memplan estimate` flags in snake_case;
  `attention: null` (the default) is transformers' own choice per model.
  `lora_targets`: each item is ONE target set, a comma string (`"q_proj,v_proj"`), a
  list of names, `all-linear`, or `default`/null for PEFT's per-family default.
  `modules_to_save`: each item is ONE set of module names (`"embed_tokens,lm_head"` or a
  list), `none`/null for no copies.
- `gpu`: the GPUs every setup is checked against (columns, not rows; default: the catalog).
- fleet (all optional, but `variants`, `rps` and `serve_gpu` come together): the
  `memplan plan` inputs, with the serving GPU and format named `serve_gpu`/`serve_quant`.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from memplan.errors import MemplanError
from memplan.training.setup import ATTENTIONS, AUTOCASTS, DEVICES, METHODS, OPTIMIZERS, RECIPES, Setup
from memplan.model.lora import parse_lora_targets
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, QUANTS
from memplan.training.parallel import OFFLOADS, PARALLELS, QUANT_STORAGES

__all__ = ["GridError", "Grid", "SETUP_KEYS", "FLEET_KEYS", "KEYS", "MAX_SETUPS", "MAX_GRID_FILE_BYTES",
           "parse_grid", "read_grid_file", "load_grid", "values_from_text", "config_base"]

# A grid larger than this is a typo or a job to split (about a minute and ~1 GB of frame).
MAX_SETUPS = 1_000_000
MAX_GRID_FILE_BYTES = 1_000_000


class GridError(MemplanError):
    """A grid file or grid argument is malformed; raised before any estimate runs."""


# key -> (kind, allowed choices). Kinds: str, choice, bool, int, float, dropout, targets, attention, gpu.
_SETUP_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "model": ("str", ()),
    "method": ("choice", METHODS),
    "quant": ("choice", QUANTS),
    "double_quant": ("bool", ()),
    "compute_dtype": ("choice", tuple(FLOAT_BYTES)),
    "lora_rank": ("int", ()),
    "lora_targets": ("targets", ()),
    "lora_dropout": ("dropout", ()),
    "seq_len": ("int", ()),
    "batch_size": ("int", ()),
    "grad_checkpointing": ("bool", ()),
    "optimizer": ("optimizer", OPTIMIZERS),
    "attention": ("attention", ATTENTIONS),
    "device": ("choice", DEVICES),
    "prepare_kbit_training": ("bool", ()),
    "autocast": ("choice", AUTOCASTS),
    "recipe": ("choice", RECIPES),
    # Each item is ONE set of module names (PEFT LoraConfig.modules_to_save), like lora_targets.
    "modules_to_save": ("modules", ()),
    # The parallel layout (memplan.training.parallel); `layout_int` values are checked by a Setup under FSDP.
    "gpus": ("layout_int", ()),
    "gpus_per_node": ("layout_int", ()),
    "parallel": ("choice", PARALLELS),
    "fsdp_version": ("layout_int", ()),
    "offload": ("choice", OFFLOADS),
    "quant_storage": ("choice", QUANT_STORAGES),
}
# Fleet keys -> PlanInputs field (memplan.serving.fleet), kind, choices.
_FLEET_KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "variants": ("variants", "int", ()),
    "rps": ("rps", "float", ()),
    "serve_gpu": ("gpu", "gpu", ()),
    "serve_quant": ("quant", "choice", QUANTS),
    "popularity": ("popularity", "choice", ("uniform", "zipf")),
    "zipf_exponent": ("zipf_exponent", "float", ()),
    "prompt_tokens": ("prompt_tokens", "int", ()),
    "output_tokens": ("output_tokens", "int", ()),
    "utilization": ("utilization", "float", ()),
    "scale_to_zero": ("scale_to_zero", "bool", ()),
    "dataset_tokens": ("dataset_tokens", "int", ()),
    "epochs": ("epochs", "float", ()),
    "train_gpu": ("train_gpu", "gpu", ()),
}
# Setup's fields in its own order (a field added to Setup is sweepable once it has a kind above).
SETUP_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Setup) if f.name in _SETUP_KINDS)
FLEET_KEYS: tuple[str, ...] = tuple(_FLEET_KINDS)
FLEET_REQUIRED = ("variants", "rps", "serve_gpu")
KEYS: tuple[str, ...] = (*SETUP_KEYS, "gpu", *FLEET_KEYS)
_NULL_OK = ("lora_targets", "attention", "train_gpu", "gpus_per_node", "modules_to_save")
_DEFAULT_WORDS = ("default", "peft-default")
_TYPE_WORDS = {"layout_int": "an integer", "str": "a string", "choice": "a string", "optimizer": "a string", "attention": "a string or null",
               "bool": "true or false", "int": "an integer", "float": "a number", "dropout": "a number",
               "targets": "a target set (comma string or list of names) or null", "gpu": "a GPU name",
               "modules": "a set of module names (comma string or list) or null"}


@dataclass(frozen=True)
class Grid:
    """A checked grid. `setup` has every Setup field; `fleet` only the fleet keys given."""

    setup: dict[str, tuple[Any, ...]]
    gpus: tuple[str, ...]  # catalog keys
    fleet: dict[str, tuple[Any, ...]]
    source: str
    specs: dict[str, ModelSpec] = field(repr=False, compare=False)

    @property
    def combinations(self) -> int:
        """Points of the grid before inapplicable options are collapsed (an upper bound on rows)."""
        return math.prod(len(v) for v in (*self.setup.values(), *self.fleet.values()))


def _fail(source: str, message: str) -> GridError:
    return GridError(f"{source}: {message}")


def _suggest(value: str, options: tuple[str, ...] | list[str]) -> str:
    """Close matches: options that prefix the value (`quant` for `quantization`) first, then difflib's."""
    v = str(value).lower()
    prefixes = sorted((o for o in options if len(o) >= 3 and (v.startswith(o) or o.startswith(v))), key=len, reverse=True)
    close = list(dict.fromkeys([*prefixes, *difflib.get_close_matches(v, list(options), n=3, cutoff=0.5)]))[:3]
    return f"; did you mean {', '.join(close)}?" if close else f"; choose from {', '.join(options)}"


def _not_one_of(source: str, where: str, value: str, choices: tuple[str, ...]) -> GridError:
    close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
    return _fail(source, f"{where} {value!r} is not one of {', '.join(choices)}" + (f"; did you mean {close[0]}?" if close else ""))


def _check_type(source: str, key: str, kind: str, value: Any, where: str) -> Any:
    """Type checks only; ranges are left to Setup/PlanInputs so the rules live in one place."""
    ok = {
        "str": isinstance(value, str) and bool(value.strip()),
        "choice": isinstance(value, str),
        "optimizer": isinstance(value, str),
        "gpu": isinstance(value, str) and bool(value.strip()),
        "attention": value is None or isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "layout_int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "dropout": isinstance(value, (int, float)) and not isinstance(value, bool),
        "targets": value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value)),
        "modules": value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value)),
    }[kind]
    if value is None and key in _NULL_OK:
        ok = True
    if not ok:
        shown = f"{value!r} ({type(value).__name__})" if value is not None else "null"
        raise _fail(source, f"{where} must be {_TYPE_WORDS[kind]}, got {shown}")
    return value


def _where(key: str, raw: Any, i: int) -> str:
    """How a message names a value: `quant` for a scalar, `quant[1]` for an item of a list."""
    return f"{key}[{i}]" if isinstance(raw, (list, tuple)) else key


def _as_list(source: str, key: str, raw: Any) -> list[Any]:
    if isinstance(raw, (list, tuple)):
        if not raw:
            raise _fail(source, f"{key} is an empty list; give at least one value or leave the key out")
        if key in ("lora_targets", "modules_to_save"):  # a flat list of names is a list of one-name sets
            return [list(v) if isinstance(v, (list, tuple)) else v for v in raw]
        return list(raw)
    if isinstance(raw, dict):
        raise _fail(source, f"{key} must be a value or a list of values, got a mapping")
    return [raw]


def _setup_value(source: str, key: str, value: Any, where: str) -> Any:
    kind, choices = _SETUP_KINDS[key]
    _check_type(source, key, kind, value, where)
    if kind == "targets":
        try:
            return parse_lora_targets(value)
        except MemplanError:
            raise _fail(source, f"{where} is an empty target set; give module names (q_proj,v_proj), all-linear or default") from None
    if kind == "modules":
        names = value.split(",") if isinstance(value, str) else (value or [])
        names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
        return names if names and names != ("none",) else None
    if kind == "attention" and (value is None or value.strip().lower() in _DEFAULT_WORDS):
        return None
    if kind in ("choice", "attention") and value not in choices:
        raise _not_one_of(source, where, value, choices)
    if kind in ("optimizer", "int", "dropout", "layout_int"):
        # The range/alias rules are Setup's own: build one with just this field set.
        try:
            # A count of GPUs or an FSDP version needs a layout that takes it (a grid's other rows may not).
            Setup(model="grid-check", **({"parallel": "fsdp"} if kind == "layout_int" else {}), **{key: value})
        except MemplanError as exc:
            if kind == "optimizer":
                raise _not_one_of(source, where, value, OPTIMIZERS) from None
            raise _fail(source, f"{where}: {exc}") from None
        if kind == "optimizer":
            return Setup(model="grid-check", optimizer=value).optimizer  # aliases -> canonical names
    if kind == "dropout":
        return float(value)
    return value.strip() if kind == "str" else value


def _fleet_value(source: str, key: str, value: Any, where: str, catalog: Any) -> Any:
    from memplan.serving.fleet import PlanInputs

    name, kind, choices = _FLEET_KINDS[key]
    _check_type(source, key, kind, value, where)
    if kind == "gpu":
        if value is None:
            return None
        try:
            return catalog.get(value).key
        except MemplanError as exc:
            raise _fail(source, f"{where}: {exc}") from None
    if kind == "choice" and value not in choices:
        raise _not_one_of(source, where, value, choices)
    try:  # ranges are PlanInputs' own rules
        base: dict[str, Any] = {"model": "grid-check", "variants": 1, "gpu": "grid-check", "rps": 1.0}
        PlanInputs(**{**base, name: float(value) if kind == "float" else value})
    except MemplanError as exc:
        raise _fail(source, f"{where}: {exc}") from None
    return float(value) if kind == "float" else value


def _unique(values: list[Any]) -> tuple[Any, ...]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return tuple(out)


def parse_grid(raw: Any, *, source: str = "grid") -> Grid:
    """Check a raw mapping (a parsed file, flags or keyword arguments) and return a `Grid`.

    Loads every model once (an unknown model is refused here) and checks every GPU
    against the catalog. Raises `GridError` naming the first bad key or value."""
    from memplan.model.catalog import load_model
    from memplan.hardware.gpus import gpu_catalog
    from memplan.model.lora import plan_lora

    if not isinstance(raw, Mapping):
        raise _fail(source, f"a grid is a mapping of keys to a value or a list of values, got {type(raw).__name__}")
    for key in raw:
        if not isinstance(key, str) or key not in KEYS:
            alt = key.replace("-", "_") if isinstance(key, str) else ""
            hint = f"; did you mean {alt}?" if alt in KEYS else _suggest(str(key), list(KEYS))
            raise _fail(source, f"unknown key {key!r}{hint}")
    if "model" not in raw:
        raise _fail(source, "the grid needs a 'model' key (a catalog name, a config.json path, or a list of them)")
    catalog = gpu_catalog()

    setup: dict[str, tuple[Any, ...]] = {}
    defaults = {f.name: f.default for f in fields(Setup) if f.name != "model"}
    defaults["attention"] = None  # transformers' choice per model, resolved per row
    for key in SETUP_KEYS:
        if key not in raw:
            setup[key] = (defaults[key],)
            continue
        items = _as_list(source, key, raw[key])
        setup[key] = _unique([_setup_value(source, key, v, _where(key, raw[key], i)) for i, v in enumerate(items)])

    gpus: tuple[str, ...] = tuple(g.key for g in catalog.gpus)
    if "gpu" in raw:
        keys = []
        for i, v in enumerate(_as_list(source, "gpu", raw["gpu"])):
            _check_type(source, "gpu", "gpu", v, _where("gpu", raw["gpu"], i))
            try:
                keys.append(catalog.get(v).key)
            except MemplanError as exc:
                raise _fail(source, f"gpu: {exc}") from None
        gpus = _unique(keys)

    fleet: dict[str, tuple[Any, ...]] = {}
    given = [k for k in FLEET_KEYS if k in raw]
    missing = [k for k in FLEET_REQUIRED if k not in raw]
    if given and missing:
        raise _fail(source, f"fleet inputs need {', '.join(FLEET_REQUIRED)} together; add {', '.join(missing)}")
    for key in given:
        items = _as_list(source, key, raw[key])
        fleet[key] = _unique([_fleet_value(source, key, v, _where(key, raw[key], i), catalog) for i, v in enumerate(items)])

    combinations = math.prod(len(v) for v in (*setup.values(), *fleet.values()))
    if combinations > MAX_SETUPS:
        raise _fail(source, f"the grid has {combinations:,} combinations; split it into sweeps of at most {MAX_SETUPS:,}")

    specs: dict[str, ModelSpec] = {}
    for name in setup["model"]:
        try:
            specs[name] = load_model(name)
        except MemplanError as exc:
            raise _fail(source, f"model: {exc}") from None

    for targets in setup["lora_targets"]:
        if targets is None:
            continue
        problems = []
        for spec in specs.values():
            try:
                plan_lora(spec, 1, targets)
            except MemplanError as exc:
                problems.append(str(exc))
        if len(problems) == len(specs):  # fits no model: a typo, not a per-model refusal
            raise _fail(source, f"lora_targets {','.join(targets)!r}: {problems[0]}")
    return Grid(setup=setup, gpus=gpus, fleet=fleet, source=source, specs=specs)


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a `.yaml`/`.yml` or `.json` grid file (checked by `parse_grid`)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise GridError(f"{p}: a grid file is .yaml, .yml or .json, not {suffix or 'a file without an extension'}")
    try:
        size = p.stat().st_size
        if size > MAX_GRID_FILE_BYTES:
            raise GridError(f"{p}: {size:,} bytes is too large for a grid file (at most {MAX_GRID_FILE_BYTES:,})")
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise GridError(f"cannot read grid file {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise GridError(f"{p}: a grid file must be UTF-8 text") from None
    if suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GridError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    else:
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise GridError(f"{p}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raise GridError(f"{p}: the grid file is empty; it needs at least a 'model' key")
    if not isinstance(raw, dict):
        raise GridError(f"{p}: a grid file is a mapping of keys to a value or a list of values, got {type(raw).__name__}")
    return raw


def load_grid(path: str | Path, *, overrides: Mapping[str, Any] | None = None, base: Mapping[str, Any] | None = None,
              base_source: str = "") -> Grid:
    """Read and check a grid file; `overrides` (e.g. CLI flags) replace its keys, and its keys
    replace `base`'s (a `--from` config file's fields, `config_base`)."""
    raw = {**(base or {}), **read_grid_file(path), **(overrides or {})}
    source = (f"{base_source} + " if base_source else "") + str(path) + (" + flags" if overrides else "")
    return parse_grid(raw, source=source)


def config_base(setup_fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A `--from` file's Setup fields (memplan.training.config_files.ConfigPlan.fields) as grid
    values: each one value, a target set written as one comma string (a flat list of names would
    be several one-name sets). Returns (base, fields no grid key takes)."""
    base: dict[str, Any] = {}
    left_out: list[str] = []
    for name, value in setup_fields.items():
        if name not in SETUP_KEYS:
            left_out.append(name)
        elif isinstance(value, (tuple, list)):
            base[name] = ",".join(value) if name == "lora_targets" else [list(value)]
        else:
            base[name] = value
    return base, left_out


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _convert(kind: str) -> Callable[[str], Any]:
    if kind in ("int", "layout_int"):
        return lambda t: int(t.replace("_", ""))
    if kind in ("float", "dropout"):
        return float
    if kind == "bool":
        return lambda t: _BOOL_WORDS[t.lower()]
    return str


def values_from_text(key: str, texts: tuple[str, ...] | list[str]) -> list[Any]:
    """CLI flag values -> typed grid values. Each text is a comma list, except for
    `lora_targets`, where each text is one target set."""
    if key in ("lora_targets", "modules_to_save"):
        return [t.strip() for t in texts]
    kind = _SETUP_KINDS[key][0] if key in _SETUP_KINDS else _FLEET_KINDS[key][1] if key in _FLEET_KINDS else "str"
    conv = _convert(kind)
    out: list[Any] = []
    for text in texts:
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                out.append(conv(item))
            except (ValueError, KeyError):
                raise GridError(f"--{key.replace('_', '-')}: {item!r} is not {_TYPE_WORDS[kind]}") from None
    if not out:
        raise GridError(f"--{key.replace('_', '-')} is empty; give a value or a comma list")
    return out
