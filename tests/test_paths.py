"""memplan.paths and memplan.files: shipped defaults are read-only, the user's files live in user places.

The installed-wheel case is simulated by pointing `memplan.paths._PKG` at a fake
`site-packages/memplan` (benchmarks/check_wheel_paths.py checks a real wheel).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import memplan.paths as paths
import memplan.training.device_terms as dt
from memplan.errors import MemplanError
from memplan.files import atomic_write_bytes, check_writable


@pytest.fixture
def wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake site-packages: memplan/_data and memplan/_profiles, plus decoy data/ and profiles/ beside the package."""
    site = tmp_path / "site-packages"
    pkg = site / "memplan"
    for d in (pkg / "_data", pkg / "_profiles", site / "data", site / "profiles"):
        d.mkdir(parents=True)
    (pkg / "_data" / "device_terms.json").write_text(json.dumps({"cuda": {"cuda_context_bytes": 1, "source": "shipped"}}))
    (site / "data" / "gpus.json").write_text("{}")  # another distribution's folder: never memplan's
    monkeypatch.setattr(paths, "_PKG", pkg)
    return pkg


def test_the_checkout_is_detected_by_its_pyproject() -> None:
    assert paths.is_checkout()
    assert paths.data_dir() == paths.package_dir().parent / "data"
    assert paths.profiles_dir() == paths.package_dir().parent / "profiles"


def test_an_installed_wheel_never_reads_site_packages_data(wheel: Path) -> None:
    assert not paths.is_checkout()
    assert paths.data_dir() == wheel / "_data"
    assert paths.profiles_dir() == wheel / "_profiles"


def test_records_go_to_the_working_directory(wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert paths.user_profiles_dir() == tmp_path / "profiles"
    assert paths.profile_folders() == [wheel / "_profiles"]  # no ./profiles/ yet
    (tmp_path / "profiles").mkdir()
    assert paths.profile_folders() == [wheel / "_profiles", tmp_path / "profiles"]


def test_the_checkout_profiles_are_read_once_from_the_checkout_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(paths.package_dir().parent)
    assert paths.profile_folders() == [paths.profiles_dir()]


def test_profile_dry_run_points_to_dot_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Outside the checkout root, records go to the working directory's profiles/, not the shipped folder.
    from memplan.cli import main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["profile", "-m", "gpt2", "--device", "cpu", "--layers", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"records -> {cwd / 'profiles' / 'cpu.jsonl'}" in out or "records -> profiles/cpu.jsonl" in out
    assert list(cwd.iterdir()) == []


def test_user_terms_win_over_the_shipped_ones(wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "config" / "device_terms.json"
    monkeypatch.setenv(paths.TERMS_ENV, str(user))
    dt.device_terms.cache_clear()
    try:
        assert dt.terms_file() == (wheel / "_data" / "device_terms.json", False)
        assert dt.device_terms("cuda").source == "shipped"
        assert "shipped defaults" in dt.terms_note()
        user.parent.mkdir()
        user.write_text(json.dumps({"cuda": {"cuda_context_bytes": 2, "source": "mine"}}))
        dt.device_terms.cache_clear()
        assert dt.terms_file() == (user, True)
        assert dt.device_terms("cuda").cuda_context_bytes == 2
        assert dt.terms_note() == f"device terms: {user} (your calibration)"
        user.write_text("{broken")
        dt.device_terms.cache_clear()
        with pytest.raises(MemplanError, match="run `memplan calibrate` again or delete it"):
            dt.device_terms("cuda")
    finally:
        dt.device_terms.cache_clear()


def test_the_default_user_terms_file_is_in_the_user_config_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    platformdirs = pytest.importorskip("platformdirs")
    monkeypatch.delenv(paths.TERMS_ENV, raising=False)
    assert paths.user_terms_file() == platformdirs.user_config_path("memplan", appauthor=False) / "device_terms.json"


def test_check_writable_refuses_before_any_work(tmp_path: Path, wheel: Path) -> None:
    with pytest.raises(MemplanError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(MemplanError, match="does not exist"):
        check_writable(tmp_path / "no" / "x.csv")
    with pytest.raises(MemplanError, match="cannot be written"):
        check_writable("/proc/memplan-out.csv")
    with pytest.raises(MemplanError, match="inside the installed memplan package"):
        check_writable(wheel / "_data" / "device_terms.json", flag="--terms")
    existing = tmp_path / "keep.csv"
    existing.write_text("old")
    assert check_writable(existing) == existing and existing.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv", "site-packages"]  # the probe is gone


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640  # the file keeps its permissions
    fresh = tmp_path / "b.json"
    atomic_write_bytes(fresh, b"x")
    assert fresh.stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode
    fresh.unlink()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
