"""The web app (`app/`), driven by `streamlit.testing.v1.AppTest`: every page, its main
widgets and the bad-upload cases. The app contains no formulas, so each displayed number
must equal what the library returns for the same inputs (read back from the widgets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from memplan.planning import appdata
from memplan.model.architectures import spec_from_config
from memplan.model.catalog import load_model
from memplan.errors import MemplanError
from memplan.training.estimate import estimate
from memplan.training.fit import fit_on
from memplan.hardware.gpus import gpu_catalog
from memplan.training.search import limits_on
from memplan.training.setup import Setup, autocast_applies, double_quant_applies, prepare_kbit_applies
from memplan.units import format_bytes, format_count

ROOT = Path(__file__).resolve().parents[2]
ENTRY = str(ROOT / "app" / "memplan_app.py")
TINY_LLAMA = ROOT / "tests" / "data" / "tiny" / "tiny-llama" / "config.json"
GIB = 2**30  # units.py's binary GiB, restated: the chart's axis must be in 2**30-byte units


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(ENTRY, default_timeout=60)
    at.run()
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def table(at: AppTest, column: str):
    """The first table (st.dataframe / st.data_editor) with `column`, as a DataFrame."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def plotly(at: AppTest, index: int = 0) -> dict:
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def ft_setup(at: AppTest, model: str) -> Setup:
    """The Setup the fine-tune page's widgets describe, read back from the widgets."""
    s = at.session_state
    lora = s["ft_method"] == "lora"
    quant = s["ft_quant"]
    # GPUs and sharding: a widget the page does not show leaves Setup's default (the page's rules, appdata's helpers).
    gpus = int(s["ft_gpus"]) if "ft_gpus" in s else 1
    parallel = s["ft_parallel"] if "ft_parallel" in s else "none"
    layout = dict(
        gpus=gpus, gpus_per_node=int(s["ft_gpus_per_node"]) if gpus > 1 else None, parallel=parallel,
        fsdp_version=s["ft_fsdp_version"] if appdata.fsdp_version_applies(parallel) else 1,
        offload=s["ft_offload"] if len(appdata.offload_choices(parallel)) > 1 else "none",
        quant_storage=s["ft_quant_storage"] if appdata.quant_storage_choices(quant, parallel, s["ft_compute_dtype"]) else "uint8",
    )
    return Setup(model=model, method=s["ft_method"], quant=quant, double_quant=double_quant_applies(quant) and s["ft_double_quant"],
                 compute_dtype=s["ft_compute_dtype"], lora_rank=int(s["ft_lora_rank"]) if lora else 8,
                 lora_targets=tuple(s["ft_lora_targets"]) if lora else None, lora_dropout=float(s["ft_lora_dropout"]) if lora else 0.0,
                 seq_len=int(s["ft_seq_len"]), batch_size=int(s["ft_batch_size"]), grad_checkpointing=s["ft_grad_checkpointing"],
                 optimizer=s["ft_optimizer"], attention=s["ft_attention"],
                 prepare_kbit_training=prepare_kbit_applies(quant) and s["ft_prepare_kbit"],
                 autocast=s["ft_autocast"] if autocast_applies(quant) else "none", **layout)


