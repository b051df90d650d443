"""DeepSpeed ZeRO under the sharded profiler (memplan/measure/profiler/zero.py): the config
Trainer would hand DeepSpeed, and real world-size-2 ZeRO-2 / ZeRO-3 runs on the CPU (DeepSpeed's
CPU accelerator on gloo), one record per rank.

References for the real runs:
- ZeRO (arXiv:1910.02054 §5.1, P_os): each of N ranks keeps the fp32 master copy and Adam's two
  moments of 1/N of the trainable parameters, 12·Ψt/N bytes. DeepSpeed 0.19.8 makes the master
  partition in stage_1_and_2.py::DeepSpeedZeroOptimizer.__init__ (`single_partition_of_fp32_groups`:
  an fp32 clone of this rank's slice of the flat bf16 group, padded to a multiple of
  2·N elements) and stage3.py::_create_fp32_partitions (`fp32_partitioned_groups_flat`: each
  parameter's ds_tensor partition, ceil(numel/N) elements). tiny-llama's 2,094,336 trainable
  parameters split evenly, so the expected bytes are exact.
- ZeRO-2 keeps every bf16 weight on every rank (stage_1_and_2.py flattens them into
  `bit16_groups_flat`, the model's weights become views of it); ZeRO-3 keeps 1/N of them
  (partition_parameters.py::_partition_param) plus the parameters under
  stage3_param_persistence_threshold, whole.
- Trainer's "auto" bucket: reduce_bucket_size = hidden² elements
  (transformers/integrations/deepspeed.py::trainer_config_finalize); ZeRO-3 allocates it once
  in bf16 (stage3.py::_setup_for_real_optimizer), so 256²·2 = 131,072 bytes on every rank.
"""

from __future__ import annotations

import importlib.util

import pytest

from memplan.measure.profiler.zero import ds_config
from memplan.training.setup import Setup

from sharded_matrix import TINY_LLAMA, run_sharded

_BASE = dict(model=TINY_LLAMA, device="cpu", gpus=2, seq_len=64, batch_size=2)
_HIDDEN = 256  # tests/data/tiny/tiny-llama/config.json
_TRAINABLE_FULL = 2_094_336  # tiny-llama's parameters (2 layers, vocab 1000, untied head)


# ---- the config (no DeepSpeed needed) ---------------------------------------------------------
def test_trainer_recipes_get_the_hidden_size_auto_values() -> None:
    cfg = ds_config(Setup(**_BASE, parallel="zero3", method="full", recipe="trainer"), _HIDDEN)
    zero = cfg["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 65_536, "stage3_prefetch_bucket_size": 58_982,
                    "stage3_param_persistence_threshold": 2_560}
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    stage2 = ds_config(Setup(**_BASE, parallel="zero2", method="full", recipe="trl-sft"), _HIDDEN)["zero_optimization"]
    assert stage2 == {"stage": 2, "reduce_bucket_size": 65_536}  # the stage-3 keys only at stage 3


def test_plain_recipe_keeps_deepspeeds_defaults_and_offload_is_gpu_only() -> None:
    plain = ds_config(Setup(**_BASE, parallel="zero1", method="full"), _HIDDEN)
    assert plain["zero_optimization"] == {"stage": 1}  # deepspeed/runtime/zero/config.py fills 5e8, 5e7, 1e5
    gpu = dict(_BASE, device="cuda")
    off = ds_config(Setup(**gpu, parallel="zero3", method="full", offload="params_and_optimizer"), _HIDDEN)["zero_optimization"]
    assert off["offload_optimizer"]["device"] == off["offload_param"]["device"] == "cpu"
    fp32 = ds_config(Setup(**_BASE, parallel="zero2", method="full", quant="fp32", compute_dtype="fp32"), _HIDDEN)
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]


