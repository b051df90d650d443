"""The random draw of models and setups (memplan.measure.random_setups), without running it:
reproducible by seed, every family and every flag value drawn, only valid combinations, and
configs that transformers builds to the parameter count memplan's spec has."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from memplan.measure.random_setups import FAMILIES, draw_cases
from memplan.model.architectures import spec_from_config
from memplan.training.estimate import estimate
from memplan.training.setup import AUTOCASTS, OPTIMIZERS


def test_same_seed_same_draw_and_files(tmp_path: Path) -> None:
    a = draw_cases(12, seed=42, folder=tmp_path / "a")
    b = draw_cases(12, seed=42, folder=tmp_path / "b")
    assert [(c.family, c.config) for c in a] == [(c.family, c.config) for c in b]
    assert [c.setup.to_dict() | {"model": None} for c in a] == [c.setup.to_dict() | {"model": None} for c in b]
    assert [c.config for c in draw_cases(12, seed=43, folder=tmp_path / "c")] != [c.config for c in a]
    for c in a:
        assert json.loads(Path(c.setup.model).read_text()) == c.config


def test_every_family_in_every_eight_draws(tmp_path: Path) -> None:
    cases = draw_cases(24, seed=7, folder=tmp_path)
    for k in range(0, 24, 8):
        assert sorted(c.family for c in cases[k:k + 8]) == sorted(FAMILIES)


def test_every_flag_value_is_drawn_and_every_draw_is_valid(tmp_path: Path) -> None:
    cases = draw_cases(400, seed=1, folder=tmp_path)
    seen: dict[str, Counter] = {}
    for c in cases:
        s = c.setup
        estimate(s, model=spec_from_config(c.config, name=c.family))  # raises on an invalid combination
        for key, value in [("quant", s.quant), ("method", s.method), ("double_quant", s.double_quant), ("compute_dtype", s.compute_dtype),
                           ("optimizer", s.optimizer), ("autocast", s.autocast), ("attention", s.attention),
                           ("grad_checkpointing", s.grad_checkpointing), ("prepare_kbit_training", s.prepare_kbit_training),
                           ("dropout", s.lora_dropout > 0), ("targets", "default" if s.lora_targets is None else
                                                             "all-linear" if s.lora_targets == ("all-linear",) else "list"),
                           ("rank", s.lora_rank), ("layers", c.config.get("num_hidden_layers", c.config.get("n_layer"))),
                           ("tie", c.config.get("tie_word_embeddings")), ("head_dim", "head_dim" in c.config)]:
            seen.setdefault(key, Counter())[value] += 1
    assert set(seen["quant"]) == {"bf16", "fp16", "fp32", "int8", "nf4", "fp4"}
    assert set(seen["optimizer"]) == set(OPTIMIZERS) and set(seen["autocast"]) == set(AUTOCASTS)
    for key in ("method", "double_quant", "grad_checkpointing", "prepare_kbit_training", "dropout", "tie", "head_dim"):
        assert len(seen[key]) >= 2, (key, seen[key])
    assert set(seen["compute_dtype"]) == {"bf16", "fp16", "fp32"} and set(seen["attention"]) == {"sdpa", "eager"}
    assert set(seen["targets"]) == {"default", "all-linear", "list"} and set(seen["layers"]) == {1, 2, 3}
    assert len(seen["rank"]) >= 6


@pytest.mark.parametrize("seed", [3, 11])
def test_drawn_configs_build_in_transformers_to_the_spec_parameter_count(seed: int, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from conftest import build_model  # tests/conftest.py

    for c in draw_cases(8, seed=seed, folder=tmp_path):
        model = build_model(c.config, meta=True)
        assert sum(p.numel() for p in model.parameters()) == spec_from_config(c.config, name=c.family).total_parameters, c.config


def test_drawing_never_imports_torch(tmp_path: Path) -> None:
    code = ("import sys; from memplan.measure.random_setups import draw_cases; "
            f"draw_cases(16, seed=5, folder={str(tmp_path)!r}); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_validate_random_cli_prints_the_seed_and_the_summary(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`memplan validate --random N --seed S --workers W` hands its arguments to random_campaign
    (the profiling itself is the slow tier's job) and prints the table's summary line."""
    pytest.importorskip("torch")
    from memplan.cli import main
    from memplan.measure import random_setups

    calls = []
    monkeypatch.setattr(random_setups, "random_campaign", lambda n, **kw: calls.append((n, kw)) or ([], [], False))
    assert main(["validate", "--random", "3", "--seed", "17", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert calls[0][0] == 3 and calls[0][1]["seed"] == 17 and calls[0][1]["workers"] == 2
    assert "seed 17" in captured.err and "steady-state peak |error|, seed 17 (0 ok of 0 runs)" in captured.out