def check_fine_tune_page(at: AppTest, spec) -> None:
    """Every number on the fine-tune page against the library's for the same inputs."""
    assert not at.exception and not at.error
    setup = ft_setup(at, spec.name)
    est = estimate(setup, model=spec)
    gpu = gpu_catalog().get(at.session_state["ft_gpu"])
    fit = fit_on(est, gpu)
    lim = limits_on(setup, gpu, spec=spec)
    m = metrics(at)
    helps = {x.label: x.help for x in at.metric}
    peak = "Peak memory per GPU" if setup.parallel != "none" else "Peak memory"
    assert m[peak] == format_bytes(est.memory.peak)
    assert helps[peak].startswith(f"{est.memory.peak:,} bytes")  # to the byte
    assert helps["Headroom"] == f"{fit.headroom_bytes:,} bytes"
    assert helps["Trainable"] == f"{est.trainable_parameters:,}"
    assert m[f"{gpu.key} usable"] == format_bytes(gpu.usable_bytes)
    assert m["Headroom"] == format_bytes(fit.headroom_bytes)
    assert m["Parameters"] == format_count(est.total_parameters)
    assert m["Trainable"] == format_count(est.trainable_parameters)
    adapter = est.adapter_file_bytes.get("fp32")
    assert m["Adapter file (fp32)"] == (format_bytes(adapter, decimal=True) if adapter else "none")
    assert m[f"Batch (seq {setup.seq_len:,})"] == f"{lim.max_batch_size:,}"
    assert m[f"Sequence (batch {setup.batch_size:,})"] == f"{lim.max_seq_len:,}"
    if setup.method == "full":  # no rank to grow: no "LoRA rank 0"
        assert lim.max_lora_rank is None and "LoRA rank" not in m
    else:
        assert m["LoRA rank"] == (f"{lim.max_lora_rank:,}" if lim.max_lora_rank else "none fits")
    # The stacked bar: its segments are the peak's parts, to the byte, against the GPU's usable memory.
    fig = plotly(at)
    bars = [t for t in fig["data"] if t["type"] == "bar"]
    assert sum(t["customdata"][0] for t in bars) == est.memory.peak
    assert {t["customdata"][0] for t in bars} <= set(est.peak_parts.values())
    line = next(t for t in fig["data"] if t["type"] == "scatter")
    assert line["x"] == [gpu.usable_bytes / GIB] * 2
    assert fig["layout"]["xaxis"]["title"]["text"].startswith("GiB")
    # The breakdown table ends with the peak, in exact bytes.
    parts = table(at, "part")
    assert parts["bytes"].iloc[-1] == f"{est.memory.peak:,}"
    assert sum(int(b.replace(",", "")) for b in parts["bytes"].iloc[:-1]) == est.memory.peak
    # The catalog table: one row per GPU, fits and headroom from fit_on.
    fits = table(at, "headroom").set_index("GPU")
    assert sorted(fits.index) == sorted(g.key for g in gpu_catalog().gpus)
    for g in gpu_catalog().gpus:
        f = fit_on(est, g)
        assert fits.loc[g.key, "headroom"] == format_bytes(f.headroom_bytes)
        assert fits.loc[g.key, "fits"] == ("yes" if f.fits else "no")
        assert fits.loc[g.key, "$/hour"] == f"${g.usd_per_hour:,.3f}"


# ---- fine-tune ---------------------------------------------------------------------------------


def test_fine_tune_opens_on_a_catalog_default_and_shows_the_library_numbers() -> None:
    at = start()
    assert at.session_state["ft_model"] == "llama2-7b"
    check_fine_tune_page(at, load_model("llama2-7b"))


def test_fine_tune_widgets_drive_the_estimate() -> None:
    at = start()
    at.selectbox(key="ft_model").set_value("mistral-7b").run()
    at.number_input(key="ft_seq_len").set_value(2048).run()
    at.number_input(key="ft_batch_size").set_value(2).run()
    at.number_input(key="ft_lora_rank").set_value(64).run()
    at.selectbox(key="ft_optimizer").set_value("paged_adamw_8bit").run()
    at.toggle(key="ft_grad_checkpointing").set_value(False).run()
    at.selectbox(key="ft_gpu").set_value("a100-80gb").run()
    at.number_input(key="ft_lora_dropout").set_value(0.1).run()
    at.selectbox(key="ft_compute_dtype").set_value("fp16").run()
    check_fine_tune_page(at, load_model("mistral-7b"))
    at.radio(key="ft_method").set_value("full").run()
    # Full fine-tuning cannot train a quantized base: the quant list drops int8/nf4/fp4.
    assert at.selectbox(key="ft_quant").options == ["bf16", "fp16", "fp32"]
    assert at.session_state["ft_quant"] == "bf16"
    check_fine_tune_page(at, load_model("mistral-7b"))


def test_quantization_options_follow_the_quant() -> None:
    at = start()
    assert not any(c.key == "ft_double_quant" for c in at.checkbox)  # bf16: `memplan estimate`'s default
    at.selectbox(key="ft_quant").set_value("nf4").run()
    at.checkbox(key="ft_double_quant").check().run()
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.checkbox(key="ft_double_quant").uncheck().run()
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.checkbox(key="ft_prepare_kbit").check().run()
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.selectbox(key="ft_quant").set_value("int8").run()
    assert not any(c.key == "ft_double_quant" for c in at.checkbox)  # bnb_4bit_use_double_quant is 4-bit only
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.selectbox(key="ft_quant").set_value("bf16").run()
    assert [c.key for c in at.checkbox] == []
    check_fine_tune_page(at, load_model("llama2-7b"))


def test_mixed_precision_is_offered_on_fp32_weights() -> None:
    at = start()
    assert not any(b.key == "ft_autocast" for b in at.selectbox)
    at.radio(key="ft_method").set_value("full").run()
    at.selectbox(key="ft_quant").set_value("fp32").run()
    at.selectbox(key="ft_autocast").set_value("bf16").run()
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.radio(key="ft_method").set_value("lora").run()
    at.selectbox(key="ft_autocast").set_value("fp16").run()
    check_fine_tune_page(at, load_model("llama2-7b"))


