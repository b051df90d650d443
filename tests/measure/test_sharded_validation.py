"""Per-GPU estimates against real sharded ranks on the CPU ledger (issue 13, part 4).

The session campaign (tests/measure/conftest.py) runs sharded_matrix.fsdp_setups() (DDP, FSDP1 and
FSDP2, full shard and shard-grad-op) and, with deepspeed installed, sharded_matrix.zero_setups()
(ZeRO-2/3), each as two real rank processes on gloo; every rank writes its own record. Each rank's
steady-state peak (`measured.steady_peak_bytes`, the ledger's maximum over the last step) is compared
with `estimate(setup).memory.allocated_peak`, which is per GPU under a layout (plus, for ZeRO-Offload rows,
the host state, which DeepSpeed's CPU accelerator keeps in the same RAM: `compare.measured_peak_prediction`).

Thresholds from issue 13: median |error| <= 1%, max <= 3%. KNOWN_GAPS lists the rows that miss the max
today, each with the measured cause; they are held to a looser bound so a regression still fails.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sharded_matrix import fsdp_setups, zero_setups  # noqa: E402

# label (Setup.label without the model path) -> why it misses 3%. Measured on the CPU ledger, ws 2.
KNOWN_GAPS: dict[str, str] = {}
KNOWN_GAP_BOUND = 0.06


def _short(label: str) -> str:
    return label.split(" ", 1)[1] if " " in label else label


@pytest.fixture(scope="module")
def sharded_rows(cpu_campaign, pytestconfig: pytest.Config):
    import importlib.util

    from conftest import REPORTS  # tests/conftest.py

    from memplan.measure.compare import measured_peak_prediction
    from memplan.model.catalog import load_model
    from memplan.training.estimate import estimate

    setups = fsdp_setups() + (zero_setups() if importlib.util.find_spec("deepspeed") is not None else [])
    keys = {id(s): s for s in setups}
    wanted = {s.label(): s for s in keys.values()}
    records = [r for r in cpu_campaign.records if r.get("rank") is not None]
    rows = []
    for r in records:
        from memplan.training.setup import Setup

        s = Setup.from_dict(r["setup"])
        if s.label() not in wanted:
            continue
        rows.append((s, r))
    assert {(s.label(), r["rank"]) for s, r in rows} >= {(lab, k) for lab in wanted for k in (0, 1)}, "a sharded rank has no record"
    failed = [(s.label(), r["rank"], (r.get("error") or r.get("oom") or {}).get("message")) for s, r in rows if r["outcome"] != "ok"]
    assert not failed, f"sharded runs failed: {failed}"
    out = []
    lines = [f"{'setup (per rank)':<62}{'rank':>5}{'predicted':>12}{'measured':>12}{'error':>9}"]
    for s, r in sorted(rows, key=lambda x: (x[0].parallel, x[0].label(), x[1]["rank"])):
        est = estimate(s, model=load_model(s.model))
        pred, meas = measured_peak_prediction(est), r["measured"]["steady_peak_bytes"]
        out.append((s, r["rank"], pred, meas, r["measured"].get("peak_storages", [])))
        lines.append(f"{_short(s.label())[-62:]:<62}{r['rank']:>5}{pred / 2**20:>10.2f}Mi{meas / 2**20:>10.2f}Mi{100 * (pred - meas) / meas:>+8.2f}%")
    pytestconfig.stash[REPORTS][f"CPU validation, sharded ranks at world size 2 ({len(out)} rank records): estimate vs ledger"] = "\n".join(lines) + "\n"
    return out


def test_sharded_matrix_covers_the_issue() -> None:
    """At least 20 sharded runs at ws 2: FSDP1 and FSDP2, ZeRO-2 and ZeRO-3, full bf16, LoRA and QLoRA with
    a bf16 quant storage, with and without checkpointing, and with optimizer offload (DeepSpeed's; FSDP's
    CPUOffload has no host to move to on a CPU, and Setup refuses it there)."""
    setups = fsdp_setups() + zero_setups()
    assert len(setups) >= 20
    assert {s.gpus for s in setups} == {2}
    assert {(s.parallel, s.fsdp_version) for s in setups} >= {("fsdp", 1), ("fsdp", 2), ("zero2", 1), ("zero3", 1)}
    assert {(s.method, s.quant) for s in setups} >= {("full", "bf16"), ("lora", "bf16"), ("lora", "nf4")}
    assert all(s.quant_storage == "bf16" for s in setups if s.quant == "nf4" and s.parallel != "ddp")
    assert {s.grad_checkpointing for s in setups} == {True, False}
    assert {s.offload for s in setups} >= {"none", "optimizer", "params_and_optimizer"}


def test_per_rank_steady_peak_within_issue_thresholds(sharded_rows) -> None:
    errors = [(abs(pred - meas) / meas, s, rank) for s, rank, pred, meas, _ in sharded_rows]
    assert statistics.median(e for e, _, _ in errors) <= 0.01, f"median |error| {statistics.median(e for e, _, _ in errors):.2%}"
    for e, s, rank in errors:
        gap = KNOWN_GAPS.get(_short(s.label()))
        bound = KNOWN_GAP_BOUND if gap else 0.03
        assert e <= bound, f"{s.label()} rank {rank}: |error| {e:.2%}" + (f" (known gap: {gap})" if gap else "")


def test_ranks_of_one_setup_agree(sharded_rows) -> None:
    """Every rank holds the padded shard, so both ranks' peaks are the same (measured byte-identical), except
    under ZeRO-Offload, whose per-parameter work at the end of the backward (the fp64 norm of each reduced
    gradient's piece, its copy to the host) follows which parameters fall into a rank's partition: the
    mistral row's ranks are 0.8% apart on the ledger, and the estimate (one figure per rank) is within 1%
    of both."""
    by_setup: dict[str, tuple[set[int], float]] = {}
    storages: dict[str, dict[int, list[dict]]] = {}
    for s, rank, _pred, meas, at_peak in sharded_rows:
        by_setup.setdefault(s.label(), (set(), 0.01 if s.offload != "none" else 0.001))[0].add(meas)
        storages.setdefault(s.label(), {})[rank] = at_peak
    spread = {k: v for k, (v, tol) in by_setup.items() if max(v) - min(v) > tol * max(v)}
    # A string, so that pytest prints all of it (it shortens the repr of other objects).
    assert not spread, "\n".join(f"{k}: peaks {sorted(v)}\n{_storage_difference(storages[k])}" for k, v in spread.items())


def _storage_difference(by_rank: dict[int, list[dict]]) -> str:
    """What the ranks held differently at their peaks, one line per (category, origin, phase made) with
    its bytes on each rank, so that a disagreement names the buffer behind it."""
    held: dict[int, dict[tuple[str, str, str], int]] = {}
    for rank, rows in by_rank.items():
        for row in rows:
            key = (row["category"], row["origin"], row["born"])
            held.setdefault(rank, {})[key] = held.get(rank, {}).get(key, 0) + row["bytes"]
    ranks = sorted(held)
    keys = sorted({k for per in held.values() for k in per})
    lines = [f"  {' / '.join(k)}: " + ", ".join(f"rank {r} {held[r].get(k, 0)}" for r in ranks)
             for k in keys if len({held[r].get(k, 0) for r in ranks}) > 1]
    return "\n".join(lines) or "  (the same storages on every rank)"


# Random sharded setups: reported with the matrix, held to a looser bound than the listed matrix (as the
# single-process random draw is), since they reach layouts and shapes the matrix does not: a 1-layer
# model, FSDP2's in-layer forward moment (a phi3 LoRA draw peaked there at -7.5%).
RANDOM_BOUND = 0.15


def test_random_sharded_setups(cpu_campaign, pytestconfig: pytest.Config) -> None:
    from conftest import REPORTS  # tests/conftest.py

    from memplan.measure.compare import measured_peak_prediction
    from memplan.model.architectures import spec_from_config
    from memplan.training.estimate import estimate

    cases = cpu_campaign.sharded_cases
    assert cases, "the session drew no random sharded setup"
    by_label = {c.setup.label(): c for c in cases}
    rows = [(by_label[lab], r) for r in cpu_campaign.records if r.get("rank") is not None
            for lab in [_record_label(r)] if lab in by_label]
    assert len(rows) == 2 * len(cases), "a random sharded rank has no record"
    failed = [(lab, r["rank"], (r.get("error") or r.get("oom") or {}).get("message")) for c, r in rows if r["outcome"] != "ok"
              for lab in [c.setup.label()]]
    assert not failed, f"random sharded runs failed: {failed}"
    lines, worst = [f"{'random sharded setup (seed ' + str(cpu_campaign.seed) + ')':<70}{'rank':>5}{'error':>9}"], []
    for c, r in rows:
        est = estimate(c.setup, model=spec_from_config(c.config, name=c.family))
        pred, meas = measured_peak_prediction(est), r["measured"]["steady_peak_bytes"]
        err = (pred - meas) / meas
        worst.append((abs(err), c.setup.label()))
        lines.append(f"{c.family + ' ' + _short(c.setup.label())[-62:]:<70}{r['rank']:>5}{100 * err:>+8.2f}%")
    pytestconfig.stash[REPORTS][f"CPU validation, random sharded setups ({len(cases)}, ws 2)"] = "\n".join(lines) + "\n"
    e, label = max(worst)
    assert e <= RANDOM_BOUND, f"{label}: |error| {e:.2%} (rerun with --validation-seed {cpu_campaign.seed})"


def _record_label(record: dict) -> str:
    from memplan.training.setup import Setup

    return Setup.from_dict(record["setup"]).label()
