"""Where memplan's files live, and which of them are the user's.

Read-only defaults ship with memplan: `data/` and `profiles/` beside the package in a
checkout (one with `pyproject.toml` beside the package, including an editable install),
else `memplan/_data` and `memplan/_profiles` inside the installed wheel. Nothing looks
for a bare `data/` or `profiles/` folder next to the package elsewhere: in an installed
wheel that would be `site-packages/data`.

The user's files live in user places and are the only ones memplan writes:
- measured records in `./profiles/` (the working directory), or `memplan profile --out`;
- calibrated device terms in the user config dir (platformdirs), or `memplan calibrate --terms`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "data_dir",
    "profiles_dir",
    "is_checkout",
    "user_profiles_dir",
    "profile_folders",
    "shipped_terms_file",
    "user_terms_file",
    "TERMS_ENV",
    "package_dir",
]

_PKG = Path(__file__).resolve().parent
# Tests and scripts point memplan at another terms file with this variable.
TERMS_ENV = "MEMPLAN_DEVICE_TERMS"


def package_dir() -> Path:
    """The folder of the `memplan` package itself (nothing is ever written inside it)."""
    return _PKG


def is_checkout() -> bool:
    """True when the package runs from a source checkout (pyproject.toml beside it)."""
    return (_PKG.parent / "pyproject.toml").is_file()


def data_dir() -> Path:
    """The shipped data (catalogs, assumptions, default device terms): read-only."""
    if is_checkout() and (_PKG.parent / "data").is_dir():
        return _PKG.parent / "data"
    return _PKG / "_data"


def profiles_dir() -> Path:
    """The shipped profile records (the project's own measurements): read-only."""
    if is_checkout() and (_PKG.parent / "profiles").is_dir():
        return _PKG.parent / "profiles"
    return _PKG / "_profiles"


def user_profiles_dir() -> Path:
    """Where new records go: `./profiles/` in the working directory."""
    return Path.cwd() / "profiles"


def profile_folders() -> list[Path]:
    """The folders a reader takes by default: the shipped records, plus `./profiles/`
    when it exists and is not the shipped folder (running from the checkout root)."""
    shipped, user = profiles_dir(), user_profiles_dir()
    out = [shipped] if shipped.is_dir() else []
    if user.is_dir() and not (shipped.is_dir() and os.path.samefile(user, shipped)):
        out.append(user)
    return out


def shipped_terms_file() -> Path:
    """The device terms memplan ships (`data/device_terms.json`): read-only."""
    return data_dir() / "device_terms.json"


def user_terms_file() -> Path:
    """The user's calibrated device terms: `$MEMPLAN_DEVICE_TERMS`, else
    `<user config dir>/memplan/device_terms.json` (platformdirs)."""
    given = os.environ.get(TERMS_ENV)
    if given:
        return Path(given).expanduser()
    try:
        from platformdirs import user_config_path
    except ImportError:  # a dependency, but never let a missing one stop the estimator
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "memplan"
    else:
        base = user_config_path("memplan", appauthor=False)
    return base / "device_terms.json"

