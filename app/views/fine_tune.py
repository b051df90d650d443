"""Fine-tune: the memory of one training step, which GPUs it fits, and how far it can grow."""

from __future__ import annotations

import streamlit as st

from components.charts import breakdown_chart
from components.guard import shown_errors
from components.inputs import gpu_choice, init, model_spec
from memplan.planning import appdata
from memplan.planning.labels import SETUP_DEFAULTS as DEFAULTS, fit_verdict
from memplan.model.architectures import DEFAULT_LORA_TARGETS
from memplan.training.estimate import estimate
from memplan.training.fit import fit_on
from memplan.hardware.gpus import gpu_catalog
from memplan.model.lora import ALL_LINEAR
from memplan.training.search import limits_on
from memplan.training.setup import (ATTENTIONS, AUTOCASTS, MAX_BATCH, MAX_SEQ_LEN, METHODS, OPTIMIZERS, Setup, autocast_applies,
                                    double_quant_applies, prepare_kbit_applies, quants_for_method)
from memplan.model.storage import FLOAT_BYTES
from memplan.units import format_bytes, format_count

gpus = gpu_catalog()


def _follow_peft_checkpointing() -> None:
    """Ticking prepare_model_for_kbit_training turns checkpointing on, as PEFT's default does."""
    if st.session_state.get("ft_prepare_kbit"):
        st.session_state["ft_grad_checkpointing"] = True