# ---- real ZeRO-2 and ZeRO-3 at world size 2 -----------------------------------------------------
@pytest.fixture(scope="module")
def zero_records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[profile]')")
    root = tmp_path_factory.mktemp("zero")
    setups = {
        "zero2 full": Setup(**_BASE, parallel="zero2", method="full", quant="bf16", recipe="trainer"),
        "zero3 full gc": Setup(**_BASE, parallel="zero3", method="full", quant="bf16", recipe="trainer", grad_checkpointing=True),
    }
    records = run_sharded(list(setups.values()), out=root / "runs.jsonl", checkpoint_dir=root / "ckpt", workers=1, timeout_s=600)
    return {name: [r for r in records if Setup.from_dict(r["setup"]) == s] for name, s in setups.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2 full", "zero3 full gc"])
def test_each_rank_keeps_the_fp32_master_and_adam_state_of_half_the_parameters(zero_records: dict[str, list[dict]],
                                                                                 name: str) -> None:
    records = zero_records[name]
    assert sorted(r["rank"] for r in records) == [0, 1], [r.get("error") for r in records]
    for r in records:
        assert r["outcome"] == "ok", r.get("error")
        m = r["measured"]
        assert m["trainable_parameters"] == _TRAINABLE_FULL
        layout = m["layout"]
        assert layout["wrapper"] == "DeepSpeedEngine" and layout["zero"]["stage"] == (2 if "zero2" in name else 3)
        master = "single_partition_of_fp32_groups" if "zero2" in name else "fp32_partitioned_groups_flat"
        assert layout["buffers"][master]["storage_bytes"] == 4 * _TRAINABLE_FULL // 2
        # fp32 master + exp_avg + exp_avg_sq of 1/N, plus torch AdamW's 4-byte step count.
        assert m["optimizer_state_bytes"] == 12 * _TRAINABLE_FULL // 2 + 4
        assert sum(m["breakdown_at_peak"].values()) == m["steady_peak_ledger_bytes"]


@pytest.mark.slow
def test_zero2_keeps_every_weight_and_zero3_half_of_them(zero_records: dict[str, list[dict]]) -> None:
    for r in zero_records["zero2 full"]:
        m = r["measured"]
        assert m["parameters_bytes"] == m["weights_bytes"]  # bit16_groups_flat holds all of them
    for r in zero_records["zero3 full gc"]:
        m = r["measured"]
        # After wrapping, each rank holds its half of every parameter (all even-sized here) and the
        # rotary inv_freq buffers (256 B, not partitioned: buffers never are). The 5 RMSNorm weights,
        # under the persistence threshold 10·h, are gathered whole from the first forward to the step.
        assert m["parameters_bytes"] == pytest.approx(m["weights_bytes"] / 2, abs=256)
        assert m["layout"]["buffers"]["persistent_params"] == {"tensors": 5, "elements": 5 * _HIDDEN, "storage_bytes": 5 * _HIDDEN * 2}


@pytest.mark.slow
def test_zero3_holds_trainers_reduce_bucket_on_every_rank(zero_records: dict[str, list[dict]]) -> None:
    for r in zero_records["zero3 full gc"]:
        m = r["measured"]
        assert m["layout"]["zero"]["reduce_bucket_size"] == _HIDDEN**2
        assert m["layout"]["buffers"]["ipg_bucket"]["storage_bytes"] == _HIDDEN**2 * 2
        assert m["comm_buffers_at_peak"].get("ipg_bucket") == _HIDDEN**2 * 2


def test_estimators_bucket_sizes_are_what_transformers_fills_in() -> None:
    """The estimator's `zero_buckets` against transformers' own "auto" filler
    (HfTrainerDeepSpeedConfig.trainer_config_finalize, run by ds_config), at a hidden size where
    0.9·h² is not whole."""
    from memplan.training.sharding import zero_buckets

    setup = Setup(**_BASE, parallel="zero3", method="full", recipe="trainer")
    for hidden in (_HIDDEN, 4096, 5120 + 7):
        zero = ds_config(setup, hidden)["zero_optimization"]
        reduce, prefetch, _live, persistence = zero_buckets(setup, hidden)
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
            == (reduce, prefetch, persistence)
