"""Input widgets shared by the pages. They return library objects; they compute nothing.

Every widget takes its starting value from `st.session_state` (`init`), never from a
widget default, so a value survives page switches and tests can set it by key.
"""

from __future__ import annotations

from typing import Any, Sequence

import streamlit as st

from components.guard import shown_errors
from memplan.planning import appdata
from memplan.model.catalog import MAX_CONFIG_BYTES, load_model
from memplan.hardware.gpus import GPU, GPUCatalog
from memplan.model.spec import ModelSpec
from memplan.units import format_bytes

DEFAULT_MODEL = "llama2-7b"
DEFAULT_GPU = "a10g"


def init(key: str, value: Any, options: Sequence[Any] | None = None) -> None:
    """Give a widget its starting value; reset it when it left its options
    (the options changed with the model or the method)."""
    if key not in st.session_state or (options is not None and st.session_state[key] not in options):
        st.session_state[key] = value


def catalog_model(key: str, *, label: str = "Model") -> str:
    names = appdata.catalog_names()
    init(key, DEFAULT_MODEL, names)
    return st.selectbox(label, names, key=key, help="A model from the catalog (data/models/: real config.json files).")


def model_spec(prefix: str) -> ModelSpec:
    """A catalog model, or an uploaded config.json (validated; nothing in it runs)."""
    init(f"{prefix}model_source", "catalog")
    source = st.radio("Model from", ["catalog", "upload"], key=f"{prefix}model_source", horizontal=True,
                      format_func={"catalog": "the catalog", "upload": "my config.json"}.get)
    if source == "catalog":
        with shown_errors():
            return load_model(catalog_model(f"{prefix}model"))
    upload = st.file_uploader(
        "config.json", type=["json"], key=f"{prefix}upload", max_upload_size=1,
        help=f"A Hugging Face config.json: JSON only, at most {format_bytes(MAX_CONFIG_BYTES, decimal=True)}. "
             "It is parsed as data; nothing in it is executed.",
    )
    if upload is None:
        st.info("Upload a model's config.json to size it, or pick a catalog model.")
        st.stop()
    with shown_errors():
        return appdata.spec_from_upload(upload.name, upload.getvalue())


def gpu_choice(key: str, gpus: GPUCatalog, *, label: str = "GPU") -> GPU:
    keys = [g.key for g in gpus.gpus]
    init(key, DEFAULT_GPU, keys)
    return gpus.get(st.selectbox(label, keys, key=key, format_func=lambda k: appdata.gpu_label(gpus.get(k))))
