"""An installed wheel keeps the user's files in user places (issue 15).

    python benchmarks/check_wheel_paths.py

Builds the wheel (`pip wheel --no-deps`, which fetches hatchling: needs the package index),
installs it with `--no-deps` into a fresh `venv --system-site-packages`, and runs from an
empty working directory:

- `memplan profile --dry-run` must say the records go to `profiles/cpu.jsonl` (./profiles/);
- `memplan.paths` must find the shipped data and profiles inside the package (`_data`,
  `_profiles`), never a `site-packages/data` folder;
- nothing may be written inside the installed package.

About 20 s, too slow and too networked for the test suite; tests/test_paths.py checks the
same rules with the locations monkeypatched. Exit status 0 when every check passes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="memplan-wheel-") as tmp:
        tmp_path = Path(tmp)
        whl, venv, cwd = tmp_path / "whl", tmp_path / "venv", tmp_path / "cwd"
        cwd.mkdir()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(whl), str(ROOT)], check=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        py = venv / "bin" / "python"
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *map(str, whl.glob("*.whl"))], check=True)
        problems = []
        dry = subprocess.run([str(venv / "bin" / "memplan"), "profile", "-m", "gpt2", "--device", "cpu", "--layers", "1", "--dry-run"],
                             cwd=cwd, capture_output=True, text=True)
        if dry.returncode != 0 or "records -> profiles/cpu.jsonl" not in dry.stdout:
            problems.append(f"profile --dry-run does not point to ./profiles/: {dry.stdout or dry.stderr}")
        where = subprocess.run([str(py), "-c", "import memplan.paths as p; print(p.data_dir()); print(p.profiles_dir()); "
                                "print(p.is_checkout()); print(p.package_dir())"], cwd=cwd, capture_output=True, text=True, check=True)
        data, profiles, checkout, pkg = where.stdout.split("\n")[:4]
        if data != f"{pkg}/_data" or profiles != f"{pkg}/_profiles" or checkout != "False":
            problems.append(f"installed paths: data {data}, profiles {profiles}, checkout {checkout} (package {pkg})")
        if list(cwd.iterdir()):
            problems.append(f"the dry run wrote {[p.name for p in cwd.iterdir()]} in the working directory")
        for p in problems:
            print(f"FAIL {p}")
        if not problems:
            print("ok: the installed wheel reads memplan/_data and memplan/_profiles and writes records to ./profiles/")
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
