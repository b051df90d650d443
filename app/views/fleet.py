"""Fleet and cost: N fine-tuned variants under full fine-tuning, LoRA and LoRAX, side by side."""

from __future__ import annotations

from dataclasses import replace

import streamlit as st

from components.charts import STRATEGY_STYLE_TEXT, crossover_chart
from components.guard import shown_errors
from components.inputs import catalog_model, gpu_choice, init
from memplan.planning import appdata
from memplan.planning.labels import PLAN_DEFAULTS
from memplan.planning.render_plan import launch_script
from memplan.serving.launch import ENGINES, launch_settings
from memplan.serving.fleet import PlanInputs, plan, sweep_variants
from memplan.hardware.gpus import GPUCatalog, gpu_catalog
from memplan.model.storage import QUANTS

# N for the crossover chart: log-spaced over the range the page offers.
VARIANT_GRID = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
MAX_VARIANTS = VARIANT_GRID[-1]


@st.cache_data(max_entries=32, show_spinner="Sweeping N from 1 to 100,000 ...")
def _crossovers(inp: PlanInputs, gpus: GPUCatalog) -> tuple[list[dict], list[dict]]:
    """The sweep does not depend on N: changing N alone reuses it."""
    sw = sweep_variants(inp, VARIANT_GRID, catalog=gpus)
    return appdata.crossover_rows(sw), list(sw.crossovers)


with st.sidebar:
    st.header("Variants and traffic")
    model = catalog_model("fleet_model")
    init("fleet_variants", 100)
    variants = int(st.number_input("Fine-tuned variants N", min_value=1, max_value=MAX_VARIANTS, step=1, key="fleet_variants",
                                   help=f"1 to {MAX_VARIANTS:,}"))
    init("fleet_rps", 5.0)
    rps = float(st.number_input("Requests per second (all variants)", min_value=0.001, max_value=1e6, step=1.0, key="fleet_rps"))
    init("fleet_popularity", PLAN_DEFAULTS["popularity"])
    popularity = st.radio("Popularity", ["uniform", "zipf"], key="fleet_popularity", horizontal=True,
                          help="How traffic spreads over the variants.")
    zipf = 1.0
    if popularity == "zipf":
        init("fleet_zipf", PLAN_DEFAULTS["zipf_exponent"])
        zipf = float(st.number_input("Zipf exponent s", min_value=0.01, max_value=10.0, step=0.1, key="fleet_zipf"))
    init("fleet_prompt_tokens", PLAN_DEFAULTS["prompt_tokens"])
    prompt_tokens = int(st.number_input("Prompt tokens", min_value=1, max_value=10**6, step=128, key="fleet_prompt_tokens"))
    init("fleet_output_tokens", PLAN_DEFAULTS["output_tokens"])
    output_tokens = int(st.number_input("Output tokens", min_value=1, max_value=10**6, step=32, key="fleet_output_tokens"))
    st.header("Serving")
    gpus = gpu_catalog()
    gpu_key = gpu_choice("fleet_gpu", gpus).key
    init("fleet_quant", PLAN_DEFAULTS["quant"], QUANTS)
    quant = st.selectbox("Weights", QUANTS, key="fleet_quant")
    init("fleet_engine", ENGINES[0], ENGINES)
    engine = st.radio("Launch settings for", ENGINES, key="fleet_engine", horizontal=True,
                      help="lorax: the LoRAX strategy; vllm: the vLLM multi-LoRA strategy")
    init("fleet_lora_rank", PLAN_DEFAULTS["lora_rank"])  # `memplan plan --lora-rank`'s default
    rank = int(st.number_input("LoRA rank r", min_value=1, max_value=4096, step=1, key="fleet_lora_rank"))
    init("fleet_utilization", PLAN_DEFAULTS["utilization"])
    utilization = float(st.slider("Target utilisation", min_value=0.1, max_value=1.0, step=0.05, key="fleet_utilization"))
    init("fleet_scale_to_zero", PLAN_DEFAULTS["scale_to_zero"])
    scale_to_zero = st.toggle("Scale idle deployments to zero", key="fleet_scale_to_zero")
    st.header("Training (one-time)")
    init("fleet_train_quant", PLAN_DEFAULTS["train_quant"], ["bf16", "nf4"])
    train_quant = st.radio("LoRA base", ["bf16", "nf4"], key="fleet_train_quant", horizontal=True,
                           format_func={"bf16": "bf16 (LoRA)", "nf4": "nf4 (QLoRA)"}.get)
    init("fleet_dataset_tokens", PLAN_DEFAULTS["dataset_tokens"])
    dataset_tokens = int(st.number_input("Dataset tokens", min_value=1, max_value=10**12, step=1_000_000, key="fleet_dataset_tokens"))
    init("fleet_epochs", PLAN_DEFAULTS["epochs"])
    epochs = float(st.number_input("Epochs", min_value=0.1, max_value=100.0, step=1.0, key="fleet_epochs"))