def test_a_setup_that_does_not_fit_says_so() -> None:
    at = start()
    at.selectbox(key="ft_model").set_value("llama2-70b").run()
    at.radio(key="ft_method").set_value("full").run()
    check_fine_tune_page(at, load_model("llama2-70b"))
    headroom = next(m for m in at.metric if m.label == "Headroom")
    assert headroom.value.startswith("-") and headroom.proto.delta == "does not fit"
    assert any("does not fit" in c.value for c in at.caption)


def test_lora_targets_come_from_the_models_own_linear_modules() -> None:
    at = start()
    ms = at.multiselect(key="ft_lora_targets")
    assert ms.options == ["all-linear", *load_model("llama2-7b").linear_names]
    assert ms.value == ["q_proj", "v_proj"]  # PEFT's default for llama
    at.selectbox(key="ft_model").set_value("gpt2").run()
    ms = at.multiselect(key="ft_lora_targets")
    assert ms.options == ["all-linear", *load_model("gpt2").linear_names]
    assert ms.value == ["c_attn"]  # gpt2's modules replace llama's
    at.multiselect(key="ft_lora_targets").set_value(["c_attn", "c_fc", "c_proj"]).run()
    check_fine_tune_page(at, load_model("gpt2"))
    at.multiselect(key="ft_lora_targets").set_value([]).run()
    assert not at.exception and "at least one LoRA target" in at.warning[0].value


def test_gemma2_switches_attention_to_its_transformers_default() -> None:
    at = start()
    at.selectbox(key="ft_model").set_value("gemma2-9b").run()
    assert at.session_state["ft_attention"] == "eager"
    check_fine_tune_page(at, load_model("gemma2-9b"))
    at.selectbox(key="ft_attention").set_value("sdpa").run()
    assert not at.exception and "no SDPA" in at.error[0].value


def test_a_setup_the_library_refuses_is_one_red_line() -> None:
    at = start()
    at.selectbox(key="ft_model").set_value("gpt2").run()
    at.number_input(key="ft_seq_len").set_value(4096).run()
    assert not at.exception
    assert len(at.error) == 1 and "exceeds gpt2's 1024 learned positions" in at.error[0].value
    assert not at.get("plotly_chart")


def test_gpus_and_sharding_drive_a_per_gpu_estimate() -> None:
    at = start()
    assert at.selectbox(key="ft_parallel").value == "none" and at.number_input(key="ft_gpus").value == 1
    assert not any(b.key in ("ft_fsdp_version", "ft_offload", "ft_quant_storage") for b in at.selectbox)  # one GPU, bf16
    at.selectbox(key="ft_model").set_value("llama2-70b").run()
    at.radio(key="ft_method").set_value("full").run()
    at.number_input(key="ft_gpus").set_value(16).run()
    # Past one GPU a layout is needed: the page offers none without one and starts on DDP.
    assert "none" not in at.selectbox(key="ft_parallel").options and at.session_state["ft_parallel"] == "ddp"
    check_fine_tune_page(at, load_model("llama2-70b"))
    at.selectbox(key="ft_parallel").set_value("fsdp").run()
    at.selectbox(key="ft_fsdp_version").set_value(2).run()
    at.selectbox(key="ft_gpu").set_value("h100").run()
    check_fine_tune_page(at, load_model("llama2-70b"))
    setup = ft_setup(at, "llama2-70b")
    est = estimate(setup)
    assert (setup.gpus, setup.parallel, setup.fsdp_version) == (16, "fsdp", 2) and est.sharding is not None
    # The bar says it is one GPU's, and shows the layout's own parts (the gathered unit in flight).
    fig = plotly(at)
    assert "per GPU" in fig["layout"]["xaxis"]["title"]["text"]
    names = {t["name"] for t in fig["data"] if t["type"] == "bar"}
    assert {appdata.PART_LABELS[k] for k, v in est.peak_parts.items() if v} == names and appdata.PART_LABELS["gathered"] in names
    assert any("Per GPU: FSDP2 full shard over 16 GPUs" in i.value for i in at.info)
    assert at.subheader[0].value == "Largest that fits per GPU on 16 x h100"
    assert "Host RAM per GPU" not in metrics(at)  # nothing offloaded


