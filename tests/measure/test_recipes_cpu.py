"""`--recipe trainer|trl-sft` against real trainer steps on the CPU ledger.

Each run is a real transformers `Trainer` or TRL 1.16 `SFTTrainer` (max_steps=3,
memplan.measure.profiler.trainer). Two tiers run the same assertions:
- `regression` (every CI run): validation_matrix.recipe_regression(), measured in the session's
  shared campaign (tests/measure/conftest.py);
- `full` (`python -m pytest -m full_matrix`): all of validation_matrix.recipe_matrix(), two workers. Thresholds from issue 14: steady-state peak median
|error| <= 1%, max <= 3%; the trainable and optimizer bytes (TRL's bf16 adapter cast) exact.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from validation_matrix import RECIPE_STEPS, recipe_matrix, recipe_regression  # noqa: E402


@pytest.fixture(scope="module", params=["regression", pytest.param("full", marks=pytest.mark.full_matrix)])
def recipe_rows(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    pytest.importorskip("trl")
    from conftest import REPORTS  # tests/conftest.py

    from memplan.model.catalog import load_model
    from memplan.training.estimate import estimate
    from memplan.training.setup import Setup

    if request.param == "regression":
        setups = recipe_regression()
        records = request.getfixturevalue("cpu_campaign").of(setups)
    else:
        from memplan.measure.profiler.campaign import Job, run_campaign
        from memplan.measure.profiler.device import collect_env
        from memplan.measure.records import read_records

        setups = recipe_matrix()
        out = tmp_path_factory.mktemp("recipes") / "runs.jsonl"
        run_campaign([Job(s, None, RECIPE_STEPS) for s in setups], out=out, env=collect_env("cpu"), workers=2, timeout_s=600)
        latest = {json.dumps(r["setup"], sort_keys=True): r for r in read_records([out])}
        records = [latest[k] for k in (json.dumps(s.to_dict(), sort_keys=True) for s in setups) if k in latest]
    assert len(records) == len(setups), "a trainer run has no record"
    failed = [(r["setup"]["model"], r["setup"]["recipe"], r.get("error") or r.get("oom")) for r in records if r["outcome"] != "ok"]
    assert not failed, f"trainer runs failed: {failed}"
    rows = []
    for r in records:
        s = Setup.from_dict(r["setup"])
        est = estimate(s, model=load_model(s.model))
        rows.append((s, est, r["measured"]))
    lines = [f"{'setup':<72}{'predicted':>12}{'measured':>12}{'error':>9}"]
    for s, est, m in rows:
        pred, meas = est.memory.allocated_peak, m["steady_peak_bytes"]
        lines.append(f"{s.label()[-72:]:<72}{pred / 2**20:>10.2f}Mi{meas / 2**20:>10.2f}Mi{100 * (pred - meas) / meas:>+8.2f}%")
    pytestconfig.stash[REPORTS][f"CPU validation, real Trainer/SFTTrainer runs ({request.param}, {len(rows)}): estimate vs ledger"] = "\n".join(lines) + "\n"
    return rows


def test_ci_subset_covers_quants_methods_checkpointing_and_both_trainers() -> None:
    """The subset every CI run measures keeps what the whole trainer matrix covers (issue 14: at least
    10 real Trainer/SFTTrainer runs across nf4, int8 and bf16, LoRA and full, with and without checkpointing)."""
    setups = recipe_regression()
    assert len(setups) >= 10
    assert {s.recipe for s in setups} == {"trainer", "trl-sft"}
    assert {s.recipe for s in setups if s.modules_to_save} == {"trainer", "trl-sft"}
    assert any(s.optimizer == "adamw_fused" for s in setups)
    assert {"nf4", "int8", "bf16"} <= {s.quant for s in setups}
    assert {s.method for s in setups} == {"lora", "full"}
    assert {s.grad_checkpointing for s in setups} == {True, False}


def test_steady_peak_of_real_trainer_steps_within_issue_thresholds(recipe_rows) -> None:
    errors = [abs(est.memory.allocated_peak - m["steady_peak_bytes"]) / m["steady_peak_bytes"] for _, est, m in recipe_rows]
    assert statistics.median(errors) <= 0.01, f"median |error| {statistics.median(errors):.2%}"
    worst = max(range(len(errors)), key=errors.__getitem__)
    assert errors[worst] <= 0.03, f"{recipe_rows[worst][0].label()}: |error| {errors[worst]:.2%}"


def test_trainable_and_optimizer_bytes_match_the_trainer(recipe_rows) -> None:
    """SFTTrainer's bf16 cast of QLoRA adapters (2 bytes per parameter, Adam states in bf16 too);
    PEFT's modules_to_save copies in the base's dtype beside fp32 adapters (memplan.training.modules_to_save)."""
    from memplan.training.modules_to_save import copies_dtype

    names = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
    for s, est, m in recipe_rows:
        if s.method == "lora":
            assert est.memory.adapters == m["trainable_bytes"], s.label()
            want = {names[est.adapter_dtype]} | ({names[copies_dtype(s)]} if s.modules_to_save else set())
            assert m["trainable_dtypes"] == sorted(want), s.label()
        assert est.memory.optimizer_states == m["optimizer_state_bytes"], s.label()
