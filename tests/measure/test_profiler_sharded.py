"""The sharded profiler: N rank processes under torch.distributed (gloo on the CPU), one record
per rank, and a failed or hung rank that ends its group without hanging the campaign.

Reference for the sharded parameter bytes: each rank's own `weights_bytes`, the ledger's count
of the model `from_pretrained` loaded on that rank before wrapping: the same load as the
single-process profiler's, whose `weights_bytes` test_profiler.py checks against the storages
of a model transformers builds from the same config. FULL_SHARD keeps 1/N of every flattened
parameter (torch/distributed/fsdp/_flat_param.py::FlatParamHandle.shard, padded to a multiple
of N; FSDP2 chunks dim 0: _fully_shard/_fsdp_param.py::FSDPParam._init_sharded_param), so a
rank holds half the weights plus the padding and the unsharded buffers (rotary inv_freq);
DDP keeps all of them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.errors import ProfileError
from memplan.measure.profiler.campaign import Job, _batches
from memplan.measure.records import new_record, run_key, validate_record
from memplan.training.setup import Setup

from sharded_matrix import TINY_LLAMA, run_sharded

_SETUP = Setup(model=TINY_LLAMA, device="cpu", gpus=2, parallel="fsdp", seq_len=64, batch_size=1)


# ---- records and grouping (no subprocess) ---------------------------------------------------
def test_rank_is_an_optional_top_level_field_and_part_of_the_run_key() -> None:
    single = Setup(model=TINY_LLAMA, device="cpu")
    old = new_record(setup=single, layers=None, steps=3, env={}, outcome="ok")
    assert "rank" not in old and validate_record(old) == single  # single-process records as before
    ranked = [new_record(setup=_SETUP, layers=None, steps=3, env={}, outcome="ok", rank=r) for r in (0, 1)]
    assert [r["rank"] for r in ranked] == [0, 1]
    with pytest.raises(ProfileError, match="rank must be null or a whole number below its setup's gpus"):
        validate_record({**ranked[0], "rank": 2})
    keys = {run_key(_SETUP, None, 3, "env", r) for r in (None, 0, 1)}
    assert len(keys) == 3 and run_key(single, None, 3, "env") == run_key(single, None, 3, "env", None)


def test_sharded_jobs_of_one_world_size_share_a_rank_group() -> None:
    one = Job(Setup(model=TINY_LLAMA, device="cpu"), None, 3)
    two = [Job(Setup(model=TINY_LLAMA, device="cpu", gpus=2, parallel=p, seq_len=s), None, 3)
           for p in ("fsdp", "ddp") for s in (32, 64)]
    four = Job(Setup(model=TINY_LLAMA, device="cpu", gpus=4, parallel="fsdp"), None, 3)
    batches = _batches(list(enumerate([one, *two, four], 1)))
    assert [[i for i, _ in b] for b in batches] == [[1], [2, 3, 4, 5], [6]]


@pytest.mark.parametrize(("flags", "says"), [
    (["--gpus", "2"], "needs a layout: add --parallel"),
    (["--gpus", "2", "--parallel", "fsdp", "--method", "lora", "--quant", "nf4"], "cannot flatten a uint8 4-bit base"),
    (["--gpus", "2", "--parallel", "ddp", "--fsdp-version", "2"], "--fsdp-version applies to --parallel fsdp"),
    (["--gpus", "2", "--parallel", "fsdp", "--offload", "params_and_optimizer"], "no GPU to offload from"),
    (["--gpus", "0", "--parallel", "fsdp"], "--gpus must be a whole number"),
])
def test_bad_layouts_exit_2_with_one_line(flags: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "-m", TINY_LLAMA, "--device", "cpu", "--out", str(tmp_path / "r.jsonl"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "r.jsonl").exists()


# ---- real rank groups (world size 2) ----------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("sharded")
    base = dict(model=TINY_LLAMA, device="cpu", gpus=2, seq_len=64, batch_size=1)
    setups = {
        "fsdp1 full": Setup(**base, parallel="fsdp", method="full", quant="bf16"),
        "fsdp2 lora gc": Setup(**base, parallel="fsdp", fsdp_version=2, method="lora", quant="bf16", grad_checkpointing=True),
        "fsdp1 qlora": Setup(**base, parallel="fsdp", method="lora", quant="nf4", compute_dtype="bf16", quant_storage="bf16"),
        "ddp full": Setup(**base, parallel="ddp", method="full", quant="bf16"),
    }
    records = run_sharded(list(setups.values()), out=root / "runs.jsonl", checkpoint_dir=root / "ckpt", workers=2, timeout_s=600)
    by_setup = {name: [r for r in records if Setup.from_dict(r["setup"]) == s] for name, s in setups.items()}
    return by_setup


@pytest.mark.slow
def test_every_setup_writes_one_ok_record_per_rank(sharded_records: dict[str, list[dict]]) -> None:
    for name, records in sharded_records.items():
        assert sorted(r["rank"] for r in records) == [0, 1], name
        for r in records:
            assert r["outcome"] == "ok", (name, r.get("error"))
            m = r["measured"]
            assert m["world_size"] == r["setup"]["gpus"] == 2
            assert sum(m["breakdown_at_peak"].values()) == m["steady_peak_ledger_bytes"]
            assert m["layout"]["wrapper"] in ("FullyShardedDataParallel", "fully_shard", "DistributedDataParallel")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp1 full", "fsdp2 lora gc"])
def test_full_shard_keeps_half_the_weights_per_rank(sharded_records: dict[str, list[dict]], name: str) -> None:
    for r in sharded_records[name]:
        m = r["measured"]
        # Half the loaded weights; the rest is padding (< N elements per unit) and the replicated
        # rotary inv_freq buffer, under 0.5% here. LoRA adds its (sharded) adapters.
        adapters = m["trainable_bytes"] if r["setup"]["method"] == "lora" else 0
        assert m["parameters_bytes"] == pytest.approx(m["weights_bytes"] / 2 + adapters, rel=0.005), r["rank"]


@pytest.mark.slow
def test_qlora_shards_the_packed_weights_but_keeps_the_quant_state(sharded_records: dict[str, list[dict]]) -> None:
    for r in sharded_records["fsdp1 qlora"]:
        m = r["measured"]
        # The bf16-packed NF4 data is sharded; absmax/code (quant state) stay whole on every rank.
        assert m["weights_bytes"] / 2 < m["parameters_bytes"] < 0.6 * m["weights_bytes"]


@pytest.mark.slow
def test_ddp_keeps_everything_on_every_rank(sharded_records: dict[str, list[dict]]) -> None:
    for r in sharded_records["ddp full"]:
        m = r["measured"]
        assert m["parameters_bytes"] == m["weights_bytes"]
        assert m["optimizer_state_bytes"] >= 2 * m["trainable_bytes"]  # AdamW exp_avg + exp_avg_sq, unsharded
        assert m["breakdown_at_peak"]["comm_buffers"] >= m["trainable_bytes"]  # the gradient buckets


@pytest.mark.slow
def test_a_killed_rank_ends_its_group_and_the_next_setup_runs_in_a_fresh_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 dies while loading the first setup; rank 0 is left waiting in a collective. Both get
    error records, the group is killed, and the second setup runs in a new group."""
    pytest.importorskip("torch")
    monkeypatch.setenv("MEMPLAN_PROFILE_FAIL", "load@seq_len=32!")
    monkeypatch.setenv("MEMPLAN_PROFILE_FAIL_RANK", "1")
    setups = [Setup(model=TINY_LLAMA, device="cpu", gpus=2, parallel="fsdp", seq_len=s, batch_size=1) for s in (32, 16)]
    records = run_sharded(setups, out=tmp_path / "runs.jsonl", checkpoint_dir=tmp_path / "ckpt", workers=2, timeout_s=600, steps=2)
    first = {r["rank"]: r for r in records if r["setup"]["seq_len"] == 32}
    assert sorted(first) == [0, 1] and all(r["outcome"] == "error" for r in first.values())
    assert "rank 1 did not finish: rank 1 exited with status 70" in first[1]["error"]["message"]
    second = [r for r in records if r["setup"]["seq_len"] == 16]
    assert sorted((r["rank"], r["outcome"]) for r in second) == [(0, "ok"), (1, "ok")]


@pytest.mark.slow
def test_a_hung_rank_is_killed_at_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 hangs in the second forward, rank 0 waits for it in an all-gather: the campaign kills
    both at the per-setup timeout (the collective timeout is set past it) and records why."""
    pytest.importorskip("torch")
    monkeypatch.setenv("MEMPLAN_PROFILE_FAIL", "step2_forward~")
    monkeypatch.setenv("MEMPLAN_PROFILE_FAIL_RANK", "1")
    setup = Setup(model=TINY_LLAMA, device="cpu", gpus=2, parallel="fsdp", seq_len=16, batch_size=1)
    t0 = time.perf_counter()
    records = run_sharded([setup], out=tmp_path / "runs.jsonl", checkpoint_dir=tmp_path / "ckpt", workers=2, timeout_s=30, steps=2)
    assert time.perf_counter() - t0 < 90  # the kill comes at 30 s; no wait on the collective timeout (120 s)
    assert sorted((r["rank"], r["outcome"]) for r in records) == [(0, "error"), (1, "error")]
    assert all("did not finish: the setup ran past 30 s" in r["error"]["message"] for r in records)
