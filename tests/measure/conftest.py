"""One campaign of real CPU runs per test session, shared by every test that needs records.

`cpu_campaign` runs, in one `run_campaign(..., workers=2)` (two worker subprocesses at a
time, this process the only writer of the records file, one random-checkpoint cache for the
session):

- the random draw: `RANDOM_RUNS` fresh model configs and setups from
  `memplan.measure.random_setups` (seed: `--validation-seed S`, else a fresh one; printed in
  the terminal summary), checked by test_random_validation.py;
- the regression subset of the fixed CPU matrix (validation_matrix.REGRESSION), checked by
  test_validation_cpu.py (the whole matrix is the `full_matrix` tier);
- test_profiler.py's six acceptance setups (validation_matrix.PROFILE_CASES).
- real transformers Trainer / TRL SFTTrainer steps (validation_matrix.recipe_regression, when trl is
  installed), checked by test_recipes_cpu.py;
- sharded runs at world size 2 (sharded_matrix: DDP, FSDP1, FSDP2, DeepSpeed ZeRO-2/3; one record per
  rank), checked by test_sharded_validation.py.

The ledger counts bytes, not time, so two runs side by side measure what one run alone does.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
# 8 = one run per family (the draw goes round the families in a shuffled order); with the
# regression subset and the profiler cases this keeps the campaign near 5 minutes on 2 cores.
RANDOM_RUNS = 8
RANDOM_SHARDED_RUNS = 4  # random sharded ws=2 setups (test_sharded_validation.py)
WORKERS = 2


def pytest_configure(config: pytest.Config) -> None:
    # tests/ holds no packages, so pytest imports every conftest.py as the top-level module
    # `conftest`; importing this one replaced tests/conftest.py there. Put that one back, so
    # test modules' `from conftest import TINY_CONFIGS, REPORTS, ...` keep finding it.
    root = _root_conftest(config)
    if root is not None:
        sys.modules["conftest"] = root


def _root_conftest(config: pytest.Config) -> Any:
    for plugin in config.pluginmanager.get_plugins():
        if Path(getattr(plugin, "__file__", "") or "").resolve() == ROOT_CONFTEST:
            return plugin
    return None


def report(config: pytest.Config, title: str, text: str) -> None:
    """Leave `text` for the end-of-run summary (tests/conftest.py REPORTS)."""
    config.stash[_root_conftest(config).REPORTS][title] = text


@dataclass
class CpuCampaign:
    out: Path
    checkpoints: Path
    seed: int
    cases: list[Any]  # memplan.measure.random_setups.RandomCase
    profile_model: Path
    sharded_cases: list[Any] = field(default_factory=list)  # memplan.measure.random_sharded cases
    records: list[dict[str, Any]] = field(default_factory=list)

    def of(self, setups: list[Any]) -> list[dict[str, Any]]:
        """The latest record of each setup, in the given order (a setup not recorded is left out)."""
        latest = {json.dumps(r["setup"], sort_keys=True): r for r in self.records}
        keys = [json.dumps(s.to_dict(), sort_keys=True) for s in setups]
        return [latest[k] for k in keys if k in latest]


@pytest.fixture(scope="session")
def validation_seed(pytestconfig: pytest.Config) -> int:
    from memplan.measure.random_setups import fresh_seed

    seed = pytestconfig.getoption("validation_seed")
    return fresh_seed() if seed is None else seed


@pytest.fixture(scope="session")
def cpu_campaign(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config, validation_seed: int,
                 tiny_configs: dict) -> CpuCampaign:
    pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    from validation_matrix import PROFILE_CASES, PROFILE_DEFAULTS, PROFILE_STEPS, RECIPE_STEPS, recipe_regression, regression

    from memplan.measure.profiler.campaign import Job, run_campaign
    from memplan.measure.profiler.device import collect_env
    from memplan.measure.random_setups import draw_cases
    from memplan.measure.records import read_records
    from memplan.training.setup import Setup

    root = tmp_path_factory.mktemp("cpu-campaign")
    # Printed even when the campaign fails below, so that a failing draw can be rerun.
    report(pytestconfig, "random CPU validation seed",
           f"seed {validation_seed}: rerun with  python -m pytest tests/measure --validation-seed {validation_seed}\n"
           f"  or  memplan validate --random {RANDOM_RUNS} --seed {validation_seed} --workers {WORKERS}\n")
    cases = draw_cases(RANDOM_RUNS, seed=validation_seed, folder=root / "random")
    profile_model = root / "tiny-llama" / "config.json"
    profile_model.parent.mkdir()
    profile_model.write_text(json.dumps(tiny_configs["llama"]))
    # Longest first (random quantized runs compile bitsandbytes' CPU kernels for new shapes), so
    # the two workers finish together.
    jobs = [Job(c.setup, None, 3) for c in cases]
    jobs += [Job(s, None, 3) for s in regression()]
    jobs += [Job(Setup(model=str(profile_model), **PROFILE_DEFAULTS, **f), None, PROFILE_STEPS) for f in PROFILE_CASES.values()]
    if importlib.util.find_spec("trl") is not None:  # real Trainer / SFTTrainer steps (test_recipes_cpu.py)
        jobs += [Job(s, None, RECIPE_STEPS) for s in recipe_regression()]
    # Sharded ranks at world size 2 (test_sharded_validation.py): run_campaign starts one rank group
    # per batch of setups; DeepSpeed's ZeRO rows when deepspeed is installed (the profile extra).
    from sharded_matrix import SHARDED_STEPS, fsdp_setups, zero_setups

    jobs += [Job(s, None, SHARDED_STEPS) for s in fsdp_setups()]
    if importlib.util.find_spec("deepspeed") is not None:
        jobs += [Job(s, None, SHARDED_STEPS) for s in zero_setups()]
    # Random sharded setups nobody listed (memplan.measure.random_sharded), from the same seed.
    from memplan.measure.random_sharded import draw_sharded_cases

    sharded_cases = [c for c in draw_sharded_cases(RANDOM_SHARDED_RUNS, seed=validation_seed, folder=root / "random-sharded")
                     if not c.setup.parallel.startswith("zero") or importlib.util.find_spec("deepspeed") is not None]
    jobs += [Job(c.setup, None, SHARDED_STEPS) for c in sharded_cases]
    campaign = CpuCampaign(out=root / "runs.jsonl", checkpoints=root / "checkpoints", seed=validation_seed, cases=cases,
                           profile_model=profile_model, sharded_cases=sharded_cases)
    result = run_campaign(jobs, out=campaign.out, env=collect_env("cpu"), workers=WORKERS, timeout_s=600,
                          checkpoint_dir=campaign.checkpoints)
    assert not result.interrupted
    campaign.records = read_records([campaign.out])
    return campaign