def test_offloading_shows_host_ram() -> None:
    at = start()
    at.radio(key="ft_method").set_value("full").run()
    at.number_input(key="ft_gpus").set_value(8).run()
    at.selectbox(key="ft_parallel").set_value("zero3").run()
    assert at.selectbox(key="ft_offload").options == ["none", "optimizer", "params_and_optimizer"]
    at.selectbox(key="ft_offload").set_value("optimizer").run()
    check_fine_tune_page(at, load_model("llama2-7b"))
    sh = estimate(ft_setup(at, "llama2-7b")).sharding
    m = metrics(at)
    assert sh.host_per_gpu > 0
    assert m["Host RAM per GPU"] == format_bytes(sh.host_per_gpu) and m["Host RAM per node"] == format_bytes(sh.host_per_node)
    at.selectbox(key="ft_parallel").set_value("fsdp").run()  # FSDP offloads parameters and optimizer together
    assert at.selectbox(key="ft_offload").options == ["none", "params_and_optimizer"]
    assert at.session_state["ft_offload"] == "none"
    check_fine_tune_page(at, load_model("llama2-7b"))


def test_quant_storage_is_offered_for_4_bit_bases_and_follows_the_layout() -> None:
    at = start()
    at.selectbox(key="ft_quant").set_value("nf4").run()
    assert at.selectbox(key="ft_quant_storage").options == ["uint8", "bf16", "fp16", "fp32"]
    assert at.session_state["ft_quant_storage"] == "uint8"
    at.number_input(key="ft_gpus").set_value(2).run()
    at.selectbox(key="ft_parallel").set_value("zero3").run()
    # ZeRO-3 flattens the 4-bit base: bnb_4bit_quant_storage must be the compute dtype.
    assert at.selectbox(key="ft_quant_storage").options == ["bf16"] and at.session_state["ft_quant_storage"] == "bf16"
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.selectbox(key="ft_compute_dtype").set_value("fp16").run()
    assert at.session_state["ft_quant_storage"] == "fp16"
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.selectbox(key="ft_quant").set_value("int8").run()  # int8 cannot be sharded: the library's one line
    assert not at.exception and len(at.error) == 1 and "cannot shard bitsandbytes int8" in at.error[0].value


def test_widget_values_survive_a_page_switch() -> None:
    at = start()
    at.number_input(key="ft_batch_size").set_value(8).run()
    at.switch_page("views/report.py").run()
    at.switch_page("views/fine_tune.py").run()
    assert at.number_input(key="ft_batch_size").value == 8
    check_fine_tune_page(at, load_model("llama2-7b"))


# ---- uploads -------------------------------------------------------------------------------------


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    at.radio(key="ft_model_source").set_value("upload").run()
    at.file_uploader(key="ft_upload").set_value((name, data, "application/json")).run()
    return at


def test_uploaded_config_is_estimated_like_the_library() -> None:
    at = start()
    at.radio(key="ft_model_source").set_value("upload").run()
    assert "Upload a model's config.json" in at.info[0].value and not at.get("plotly_chart")
    data = TINY_LLAMA.read_bytes()
    upload(at, "tiny-llama.json", data)
    spec = spec_from_config(json.loads(data), name="tiny-llama")
    assert at.title[0].value == "Fine-tune tiny-llama"
    assert at.multiselect(key="ft_lora_targets").options == ["all-linear", *spec.linear_names]
    check_fine_tune_page(at, spec)


def _tiny_llama_with(**fields: object) -> bytes:
    return json.dumps(json.loads(TINY_LLAMA.read_text()) | fields).encode()


def _bad_architectures() -> bytes:
    return _tiny_llama_with(architectures=5)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("config.json", b"def evil(): import os", "is not valid JSON (line 1, column 1"),
        ("config.json", b'{"model_type": "llama",', "is not valid JSON"),
        ("config.json", b"{" + b" " * 1_000_000 + b"}", "is 1,000,002 bytes; a config.json is at most 1,000,000 bytes"),
        ("config.json", b"\xff\xfe\x00{", "is not UTF-8 text"),
        ("config.json", b"", "is empty"),
        ("config.json", b"[1, 2, 3]", "holds a JSON list; a config.json is a JSON object"),
        ("config.json", b'{"model_type": "t5"}', "model_type 't5' is not supported"),
        ("config.json", b'{"model_type": "llama"}', "missing field 'hidden_size'"),
        ("config.json", b'{"model_type": "llama", "hidden_size": "big"}', "field 'hidden_size' must be an integer"),
        ("config.json", _bad_architectures(), "field 'architectures' must be a list of class names"),
        ("config.json", b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        ("config.json", _tiny_llama_with(num_hidden_layers=5000), "has 5,000 layers; the app sizes models of at most 1,024"),
    ],
    ids=["code", "truncated", "too-large", "not-utf8", "empty", "json-list", "unsupported", "missing-field", "wrong-type",
         "malformed", "deep", "layers"],
)
def test_bad_uploads_are_one_clear_error(name: str, data: bytes, message: str) -> None:
    at = upload(start(), name, data)
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value
    assert "\n" not in at.error[0].value and "Traceback" not in at.error[0].value
    assert not at.get("plotly_chart") and not at.metric