st.title("Fleet and cost")
summary = st.empty()

with st.expander("GPU prices (editable)"):
    st.caption("Prefilled from the GPU catalog (data/gpus.json); edit a price to see the plan move.")
    edited = st.data_editor(
        appdata.price_rows(gpus), key="fleet_prices", hide_index=True, disabled=["GPU", "name", "source"],
        column_config={"usd_per_hour": st.column_config.NumberColumn("USD per GPU-hour", min_value=0.0, format="$%.3f", required=True)},
    )
    init("fleet_storage_price", gpus.storage_usd_per_gb_month)
    storage_price = float(st.number_input("Storage, USD per GB-month (GB = 10⁹ bytes)", min_value=0.0, step=0.001,
                                          format="%.3f", key="fleet_storage_price"))

with shown_errors():
    priced = appdata.catalog_with_price_rows(gpus, edited, storage_usd_per_gb_month=storage_price)
    inp = PlanInputs(model=model, variants=variants, gpu=gpu_key, rps=rps, popularity=popularity, zipf_exponent=zipf,
                     prompt_tokens=prompt_tokens, output_tokens=output_tokens, utilization=utilization, quant=quant,
                     lora_rank=rank, train_quant=train_quant, scale_to_zero=scale_to_zero, dataset_tokens=dataset_tokens,
                     epochs=epochs)
    p = plan(inp, catalog=priced)
    launch = launch_settings(p, engine)
    rows, crossovers = _crossovers(replace(inp, variants=VARIANT_GRID[0]), priced)

    summary.caption(appdata.plan_caption(p))
    # One card per strategy with its $/month (one figure per card fits 4 strategies at 1280 px,
    # $1,234,567,890 included), then every figure side by side in a table, which wraps, never clips.
    cards = appdata.strategy_cards(p)
    for col, card in zip(st.columns(len(cards)), cards):
        with col.container(border=True):  # the title as markdown: it wraps where a metric label would clip
            st.markdown(f"**{card['title']}**")
            st.metric("$/month", card["$/month"], delta="cheapest" if card["cheapest"] else None,
                      delta_arrow="off", delta_color="normal", help=appdata.CARD_FIGURES[0][1])
    st.table(appdata.strategy_table(cards))
    st.caption(" ".join(f"**{c['title']}**: {c['replica']}; {c['note']}." for c in cards)
               + " " + "; ".join(f"{label}: {hint}" for label, hint in appdata.CARD_FIGURES[1:]) + ".")

    st.subheader("$/month against N")
    st.plotly_chart(crossover_chart(rows, titles=appdata.STRATEGY_TITLES, current_variants=variants),
                    key="fleet_crossover", config={"displayModeBar": False})
    same = [f"{appdata.STRATEGY_TITLES[a]} ({STRATEGY_STYLE_TEXT.get(a, 'solid')}) and {appdata.STRATEGY_TITLES[b]} "
            f"({STRATEGY_STYLE_TEXT.get(b, 'solid')}) cost the same at every N: their lines coincide, both are drawn. "
            for a, b in appdata.coinciding(rows)]
    if same:
        st.caption("".join(same).strip())
    st.caption(appdata.crossover_text(crossovers, variants=VARIANT_GRID))

    st.subheader(f"Launch settings (memplan plan --emit {engine})")
    st.code(launch_script(launch, launch.gpu), language="bash")
    with st.expander("Every assumption behind these numbers"):
        st.dataframe(appdata.assumption_rows(p), hide_index=True, key="fleet_assumptions")
