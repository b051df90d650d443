"""Config fields a random or trimmed config.json leaves out take transformers' own defaults.

The reference is transformers' configuration classes (installed with the profile extra): what
`from_pretrained` would build from the same JSON. Before this, a Gemma2 config without
`attn_logit_softcapping` / `final_logit_softcapping` was modelled without softcapping (random draws:
-12% to -28%), and GPT-2/BERT configs without dropout fields without dropout masks.
"""

from __future__ import annotations

import pytest

from memplan.model.architectures import spec_from_config
from memplan.training.activations_classic import dropouts

transformers = pytest.importorskip("transformers")


def test_gemma2_softcapping_defaults_are_gemma2configs() -> None:
    bare = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100}
    ref = transformers.Gemma2Config(**{k: v for k, v in bare.items() if k != "model_type"})
    spec = spec_from_config(bare, name="bare")
    assert spec.attn_logit_softcapping == ref.attn_logit_softcapping
    assert spec.final_logit_softcapping == ref.final_logit_softcapping


def test_an_explicit_null_turns_gemma2_softcapping_off() -> None:
    cfg = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100,
           "attn_logit_softcapping": None, "final_logit_softcapping": None}
    ref = transformers.Gemma2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    spec = spec_from_config(cfg, name="off")
    assert (spec.attn_logit_softcapping, spec.final_logit_softcapping) == (ref.attn_logit_softcapping, ref.final_logit_softcapping) == (None, None)


@pytest.mark.parametrize("family,cls,keys", [
    ("gpt2", "GPT2Config", ("attn_pdrop", "resid_pdrop", "embd_pdrop")),
    ("bert", "BertConfig", ("attention_probs_dropout_prob", "hidden_dropout_prob", "hidden_dropout_prob")),
])
def test_classic_dropout_defaults_are_transformers(family: str, cls: str, keys: tuple[str, ...]) -> None:
    shape = {"gpt2": {"n_embd": 64, "n_layer": 1, "n_head": 2, "n_positions": 128, "vocab_size": 100},
             "bert": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                      "max_position_embeddings": 128, "vocab_size": 100}}[family]
    ref = getattr(transformers, cls)(**shape)
    spec = spec_from_config({"model_type": family, **shape}, name=family)
    assert dropouts(spec) == tuple(getattr(ref, k) for k in keys)
    given = spec_from_config({"model_type": family, **shape, **dict.fromkeys(keys, 0.0)}, name=family)
    assert dropouts(given) == (0.0, 0.0, 0.0)