with st.sidebar:
    st.header("Model")
    spec = model_spec("ft_")
    st.header("Training")
    # Every starting value is `memplan estimate`'s flag default (`Setup`'s fields, labels.SETUP_DEFAULTS).
    init("ft_method", DEFAULTS["method"])
    method = st.radio("Method", METHODS, key="ft_method", horizontal=True,
                      format_func={"lora": "LoRA / QLoRA", "full": "full fine-tuning"}.get)
    quants = list(quants_for_method(method))
    # Full fine-tuning cannot train a bitsandbytes base: the page swaps in bf16, says so, and gives the
    # user's format back on the way back to LoRA (unless another one was picked meanwhile).
    swapped = st.session_state.get("ft_quant_swapped")  # (the user's format, the one swapped in)
    if st.session_state.get("ft_quant") not in quants and "ft_quant" in st.session_state:
        swapped = (st.session_state["ft_quant"], DEFAULTS["quant"])
        st.session_state["ft_quant"], st.session_state["ft_quant_swapped"] = DEFAULTS["quant"], swapped
    elif swapped and (swapped[0] in quants or st.session_state.get("ft_quant") != swapped[1]):
        if swapped[0] in quants and st.session_state.get("ft_quant") == swapped[1]:
            st.session_state["ft_quant"] = swapped[0]
        swapped = st.session_state["ft_quant_swapped"] = None
    init("ft_quant", DEFAULTS["quant"], quants)
    quant = st.selectbox("Base weights", quants, key="ft_quant", help="bf16/fp16/fp32, or a bitsandbytes format (int8, nf4, fp4).")
    if swapped:
        st.caption(f"Full fine-tuning cannot train a {swapped[0]} base (bitsandbytes weights are frozen): "
                   f"{swapped[1]} here; LoRA gets {swapped[0]} back.")
    double_quant = False
    if double_quant_applies(quant):
        init("ft_double_quant", DEFAULTS["double_quant"])
        double_quant = st.checkbox("Double quantization", key="ft_double_quant", help="bnb_4bit_use_double_quant")
    targets: tuple[str, ...] | None = None
    rank = DEFAULTS["lora_rank"]  # unused by full fine-tuning
    if method == "lora":
        init("ft_lora_rank", DEFAULTS["lora_rank"])
        rank = int(st.number_input("LoRA rank r", min_value=1, max_value=65536, step=1, key="ft_lora_rank"))
        options = [ALL_LINEAR, *spec.linear_names]
        init("ft_lora_targets", list(DEFAULT_LORA_TARGETS[spec.model_type]))
        if any(t not in options for t in st.session_state["ft_lora_targets"]):  # another model's modules
            st.session_state["ft_lora_targets"] = list(DEFAULT_LORA_TARGETS[spec.model_type])
        chosen = st.multiselect(f"LoRA targets ({spec.name}'s linear modules)", options, key="ft_lora_targets",
                                help="PEFT target_modules; all-linear = every linear except the output layer.")
        targets = tuple(chosen)
    init("ft_seq_len", DEFAULTS["seq_len"])
    seq_len = int(st.number_input("Sequence length (tokens)", min_value=1, max_value=MAX_SEQ_LEN, step=256, key="ft_seq_len"))
    init("ft_batch_size", DEFAULTS["batch_size"])
    batch_size = int(st.number_input("Batch size (sequences)", min_value=1, max_value=MAX_BATCH, step=1, key="ft_batch_size"))
    init("ft_grad_checkpointing", bool(DEFAULTS["grad_checkpointing"]))  # None: off, unless prepare_kbit (below)
    checkpointing = st.toggle("Gradient checkpointing", key="ft_grad_checkpointing")
    init("ft_optimizer", DEFAULTS["optimizer"], OPTIMIZERS)
    optimizer = st.selectbox("Optimizer", OPTIMIZERS, key="ft_optimizer")
    init("ft_attention", appdata.default_attention(spec), ATTENTIONS)
    if st.session_state.get("ft_attention_for") != spec.model_type:  # a new family: transformers' own default
        st.session_state["ft_attention"] = appdata.default_attention(spec)
        st.session_state["ft_attention_for"] = spec.model_type
    attention = st.selectbox("Attention", ATTENTIONS, key="ft_attention")
    with st.expander("More options"):
        init("ft_compute_dtype", DEFAULTS["compute_dtype"], list(FLOAT_BYTES))
        compute_dtype = st.selectbox("Compute dtype (quantized bases)", list(FLOAT_BYTES), key="ft_compute_dtype")
        prepare_kbit = False
        if prepare_kbit_applies(quant):
            init("ft_prepare_kbit", DEFAULTS["prepare_kbit_training"])
            prepare_kbit = st.checkbox("prepare_model_for_kbit_training", key="ft_prepare_kbit", on_change=_follow_peft_checkpointing,
                                       help="PEFT's preparation of a quantized base (casts the rest to fp32; its default "
                                            "use_gradient_checkpointing=True turns checkpointing on, which the toggle above can undo).")
        autocast = "none"
        if autocast_applies(quant):
            init("ft_autocast", DEFAULTS["autocast"], AUTOCASTS)
            autocast = st.selectbox("Autocast (mixed precision)", AUTOCASTS, key="ft_autocast",
                                    help="fp32 master weights with the forward under torch.autocast (Trainer's bf16=True / fp16=True).")
        dropout = 0.0
        if method == "lora":
            init("ft_lora_dropout", DEFAULTS["lora_dropout"])
            dropout = float(st.number_input("LoRA dropout", min_value=0.0, max_value=0.99, step=0.05, key="ft_lora_dropout",
                                            help="lora_dropout: above 0 each adapted input is copied for backward."))
    st.header("GPUs and sharding")
    init("ft_gpus", DEFAULTS["gpus"])
    n_gpus = int(st.number_input("GPUs", min_value=1, max_value=appdata.MAX_APP_GPUS, step=1, key="ft_gpus",
                                 help="World size: GPUs in the job. The batch size stays per GPU."))
    per_node = None
    if n_gpus > 1:
        init("ft_gpus_per_node", 8)
        per_node = int(st.number_input("GPUs per node", min_value=1, max_value=appdata.MAX_APP_GPUS, step=1, key="ft_gpus_per_node",
                                       help="GPUs per server (8 on p5/p4d/DGX); FSDP hybrid shards within a node."))
    layouts = appdata.parallel_choices(n_gpus)
    init("ft_parallel", DEFAULTS["parallel"] if n_gpus == 1 else "ddp", layouts)  # past one GPU a layout is needed
    parallel = st.selectbox("Sharding", layouts, key="ft_parallel", format_func=appdata.parallel_label,
                            help="DDP, FSDP (accelerate / Trainer fsdp) or DeepSpeed ZeRO stage.")
    fsdp_version = DEFAULTS["fsdp_version"]
    if appdata.fsdp_version_applies(parallel):
        init("ft_fsdp_version", DEFAULTS["fsdp_version"], appdata.FSDP_VERSIONS)
        fsdp_version = st.selectbox("FSDP version", appdata.FSDP_VERSIONS, key="ft_fsdp_version",
                                    format_func={1: "1: FullyShardedDataParallel", 2: "2: fully_shard"}.get)
    offload = DEFAULTS["offload"]
    offloads = appdata.offload_choices(parallel)
    if len(offloads) > 1:
        init("ft_offload", DEFAULTS["offload"], offloads)
        offload = st.selectbox("Offload to host RAM", offloads, key="ft_offload",
                               help="FSDP CPUOffload / DeepSpeed offload_optimizer, offload_param.")
    quant_storage = DEFAULTS["quant_storage"]
    storages = appdata.quant_storage_choices(quant, parallel, compute_dtype)
    if storages:
        init("ft_quant_storage", DEFAULTS["quant_storage"] if DEFAULTS["quant_storage"] in storages else storages[0], storages)
        quant_storage = st.selectbox("4-bit quant storage", storages, key="ft_quant_storage",
                                     help="bnb_4bit_quant_storage: FSDP and ZeRO-3 flatten the base, so it must be the compute dtype.")
    st.header("GPU")
    gpu = gpu_choice("ft_gpu", gpus)

if method == "lora" and not targets:
    st.warning("Pick at least one LoRA target module in the sidebar.")
    st.stop()

