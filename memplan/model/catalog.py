"""The model catalog (`data/models/*.json`) and loading of local configs.

`--model` accepts a catalog name (`llama2-7b`), a Hugging Face id that is in
the catalog (`meta-llama/Llama-2-7b-hf`), a path to a `config.json`, or a
folder containing one. Unknown names get close-match suggestions.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from memplan.model.architectures import spec_from_config
from memplan.errors import ConfigError, UnknownModelError
from memplan.paths import data_dir
from memplan.model.spec import ModelSpec

__all__ = ["CatalogEntry", "catalog", "load_model", "with_layers", "MAX_CONFIG_BYTES"]

# A real config.json is a few kB; anything this large is not one.
MAX_CONFIG_BYTES = 1_000_000


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    hf_id: str | None
    source: str
    description: str
    path: Path


def _read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is {size:,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text; pass a Hugging Face config.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def _models_dir() -> Path:
    return data_dir() / "models"


@lru_cache(maxsize=1)
def catalog() -> tuple[CatalogEntry, ...]:
    """Every catalog model, sorted by name."""
    entries = []
    for path in sorted(_models_dir().glob("*.json")):
        raw = _read_json(path, "catalog file")
        entries.append(
            CatalogEntry(
                name=raw["name"],
                hf_id=raw.get("hf_id"),
                source=raw.get("source", ""),
                description=raw.get("description", ""),
                path=path,
            )
        )
    return tuple(entries)


def _spec_from_catalog_file(path: Path) -> ModelSpec:
    raw = _read_json(path, "catalog file")
    return spec_from_config(raw["config"], name=raw["name"], source=raw.get("source", ""))


def _spec_from_local(path: Path) -> ModelSpec:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.is_file():
        what = "a folder without a config.json" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise ConfigError(f"{path} is {what}; point --model at a config.json or a catalog name")
    raw = _read_json(cfg_path, "config")
    if isinstance(raw, dict) and "config" in raw and "name" in raw:  # a catalog-style file
        return spec_from_config(raw["config"], name=raw["name"], source=raw.get("source", str(cfg_path)))
    # `my-model/config.json` is named after its folder; any other file after itself.
    if path.is_dir() or (cfg_path.name == "config.json" and cfg_path.parent.name):
        name = cfg_path.parent.name
    else:
        name = cfg_path.stem
    return spec_from_config(raw, name=name, source=str(cfg_path))


def load_model(model: str | ModelSpec) -> ModelSpec:
    """Resolve a catalog name, catalog HF id, config path or folder to a `ModelSpec`."""
    if isinstance(model, ModelSpec):
        return model
    key = model.strip()
    if not key:
        raise UnknownModelError("--model is empty; give a catalog name (see `memplan models`) or a path to config.json")
    direct = _models_dir() / f"{key.lower()}.json"
    if "/" not in key and direct.is_file():
        return _spec_from_catalog_file(direct)
    path = Path(key).expanduser()
    if path.exists():
        return _spec_from_local(path)
    for entry in catalog():
        if key.lower() in (entry.name.lower(), (entry.hf_id or "").lower()):
            return _spec_from_catalog_file(entry.path)
    names = [e.name for e in catalog()] + [e.hf_id for e in catalog() if e.hf_id]
    close = difflib.get_close_matches(key.lower(), [n.lower() for n in names], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "run `memplan models` for the catalog"
    raise UnknownModelError(f"unknown model '{key}': not in the catalog and not a path to a config.json; {hint}")


_LAYER_KEYS = ("num_hidden_layers", "n_layer")


def with_layers(spec: ModelSpec, layers: int | None) -> ModelSpec:
    """The same model truncated to its first `layers` transformer layers
    (what `memplan profile --layers N` builds); `None` returns `spec` unchanged."""
    if layers is None or layers == spec.num_layers:
        return spec
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"--layers must be a positive integer, got {layers!r}")
    if layers > spec.num_layers:
        raise ConfigError(f"--layers {layers} exceeds the {spec.num_layers} layers of {spec.name}")
    cfg = dict(spec.config)
    for key in _LAYER_KEYS:
        if key in cfg:
            cfg[key] = layers
    return spec_from_config(cfg, name=spec.name, source=spec.source)
