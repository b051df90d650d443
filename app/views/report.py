"""Report: `memplan.planning.sweep` over a grid of models, quants, ranks, sequences and batches, as a CSV."""

from __future__ import annotations

import streamlit as st

from components.guard import shown_errors
from components.inputs import gpu_choice, init
from memplan.planning import appdata
from memplan.planning.grid import parse_grid
from memplan.hardware.gpus import gpu_catalog
from memplan.training.setup import METHODS, OPTIMIZERS, quants_for_method
from memplan.planning.sweep import sweep_grid

RANKS = [4, 8, 16, 32, 64, 128, 256]
SEQ_LENS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
BATCHES = [1, 2, 4, 8, 16, 32, 64]
# About 2 ms per setup: a larger grid belongs to `memplan sweep`, not to an interactive page.
MAX_SETUPS = 5_000

with st.sidebar:
    st.header("Grid")
    init("rep_models", ["llama2-7b", "mistral-7b", "llama3-8b"])
    models = st.multiselect("Models", appdata.catalog_names(), key="rep_models")
    init("rep_method", "lora")
    method = st.radio("Method", METHODS, key="rep_method", horizontal=True)
    quant_options = list(quants_for_method(method))
    init("rep_quants", ["bf16", "nf4"])
    st.session_state["rep_quants"] = [q for q in st.session_state["rep_quants"] if q in quant_options] or ["bf16"]
    quants = st.multiselect("Base weights", quant_options, key="rep_quants")
    ranks, targets = [8], None
    if method == "lora":
        init("rep_ranks", [8, 16, 64])
        ranks = st.multiselect("LoRA ranks", RANKS, key="rep_ranks")
        init("rep_targets", "default")
        targets = st.radio("LoRA targets", ["default", "all-linear"], key="rep_targets", horizontal=True,
                           format_func={"default": "PEFT's default", "all-linear": "all-linear"}.get)
    init("rep_seq_lens", [512, 2048])
    seq_lens = st.multiselect("Sequence lengths", SEQ_LENS, key="rep_seq_lens")
    init("rep_batches", [1, 4])
    batches = st.multiselect("Batch sizes", BATCHES, key="rep_batches")
    init("rep_checkpointing", True)
    checkpointing = st.toggle("Gradient checkpointing", key="rep_checkpointing")
    init("rep_optimizer", "adamw", OPTIMIZERS)
    optimizer = st.selectbox("Optimizer", OPTIMIZERS, key="rep_optimizer")
    gpu = gpu_choice("rep_gpu", gpu_catalog()).key

st.title("Report")
if not (models and quants and ranks and seq_lens and batches):
    st.info("Pick at least one value of every grid dimension in the sidebar.")
    st.stop()

with shown_errors():
    grid = parse_grid({"model": models, "method": method, "quant": quants, "lora_rank": ranks, "lora_targets": [targets],
                       "seq_len": seq_lens, "batch_size": batches, "grad_checkpointing": checkpointing,
                       "optimizer": optimizer, "gpu": gpu}, source="report grid")
    if grid.combinations > MAX_SETUPS:
        st.error(f"The grid has {grid.combinations:,} combinations; narrow it to at most {MAX_SETUPS:,} here, "
                 "or run it with `memplan sweep`.")
        st.stop()
    with st.spinner(f"Estimating {grid.combinations:,} setups ..."):
        frame = sweep_grid(grid)

st.caption(appdata.report_caption(frame, gpu))
st.dataframe(appdata.report_view(frame, gpu), hide_index=True, height=560, key="rep_table",
             column_config={c: st.column_config.NumberColumn(format="localized") for c in ("trainable_parameters", "peak_bytes")})
st.download_button("Download CSV", frame.to_csv(index=False), file_name="memplan-report.csv", mime="text/csv",
                   key="rep_download", icon=":material/download:")
if refused := appdata.refused_rows(frame):
    st.subheader("Left out")
    st.dataframe(refused, hide_index=True, key="rep_refused")
