"""Where memplan's data lives: `data/` beside the package in a checkout or an
editable install, or `memplan/_data` inside a built wheel."""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_dir", "profiles_dir"]

_PKG = Path(__file__).resolve().parent


def data_dir() -> Path:
    for candidate in (_PKG.parent / "data", _PKG / "_data"):
        if (candidate / "gpus.json").is_file():
            return candidate
    return _PKG.parent / "data"


def profiles_dir() -> Path:
    for candidate in (_PKG.parent / "profiles", _PKG / "_profiles"):
        if candidate.is_dir():
            return candidate
    return _PKG.parent / "profiles"