with shown_errors():
    setup = Setup(model=spec.name, method=method, quant=quant, double_quant=double_quant, compute_dtype=compute_dtype,
                  lora_rank=rank, lora_targets=targets, lora_dropout=dropout, seq_len=seq_len, batch_size=batch_size,
                  grad_checkpointing=checkpointing, optimizer=optimizer, attention=attention, device="cuda",
                  prepare_kbit_training=prepare_kbit, autocast=autocast, gpus=n_gpus, gpus_per_node=per_node, parallel=parallel,
                  fsdp_version=fsdp_version, offload=offload, quant_storage=quant_storage)
    est = estimate(setup, model=spec)
    fit = fit_on(est, gpu)
    limits = limits_on(setup, gpu, spec=spec)

st.title(f"Fine-tune {spec.name}")
st.caption(f"{spec.architecture} ({spec.model_type}), {spec.num_layers} layers, hidden {spec.hidden_size}. "
           f"Source: {spec.source or 'uploaded'}")
per_gpu = appdata.is_per_gpu(est)
if per_gpu:
    st.info(appdata.layout_caption(est), icon=":material/memory:")
if est.notes:  # the library behaviours behind the number (memplan.training.notes)
    st.markdown("\n".join(f"- {n}" for n in est.notes), help="Notes: library behaviours that drive this estimate.")

# Two rows of three: six cards side by side clip "12.55 GiB" at 1280 px.
cols = [c for row in (st.columns(3), st.columns(3)) for c in row]
cols[0].metric("Peak memory per GPU" if per_gpu else "Peak memory", format_bytes(est.memory.peak),
               help=f"{est.memory.peak:,} bytes; peak phase: {est.memory.peak_phase}")
cols[1].metric(f"{gpu.key} usable", format_bytes(fit.usable_bytes), help=f"{fit.usable_bytes:,} bytes (nvidia-smi total)")
cols[2].metric("Headroom", format_bytes(fit.headroom_bytes), delta=fit_verdict(fit.fits),
               delta_color="normal" if fit.fits else "inverse", delta_arrow="off", help=f"{fit.headroom_bytes:,} bytes")
cols[3].metric("Parameters", format_count(est.total_parameters), help=f"{est.total_parameters:,}")
cols[4].metric("Trainable", format_count(est.trainable_parameters), help=f"{est.trainable_parameters:,}")
adapter = est.adapter_file_bytes.get("fp32")
cols[5].metric("Adapter file (fp32)", format_bytes(adapter, decimal=True) if adapter else "none",
               help=f"adapter_model.safetensors: {adapter:,} bytes" if adapter else "full fine-tuning saves the whole model")

host = appdata.host_rows(est)
if host:  # offloaded state: host RAM is a limit too
    for col, (label, value, hint) in zip(st.columns(3), host):
        col.metric(label, value, help=hint)

unit = appdata.axis_unit(max(est.memory.peak, fit.usable_bytes))
st.plotly_chart(
    breakdown_chart(appdata.breakdown(est, unit=unit), capacity=appdata.in_unit(fit.usable_bytes, unit), unit=unit,
                    capacity_label=f"{'one ' if per_gpu else ''}{gpu.name} usable: {format_bytes(fit.usable_bytes)}", per_gpu=per_gpu),
    key="ft_breakdown", config={"displayModeBar": False},
)
note = "" if est.device_terms.source != "none" else " No CUDA device terms calibrated yet: the peak leaves out the CUDA context."
st.caption(f"Memory {'of one GPU ' if per_gpu else ''}at the step's peak ({est.memory.peak_phase}); the parts add up to the peak. "
           f"GiB = 2³⁰ bytes, GB = 10⁹ bytes.{note}")

st.subheader(f"Largest that fits per GPU on {setup.gpus:,} x {gpu.key}" if per_gpu else f"Largest that fits on {gpu.key}")
a, b, c = st.columns(3)
# Full width: three cards in two fifths of the page clipped their labels.
a.metric(f"Batch (seq {seq_len:,})", f"{limits.max_batch_size:,}")
b.metric(f"Sequence (batch {batch_size:,})", f"{limits.max_seq_len:,}")
if limits.max_lora_rank is not None:  # full fine-tuning has no rank to grow
    c.metric("LoRA rank", f"{limits.max_lora_rank:,}" if limits.max_lora_rank else "none fits",
             help="The largest rank r that fits with these targets, sequence and batch.")
if limits.max_batch_size == 0:
    st.caption(f"Even one sequence of {seq_len:,} tokens does not fit on {gpu.key}.")

left, right = st.columns([3, 2])
with left:
    st.subheader("Catalog GPUs (per GPU)" if per_gpu else "Catalog GPUs")
    st.dataframe(appdata.fit_rows(est, gpus), hide_index=True, height="content", key="ft_fits")
with right:
    st.subheader("At the peak")
    st.dataframe(appdata.breakdown_rows(est), hide_index=True, height="content", key="ft_parts")
