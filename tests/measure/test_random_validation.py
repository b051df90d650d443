"""The estimator against the CPU ledger on models and setups drawn fresh on every run.

`memplan.measure.random_setups` draws RANDOM_RUNS (tests/measure/conftest.py) small configs,
one per family (llama, mistral, mixtral, qwen2, gemma2, phi3, gpt2, bert), with random
dimensions and every setup flag, keeping only combinations `Setup` and `estimate()` accept.
The seed is printed in the terminal summary; `--validation-seed S` reruns a draw, as does
`memplan validate --random 8 --seed S`. The runs are measured in the session's shared campaign.

What is asserted, and why:
- every drawn run ends `ok`: the draw only holds valid combinations, so a crash is a bug in
  the generator, the profiler or the estimator's validation;
- weights within 0.1% on every run, every family: the README claims the weights of every
  format equal the loaded model's storages for every catalog family;
- every run of every family: steady-state peak |error| <= 30%. The fixed matrix holds its runs to
  3%, but setups nobody listed do not all stay there: a 64-run draw (README, seed 31337, drawn
  after the last model change and used to fit nothing) measured median 0.12%, p95 5.2%, max 9.4%
  over all eight families; the 120-run draw before it (seed 20261130) max 13.3%. 30% leaves room
  for the tail a fresh draw can find; a bound that fresh draws break would only teach people to
  rerun CI. It catches a missing or doubled memory term, and the table shows every error;
- the claimed families' median over the draw stays under 5%.
Nothing here is fitted: a failure is an estimator (or claim) error to report with its seed.
"""

from __future__ import annotations

import json
import statistics

import pytest

pytestmark = pytest.mark.slow

# From the README's random draws, see the module docstring.
RUN_BOUND = 0.30
CLAIMED_MEDIAN_BOUND = 0.05


@pytest.fixture(scope="module")
def draw(cpu_campaign, pytestconfig: pytest.Config):
    from conftest import REPORTS  # tests/conftest.py

    from memplan.measure.random_setups import case_records, peak_frame
    from memplan.planning.render_validate import render_random_validation

    records = case_records(cpu_campaign.cases, cpu_campaign.records)
    frame = peak_frame(records)
    pytestconfig.stash[REPORTS][f"random CPU validation, seed {cpu_campaign.seed}: estimate vs ledger"] = (
        render_random_validation(frame, seed=cpu_campaign.seed) + "\n")
    return cpu_campaign, frame


def _show(frame) -> str:
    return "\n".join(f"{r.family} {r.label} {r.outcome} peak {r.peak_rel_error}" for r in frame.itertuples())


def test_every_family_is_drawn_and_every_run_ends_ok(draw) -> None:
    campaign, frame = draw
    from memplan.measure.random_setups import FAMILIES

    assert len(frame) == len(campaign.cases), "a drawn run has no record"
    assert set(frame.family) == set(FAMILIES)
    bad = frame[frame.outcome != "ok"]
    assert bad.empty, f"seed {campaign.seed}: runs failed:\n" + "\n".join(f"{r.label}: {r.error_message}" for r in bad.itertuples())


def test_weights_within_0_1_percent_every_family(draw) -> None:
    campaign, frame = draw
    ok = frame[frame.outcome == "ok"]
    worst = ok.loc[ok.weights_rel_error.abs().idxmax()]
    assert abs(worst.weights_rel_error) <= 0.001, f"seed {campaign.seed}: {worst.to_dict()}"


def test_every_family_within_the_run_bound(draw) -> None:
    campaign, frame = draw
    ok = frame[frame.outcome == "ok"]
    assert len(ok), "the draw holds no ok run"
    off = ok[ok.peak_rel_error.abs() > RUN_BOUND]
    assert off.empty, f"seed {campaign.seed}: beyond the bound:\n{_show(off)}"


def test_claimed_families_median_error(draw) -> None:
    campaign, frame = draw
    claimed = frame[(frame.outcome == "ok") & frame.claimed]
    assert len(claimed), "the draw holds no run of a claimed family"
    errs = claimed.peak_rel_error.abs()
    assert statistics.median(errs) <= CLAIMED_MEDIAN_BOUND, (
        f"seed {campaign.seed}: median {100 * statistics.median(errs):.2f}%\n{_show(claimed)}")


def test_one_random_checkpoint_per_model_and_dtype(cpu_campaign) -> None:
    """Every run of the same config and load dtype reuses one checkpoint (build.checkpoint_for's key)."""
    from memplan.training.setup import Setup

    wanted = {(json.dumps(r["model_info"]["config"], sort_keys=True), Setup.from_dict(r["setup"]).param_dtype)
              for r in cpu_campaign.records if "load" in (r.get("phases") or {})}
    made = [p for p in cpu_campaign.checkpoints.iterdir() if p.is_dir()]
    assert not [p for p in made if ".tmp-" in p.name], "a half-written checkpoint was left behind"
    assert len(made) == len(wanted), sorted(p.name for p in made)
