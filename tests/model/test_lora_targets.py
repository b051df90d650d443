"""memplan.model.lora.parse_lora_targets: the one reading of a typed target set
(flag, grid, app, record), and the word tables show for it."""

from __future__ import annotations

import pytest

from memplan.errors import SetupError
from memplan.model.lora import lora_targets_text, parse_lora_targets


@pytest.mark.parametrize(("value", "expected"), [
    ("q_proj,v_proj", ("q_proj", "v_proj")),
    (" q_proj , v_proj ,", ("q_proj", "v_proj")),
    (["q_proj", " v_proj "], ("q_proj", "v_proj")),
    (("all-linear",), ("all-linear",)),
    ("all-linear", ("all-linear",)),
    ("all-linear,lm_head", ("all-linear", "lm_head")),
    (None, None),
    ("default", None),
    (" Default ", None),
    ("peft-default", None),
])
def test_parse(value: object, expected: object) -> None:
    assert parse_lora_targets(value) == expected


@pytest.mark.parametrize("value", ["", " , ", [], (), [" "]])
def test_empty_is_refused(value: object) -> None:
    with pytest.raises(SetupError, match="--lora-targets is empty"):
        parse_lora_targets(value)


def test_text() -> None:
    assert lora_targets_text(("q_proj", "v_proj")) == "q_proj,v_proj"
    assert lora_targets_text(None) == "default"


def test_every_entry_point_reads_targets_alike() -> None:
    from memplan.planning.grid import parse_grid
    from memplan.serving.fleet import PlanInputs
    from memplan.training.setup import Setup

    for typed in ("q_proj, v_proj", ["q_proj", "v_proj"]):
        assert Setup(model="llama2-7b", lora_targets=typed).lora_targets == ("q_proj", "v_proj")
        assert PlanInputs(model="llama2-7b", variants=1, rps=1.0, gpu="a10g", lora_targets=typed).lora_targets == ("q_proj", "v_proj")
    assert parse_grid({"model": "llama2-7b", "lora_targets": "q_proj, v_proj"}).setup["lora_targets"] == (("q_proj", "v_proj"),)
    assert Setup(model="llama2-7b", lora_targets="default").lora_targets is None
    assert parse_grid({"model": "llama2-7b", "lora_targets": "default"}).setup["lora_targets"] == (None,)