def test_upload_reader_accepts_a_catalog_file_and_names_the_model() -> None:
    raw = (ROOT / "data" / "models" / "tinyllama-1.1b.json").read_bytes()
    assert appdata.spec_from_upload("x.json", raw) == load_model("tinyllama-1.1b")
    named = json.loads(TINY_LLAMA.read_text()) | {"_name_or_path": "org/tiny"}
    assert appdata.spec_from_upload("config.json", json.dumps(named).encode()).name == "org/tiny"


# ---- fleet and cost --------------------------------------------------------------------------------


def fleet_inputs(at: AppTest):
    from memplan.serving.fleet import PlanInputs

    s = at.session_state
    return PlanInputs(model=s["fleet_model"], variants=int(s["fleet_variants"]), gpu=s["fleet_gpu"], rps=float(s["fleet_rps"]),
                      popularity=s["fleet_popularity"], zipf_exponent=float(s["fleet_zipf"]) if s["fleet_popularity"] == "zipf" else 1.0,
                      prompt_tokens=int(s["fleet_prompt_tokens"]), output_tokens=int(s["fleet_output_tokens"]),
                      utilization=float(s["fleet_utilization"]), quant=s["fleet_quant"], lora_rank=int(s["fleet_lora_rank"]),
                      train_quant=s["fleet_train_quant"], scale_to_zero=s["fleet_scale_to_zero"],
                      dataset_tokens=int(s["fleet_dataset_tokens"]), epochs=float(s["fleet_epochs"]))


def check_fleet_page(at: AppTest, catalog=None) -> None:
    from memplan.serving.launch import launch_settings
    from memplan.serving.fleet import plan

    assert not at.exception and not at.error
    p = plan(fleet_inputs(at), catalog=catalog or gpu_catalog())
    # One card per strategy with its $/month; then the table: one column per strategy, one row per figure.
    assert [m.value for m in at.metric] == [appdata.usd(s.usd_per_month) for s in p.strategies.values()]
    shown = at.table[0].value
    for name, s in p.strategies.items():
        column = next(c for c in shown.columns if str(c).startswith(appdata.STRATEGY_TITLES[name]))
        na = lambda text: "n/a" if text == "-" else text  # noqa: E731
        assert shown[column].tolist() == [appdata.usd(s.usd_per_month), appdata.gpus_text(s.gpus),
                                          format_bytes(s.storage_bytes, decimal=True), appdata.usd(s.training_usd),
                                          na(appdata.seconds(s.cold_start_s)), na(appdata.seconds(s.swap_latency_s))]
    launch = launch_settings(p, at.session_state["fleet_engine"])
    assert at.code[0].value.endswith(launch.command())
    assert at.code[0].value.startswith(f"# {launch.replicas} replica(s) of {launch.tp} x {p.gpu.key}")


def test_fleet_cards_equal_the_plan_and_the_launch_settings() -> None:
    at = start("fleet")
    check_fleet_page(at)
    fig = plotly(at)
    assert fig["layout"]["xaxis"]["type"] == "log" and fig["layout"]["yaxis"]["type"] == "log"
    names = [t["name"] for t in fig["data"]]
    assert names == list(appdata.STRATEGY_TITLES.values())


def test_crossover_chart_is_the_library_sweep() -> None:
    from dataclasses import replace

    from memplan.serving.fleet import sweep_variants

    at = start("fleet")
    at.selectbox(key="fleet_model").set_value("tinyllama-1.1b").run()
    grid = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
    sw = sweep_variants(replace(fleet_inputs(at), variants=1), grid)
    fig = plotly(at)
    for trace, name in zip(fig["data"], appdata.STRATEGY_TITLES):
        assert trace["x"] == list(grid)
        assert trace["y"] == [p.strategies[name].usd_per_month for p in sw.plans]
    assert appdata.crossover_text(sw.crossovers, variants=grid) in [c.value for c in at.caption]
    # Strategies that cost the same at every N overlap: the page says so, and the lines differ in width and dash.
    for a, b in appdata.coinciding(appdata.crossover_rows(sw)):
        ta, tb = (next(t for t in fig["data"] if t["name"] == appdata.STRATEGY_TITLES[k]) for k in (a, b))
        assert ta["line"]["width"] != tb["line"]["width"] and ta["line"].get("dash") != tb["line"].get("dash")
        assert ta["marker"]["symbol"] != tb["marker"]["symbol"]
        assert any(f"{appdata.STRATEGY_TITLES[a]} (" in c.value and "their lines coincide" in c.value for c in at.caption)


