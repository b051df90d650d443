"""memplan.training.shard_inventory: which parameters a decoder layer holds, and which the root.

Reference: transformers' own meta-device model (`tests/conftest.py::build_model`): a parameter whose
name runs through the decoder-layer list (`.layers.` / `.h.` / `.layer.`) belongs to a layer unit, the
rest (embeddings, final norm, lm_head) to the root. The one-layer case is where a count-divisibility
rule cannot tell them apart (every count divides by 1): the random sharded draw of a one-layer llama
LoRA model measured +16% on the CPU ledger before the root's tensors were kept out of the layer unit.
"""

from __future__ import annotations

import re

import pytest

from conftest import TINY_CONFIGS, build_model
from memplan.model.architectures import spec_from_config
from memplan.training.shard_inventory import parameter_inventory

_IN_LAYER = re.compile(r"\.(layers|h|layer)\.\d+\.")


def _inventory(cfg: dict):
    spec = spec_from_config(cfg, name=cfg.get("model_type", "tiny"))
    inv = parameter_inventory(spec, quant="bf16", double_quant=False, param_dtype="bf16", quant_storage="uint8", plan=None,
                              adapter_itemsize=2)
    return spec, inv


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3"])
def test_layer_and_root_parameters_are_the_meta_models(family: str, layers: int) -> None:
    pytest.importorskip("transformers")
    cfg = {**TINY_CONFIGS[family], "num_hidden_layers": layers}
    model = build_model(cfg, meta=True)
    in_layers = sum(p.numel() for n, p in model.named_parameters() if _IN_LAYER.search(n))
    in_root = sum(p.numel() for n, p in model.named_parameters() if not _IN_LAYER.search(n))  # a tied table once
    spec, inv = _inventory(cfg)
    assert sum(e.numel * e.count for e in inv if e.per_layer) * spec.num_layers == in_layers
    assert sum(e.numel * e.count for e in inv if not e.per_layer) == in_root


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_the_tied_flag_marks_the_table_shared_with_lm_head(family: str) -> None:
    pytest.importorskip("transformers")
    cfg = TINY_CONFIGS[family]
    model = build_model(cfg, meta=True)
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    _spec, inv = _inventory(cfg)
    flagged = [e for e in inv if e.tied]
    assert len(flagged) == (1 if tied else 0)
    if tied:
        assert flagged[0].numel == model.get_input_embeddings().weight.numel() and flagged[0].output
