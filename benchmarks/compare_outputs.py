"""Byte-for-byte comparison of memplan's outputs between two revisions.

    python benchmarks/compare_outputs.py                         # the working tree against the base below
    python benchmarks/compare_outputs.py --base REV --head REV2  # any two revisions

A refactor must not change a single number. This script exports the base revision
with `git archive` into a temporary folder, runs the same commands against both trees
(PYTHONPATH points at each tree, so the installed environment is shared) and compares
every output byte for byte:

- `memplan sweep --grid examples/grid.yaml --out sweep.csv` (the fixed capacity grid);
- `memplan plan --model M --gpu a10g --rps 5 --sweep-variants 1,10,100,1000,10000` for
  three models, as a table, JSON and CSV.

The layout change (flat modules -> subpackages, renderers out of commands, one source per
rule, the fleet's N-independent context) was checked with it: `--base b92264a --head 0005dd8`
gives 10 of 10 identical. Later commits change these outputs on purpose (for example a new
serving strategy adds rows and columns), so compare the working tree against the commit
before such a change, not against b92264a.

Exit status 0 when every output is identical, 1 otherwise (the first differing line of
each is printed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The last commit of the flat layout (before the subpackage split).
DEFAULT_BASE = "b92264a"
PLAN_MODELS = ("llama2-7b", "mistral-7b", "llama3-8b")
VARIANTS = "1,10,100,1000,10000"
_RUN = "import sys; from memplan.cli import main; sys.exit(main(sys.argv[1:]))"


def _commands(out: Path) -> dict[str, list[str]]:
    cmds = {"sweep.csv": ["sweep", "--grid", str(ROOT / "examples" / "grid.yaml"), "--out", str(out / "sweep.csv")]}
    for model in PLAN_MODELS:
        for fmt in ("table", "json", "csv"):
            cmds[f"plan-{model}.{fmt}"] = ["plan", "--model", model, "--gpu", "a10g", "--rps", "5",
                                           "--sweep-variants", VARIANTS, "--format", fmt]
    return cmds


def run_tree(tree: Path, out: Path) -> dict[str, bytes]:
    """Every output of `_commands` produced by the memplan in `tree`."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}
    results: dict[str, bytes] = {}
    for name, args in _commands(out).items():
        proc = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=tree, env=env, capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"{tree}: memplan {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
        path = out / name
        results[name] = path.read_bytes() if path.suffix == ".csv" and name.startswith("sweep") else proc.stdout
    return results


def export(rev: str, dest: Path) -> Path:
    """The tracked files of `rev`, unpacked into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "rev.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=DEFAULT_BASE, help=f"revision to compare against (default {DEFAULT_BASE})")
    ap.add_argument("--head", default=None, help="revision to compare (default: the working tree)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="memplan-compare-") as tmp:
        tmp_path = Path(tmp)
        base = run_tree(export(args.base, tmp_path / "base"), tmp_path / "out-base")
        head_tree = ROOT if args.head is None else export(args.head, tmp_path / "head")
        head = run_tree(head_tree, tmp_path / "out-head")
    differ = 0
    for name in base:
        if base[name] == head[name]:
            print(f"identical  {name:<28} {len(head[name]):>10,} bytes")
            continue
        differ += 1
        a, b = base[name].decode().splitlines(), head[name].decode().splitlines()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"DIFFERENT  {name:<28} line {first + 1}:\n  base: {a[first] if first < len(a) else '<end>'}\n"
              f"  head: {b[first] if first < len(b) else '<end>'}")
    print(f"{len(base) - differ} of {len(base)} outputs identical to {args.base}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