def test_fleet_widgets_drive_the_plan() -> None:
    at = start("fleet")
    at.number_input(key="fleet_variants").set_value(1000).run()
    at.number_input(key="fleet_rps").set_value(20.0).run()
    at.radio(key="fleet_popularity").set_value("zipf").run()
    at.number_input(key="fleet_zipf").set_value(1.2).run()
    at.selectbox(key="fleet_gpu").set_value("l40s").run()
    at.radio(key="fleet_engine").set_value("vllm").run()
    check_fleet_page(at)
    assert at.code[0].value.split("\n")[1].startswith("vllm serve")


def test_edited_prices_move_the_plan() -> None:
    at = start("fleet")
    prices = table(at, "usd_per_hour")
    assert list(prices["usd_per_hour"]) == [g.usd_per_hour for g in gpu_catalog().gpus]
    row = list(prices["GPU"]).index("a10g")
    at.session_state["fleet_prices"] = {"edited_rows": {row: {"usd_per_hour": 2.0}}, "added_rows": [], "deleted_rows": []}
    at.run()
    check_fleet_page(at, catalog=gpu_catalog().with_prices({"a10g": 2.0}))


def test_price_table_rejects_a_negative_price() -> None:
    rows = appdata.price_rows(gpu_catalog())
    rows[0] = {**rows[0], "usd_per_hour": -1.0}
    with pytest.raises(MemplanError, match="positive number of USD"):
        appdata.catalog_with_price_rows(gpu_catalog(), rows)


def test_a_plan_the_library_refuses_is_one_red_line() -> None:
    at = start("fleet")
    at.selectbox(key="fleet_model").set_value("llama3-70b").run()
    at.selectbox(key="fleet_gpu").set_value("t4").run()
    at.selectbox(key="fleet_quant").set_value("fp32").run()
    assert not at.exception and len(at.error) == 1 and "does not fit on up to 8 x t4" in at.error[0].value


# ---- calibration ---------------------------------------------------------------------------------------


def write_records(folder: Path, device: str, measured: list[dict]) -> Path:
    """Profile records with fixed measurements (inputs of this test, not outputs of memplan)."""
    from memplan.measure.records import append_record, new_record

    path = folder / f"{device}.jsonl"
    name = "NVIDIA A10G" if device == "cuda" else "Test CPU"
    for i, m in enumerate(measured):
        setup = Setup(model="tinyllama-1.1b", quant=("nf4", "bf16")[i % 2], seq_len=128 * (i + 1), device=device)
        append_record(path, new_record(setup=setup, layers=2, steps=3, env={"device_type": device, "device_name": name},
                                       outcome="ok", measured=m))
    return path


def test_calibration_without_profiles_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(appdata.PROFILES_ENV, str(tmp_path))
    at = start("calibration")
    assert "No profile records" in at.info[0].value and not at.get("plotly_chart")
    write_records(tmp_path, "cpu", [{"steady_peak_bytes": 300_000_000, "weights_bytes": 200_000_000}] * 2)
    at.run()
    assert not at.exception and "No GPU profiles yet" in at.info[0].value
    assert at.get("plotly_chart")  # the CPU records are still compared


def test_calibration_page_shows_the_library_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memplan.measure.records import read_records

    gib = 2**30
    measured = [{"steady_peak_bytes": int(k * gib), "nvml_peak_bytes": int(k * gib) + 500 * 2**20, "cuda_context_bytes": 400 * 2**20,
                 "weights_bytes": int(0.4 * gib)} for k in (0.7, 0.8, 1.1, 1.3, 1.6, 2.0)]
    write_records(tmp_path, "cuda", measured)
    monkeypatch.setenv(appdata.PROFILES_ENV, str(tmp_path))
    at = start("calibration")
    assert not at.error and str(tmp_path) in at.caption[0].value
    records = read_records([tmp_path])
    rows = appdata.comparison_rows(records)
    points = appdata.calibration_points(rows, kind="cuda: NVIDIA A10G", component="peak")
    assert len(points) == len(measured)
    fig = plotly(at)
    shown = sorted((x, y) for t in fig["data"][1:] for x, y in zip(t["x"], t["y"]))
    assert shown == sorted((p["measured_bytes"] / gib, p["predicted_bytes"] / gib) for p in points)
    assert {t["name"] for t in fig["data"][1:]} == {"nf4", "bf16"}
    m = metrics(at)
    for label, value in appdata.error_stats(points).items():
        assert m[label] == value
    for label, value in appdata.calibration_summary(records).items():
        assert m[label] == value
    worst = table(at, "record")
    assert list(worst["error"]) == [r["error"] for r in appdata.worst_rows(points)]
    at.selectbox(key="cal_component").set_value("weights").run()
    assert not at.exception and len(plotly(at)["data"]) == 3


