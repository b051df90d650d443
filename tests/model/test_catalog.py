"""The catalog and config loading, without torch.

Published totals come from /work/shared/REFERENCE.md (Llama-2-7B) and the
model cards; everything else is checked against transformers in
test_architectures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_CONFIGS
from memplan.model.architectures import SUPPORTED_MODEL_TYPES, spec_from_config
from memplan.model.catalog import MAX_CONFIG_BYTES, catalog, load_model, with_layers
from memplan.errors import ConfigError, UnknownModelError, UnsupportedArchitectureError


def test_llama2_7b_published_total() -> None:
    # REFERENCE.md, "Exact counts that tests can pin": Llama-2-7B has 6,738,415,616 parameters.
    assert load_model("llama2-7b").total_parameters == 6_738_415_616


def test_gpt2_published_total() -> None:
    # openai-community/gpt2 model card / `GPT2LMHeadModel.num_parameters()`: 124,439,808.
    assert load_model("gpt2").total_parameters == 124_439_808


def test_every_catalog_entry_loads_and_names_its_source() -> None:
    entries = catalog()
    assert len(entries) >= 10
    assert [e.name for e in entries] == sorted(e.name for e in entries)
    for e in entries:
        spec = load_model(e.name)
        assert spec.name == e.name
        assert e.source.startswith("http"), e.name
        assert spec.model_type in SUPPORTED_MODEL_TYPES


def test_lookup_by_hf_id_is_case_insensitive() -> None:
    assert load_model("meta-llama/llama-2-7b-HF").total_parameters == load_model("llama2-7b").total_parameters
    assert load_model(" LLAMA2-7B ").name == "llama2-7b"


def test_local_config_file_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIGS["llama"]))
    by_folder = load_model(str(folder))
    by_file = load_model(str(folder / "config.json"))
    assert by_folder.name == by_file.name == "my-llama"
    assert by_folder.total_parameters == by_file.total_parameters
    other = tmp_path / "tiny_qwen.json"
    other.write_text(json.dumps(TINY_CONFIGS["qwen2"]))
    assert load_model(str(other)).name == "tiny_qwen"


def test_catalog_style_file_is_accepted(tmp_path: Path) -> None:
    entry = next(e for e in catalog() if e.name == "gpt2")
    copy = tmp_path / "copy.json"
    copy.write_text(entry.path.read_text())
    assert load_model(str(copy)).total_parameters == 124_439_808


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UnknownModelError, match="did you mean .*llama2-7b"):
        load_model("llama2-7")
    with pytest.raises(UnknownModelError, match="memplan models"):
        load_model("zzzzzzzz")
    with pytest.raises(UnknownModelError):
        load_model("   ")


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "config.json"
    p.write_text(text)
    return str(p)


def test_malformed_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        load_model(_write(tmp_path, '{"model_type": "llama",'))


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        load_model(_write(tmp_path, "[1, 2]"))


def test_missing_field_is_named(tmp_path: Path) -> None:
    cfg = dict(TINY_CONFIGS["llama"])
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError, match="missing field 'intermediate_size'"):
        load_model(_write(tmp_path, json.dumps(cfg)))
    with pytest.raises(ConfigError, match="missing field 'model_type'"):
        spec_from_config({"hidden_size": 8}, name="x")


def test_unsupported_model_type_lists_supported() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'t5' is not supported; supported: llama, .*bert"):
        spec_from_config({"model_type": "t5"}, name="t5-small")


def test_huge_config_is_refused_before_parsing(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"model_type": "llama", "pad": "' + "x" * MAX_CONFIG_BYTES + '"}')
    with pytest.raises(ConfigError, match="at most 1,000,000 bytes"):
        load_model(path)


def test_non_utf8_config(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_model(str(p))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", "4096", "must be an integer"),
        ("hidden_size", 64.5, "must be an integer"),
        ("hidden_size", True, "must be an integer"),
        ("num_hidden_layers", 0, "must be >= 1"),
        ("vocab_size", -5, "must be >= 1"),
        ("vocab_size", 10**12, "implausibly large"),
        ("tie_word_embeddings", "yes", "true or false"),
        ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
    ],
)
def test_bad_field_values(field: str, value: object, message: str) -> None:
    cfg = dict(TINY_CONFIGS["llama"], **{field: value})
    with pytest.raises(ConfigError, match=message):
        spec_from_config(cfg, name="bad")


def test_integral_floats_are_accepted() -> None:
    cfg = dict(TINY_CONFIGS["llama"], hidden_size=72.0)
    assert spec_from_config(cfg, name="ok").hidden_size == 72


def test_with_layers_truncates_and_checks() -> None:
    spec = load_model("llama2-7b")
    two = with_layers(spec, 2)
    # One Llama-2-7B layer: 4*4096^2 (q,k,v,o) + 3*4096*11008 (gate,up,down) + 2*4096 (norms);
    # 32 of them plus 2*32000*4096 + 4096 (embeddings, lm_head, final norm) give the published total.
    per_layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert 32 * per_layer + 2 * 32000 * 4096 + 4096 == 6_738_415_616
    assert two.num_layers == 2
    assert two.total_parameters == 6_738_415_616 - 30 * per_layer
    assert with_layers(spec, None) is spec
    for bad in (0, -1, spec.num_layers + 1):
        with pytest.raises(ConfigError):
            with_layers(spec, bad)