def test_calibration_reads_the_shipped_and_the_users_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI's default (`memplan validate`): the shipped records plus ./profiles/ in the working directory.
    from memplan.measure.records import read_records
    from memplan.paths import profiles_dir

    shipped = read_records([profiles_dir()])
    first = (ROOT / "profiles" / "cuda-h100.jsonl").read_text(encoding="utf-8").splitlines()[0]
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.jsonl").write_text(first + "\n", encoding="utf-8")
    monkeypatch.delenv(appdata.PROFILES_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    at = start("calibration")
    assert not at.error
    caption = at.caption[0].value
    assert f"{profiles_dir()} (shipped with memplan)" in caption and f"{tmp_path / 'profiles'} (yours: ./profiles/)" in caption
    files = len(list(profiles_dir().glob("*.jsonl"))) + 1
    assert any(c.value.startswith(f"{len(shipped) + 1} record(s) from {files} file(s)") for c in at.caption)


def test_calibration_reports_a_broken_record_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n')
    monkeypatch.setenv(appdata.PROFILES_ENV, str(tmp_path))
    at = start("calibration")
    assert "bad.jsonl line 1 is not a valid profile record" in at.error[0].value


# ---- report ---------------------------------------------------------------------------------------------


def test_report_rows_are_the_library_estimates() -> None:
    at = start("report")
    at.multiselect(key="rep_models").set_value(["tinyllama-1.1b", "gpt2"]).run()
    at.multiselect(key="rep_quants").set_value(["nf4"]).run()
    at.multiselect(key="rep_ranks").set_value([8, 32]).run()
    at.multiselect(key="rep_seq_lens").set_value([512, 2048]).run()
    at.multiselect(key="rep_batches").set_value([2]).run()
    assert not at.exception and not at.error
    frame = table(at, "peak_bytes")
    gpu = gpu_catalog().get(at.session_state["rep_gpu"])
    expected = []
    for model in ("tinyllama-1.1b", "gpt2"):
        for rank in (8, 32):
            for seq in (512, 2048):
                setup = Setup(model=model, quant="nf4", lora_rank=rank, seq_len=seq, batch_size=2, grad_checkpointing=True)
                try:
                    expected.append(estimate(setup))
                except MemplanError as exc:  # gpt2 has 1024 learned positions: the row is left out, with the reason
                    assert "1024 learned positions" in str(exc)
    assert len(frame) == len(expected) == 6
    for row, est in zip(frame.to_dict("records"), expected):
        assert (row["model"], row["lora_rank"], row["seq_len"]) == (est.setup.model, est.setup.lora_rank, est.setup.seq_len)
        assert row["peak"] == format_bytes(est.memory.peak) and row["peak_bytes"] == est.memory.peak
        assert row["trainable_parameters"] == est.trainable_parameters
        assert bool(row["fits"]) == fit_on(est, gpu).fits and row["headroom"] == format_bytes(fit_on(est, gpu).headroom_bytes)
    left_out = table(at, "reason")
    assert list(left_out["combinations"]) == [2] and "1024 learned positions" in left_out["reason"][0]
    assert at.get("download_button")[0].proto.label == "Download CSV"


def test_report_full_fine_tuning_drops_quantized_bases() -> None:
    at = start("report")
    at.radio(key="rep_method").set_value("full").run()
    assert at.multiselect(key="rep_quants").options == ["bf16", "fp16", "fp32"]
    assert not at.exception and not at.error
    frame = table(at, "peak_bytes")
    assert set(frame["method"]) == {"full"} and frame["lora_rank"].isna().all()


def test_report_asks_for_every_dimension_and_caps_the_grid() -> None:
    at = start("report")
    at.multiselect(key="rep_batches").set_value([]).run()
    assert not at.exception and "at least one value" in at.info[0].value
    # With batches empty nothing runs; then the whole grid at once: 6 x 2 x 7 x 9 x 7 = 5,292 > 5,000 setups.
    at.multiselect(key="rep_models").set_value(["llama2-7b", "mistral-7b", "llama3-8b", "gpt2", "phi3-mini", "qwen2.5-7b"])
    at.multiselect(key="rep_seq_lens").set_value([128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
    at.multiselect(key="rep_ranks").set_value([4, 8, 16, 32, 64, 128, 256])
    at.multiselect(key="rep_batches").set_value([1, 2, 4, 8, 16, 32, 64]).run()
    assert not at.exception and "5,292 combinations; narrow it to at most 5,000" in at.error[0].value


# ---- the command ------------------------------------------------------------------------------------------


def test_memplan_app_runs_streamlit_on_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from memplan.cli import main
    from memplan.commands import app as app_command

    calls: list[list[str]] = []
    monkeypatch.setattr(app_command, "serve", lambda argv, env: calls.append(argv) or (0, None))
    assert main(["app", "--port", "8765", "--headless"]) == 0
    argv = calls[0]
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4] == ENTRY
    assert argv[argv.index("--server.port") + 1] == "8765" and argv[argv.index("--server.headless") + 1] == "true"
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"


def test_memplan_app_hands_the_profiles_folder_to_the_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from memplan.cli import main
    from memplan.commands import app as app_command

    envs: list[dict[str, str]] = []
    monkeypatch.setattr(app_command, "serve", lambda argv, env: envs.append(env) or (0, None))
    assert main(["app", "--headless", "--profiles", str(tmp_path)]) == 0
    assert envs[0][appdata.PROFILES_ENV] == str(tmp_path.resolve())


# ---- defaults shared with the CLI ------------------------------------------------------------------


def test_fine_tune_page_starts_on_the_cli_defaults() -> None:
    """`memplan estimate`'s flag defaults, `Setup`'s fields and the page's starting values are one set."""
    from memplan.commands.options import SETUP_FLAGS
    from memplan.planning.labels import SETUP_DEFAULTS

    flags = {decls[0].lstrip("-").split("/")[0].replace("-", "_"): kw.get("default") for decls, kw in SETUP_FLAGS}
    flags["prepare_kbit_training"] = flags.pop("prepare_kbit_training", None)
    for name, value in SETUP_DEFAULTS.items():
        if name in ("lora_targets", "attention"):  # None on the CLI: PEFT's and transformers' per-family defaults
            continue
        if name == "grad_checkpointing":  # None on the CLI: PEFT's default, off without prepare_kbit_training
            assert flags[name] is None and value is False
            continue
        assert flags[name] == value, name
    at = start()
    s = at.session_state
    page = {"method": s["ft_method"], "quant": s["ft_quant"], "lora_rank": s["ft_lora_rank"], "seq_len": s["ft_seq_len"],
            "batch_size": s["ft_batch_size"], "grad_checkpointing": s["ft_grad_checkpointing"], "optimizer": s["ft_optimizer"],
            "compute_dtype": s["ft_compute_dtype"], "lora_dropout": s["ft_lora_dropout"]}
    assert page == {k: SETUP_DEFAULTS[k] for k in page}
    check_fine_tune_page(at, load_model("llama2-7b"))


def test_full_fine_tuning_says_it_swapped_the_quant_and_lora_gets_it_back() -> None:
    at = start()
    at.selectbox(key="ft_quant").set_value("nf4").run()
    at.radio(key="ft_method").set_value("full").run()
    assert at.session_state["ft_quant"] == "bf16"
    assert any("cannot train a nf4 base" in c.value and "LoRA gets nf4 back" in c.value for c in at.caption)
    check_fine_tune_page(at, load_model("llama2-7b"))
    at.radio(key="ft_method").set_value("lora").run()
    assert at.session_state["ft_quant"] == "nf4"
    assert not any("cannot train" in c.value for c in at.caption)
    check_fine_tune_page(at, load_model("llama2-7b"))
    # A format picked while on full fine-tuning is the user's choice: kept on the way back.
    at.radio(key="ft_method").set_value("full").run()
    at.selectbox(key="ft_quant").set_value("fp16").run()
    at.radio(key="ft_method").set_value("lora").run()
    assert at.session_state["ft_quant"] == "fp16"


def test_fleet_storage_equals_memplan_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """The same question (llama2-7b, 100 variants, the page's rps and GPU) gives the same storage as `memplan plan`."""
    from memplan.cli import main

    at = start("fleet")
    s = at.session_state
    assert main(["plan", "--model", s["fleet_model"], "--variants", str(s["fleet_variants"]), "--gpu", s["fleet_gpu"],
                 "--rps", str(s["fleet_rps"]), "--format", "json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    storage = next(c for c in at.table[0].value.to_dict("records") if c[""] == "Storage")
    assert cli["strategies"]
    for name, strategy in cli["strategies"].items():
        column = next(c for c in storage if str(c).startswith(appdata.STRATEGY_TITLES[name]))
        assert storage[column] == format_bytes(strategy["storage_bytes"], decimal=True), name
