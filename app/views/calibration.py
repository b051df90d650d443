"""Calibration: the estimator against measured runs (the shipped profiles/ plus ./profiles/), per device kind."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from components.charts import calibration_chart
from components.guard import shown_errors
from components.inputs import init
from memplan.planning import appdata
from memplan.measure.records import read_records, record_files
from memplan.model.storage import QUANTS

COMPONENT_LABELS = {
    "peak": "peak (allocated)", "device_peak": "peak on the device (NVML)", "weights": "weights", "adapters": "adapters",
    "gradients": "gradients", "optimizer_states": "optimizer states", "activations": "activations",
}


@st.cache_data(max_entries=8, show_spinner="Re-estimating every profile record ...")
def _load(files: tuple[str, ...], stamps: tuple[float, ...]) -> tuple[list[dict], list[dict], dict | None]:
    """Records, their predicted-vs-measured rows and the CUDA calibration; `stamps` (mtimes) key the cache."""
    records = read_records([Path(f) for f in files])
    return records, appdata.comparison_rows(records), appdata.calibration_summary(records)


st.title("Calibration: predicted vs measured")
folders = appdata.profiles_folders()
folder = " + ".join(map(str, folders)) or "the shipped profiles or ./profiles/"
st.caption(appdata.profiles_caption(folders))

with shown_errors():
    files = tuple(str(f) for f in record_files(folders))
    records, rows, cuda = _load(files, tuple(Path(f).stat().st_mtime for f in files))

if not records:
    st.info(f"No profile records in {folder} yet, so there is nothing to compare: no GPU profiles and no CPU ones. "
            "Measure runs with `memplan profile`; each run appends one line to a .jsonl file there.", icon=":material/info:")
    st.stop()
if cuda is None:
    st.info("No GPU profiles yet: these records hold fewer than two successful CUDA runs, so the CUDA device terms "
            "(context, workspace, allocator slack) are not calibrated and GPU estimates leave them out. "
            "Measure runs on a GPU with `memplan profile --device cuda`, then run `memplan calibrate`.",
            icon=":material/info:")
else:
    st.subheader("CUDA device terms fitted by `memplan calibrate`")
    for col, (label, value) in zip(st.columns(len(cuda)), cuda.items()):
        col.metric(label, value)

if not rows:
    st.warning(f"No successful runs with measurements in {folder} ({len(records)} record(s) read).")
    st.stop()

kinds = sorted({r["kind"] for r in rows}, key=lambda k: (not k.startswith("cuda"), k))  # GPUs first
st.caption(f"{len(records)} record(s) from {len(files)} file(s); device kinds present: {', '.join(kinds)}.")
left, right = st.columns(2)
init("cal_kind", kinds[0], kinds)
kind = left.selectbox("Device kind", kinds, key="cal_kind")
components = [c for c in COMPONENT_LABELS if any(r["kind"] == kind and r["component"] == c for r in rows)]
init("cal_component", "peak" if "peak" in components else components[0], components)
component = right.selectbox("Component", components, key="cal_component", format_func=COMPONENT_LABELS.get)

points = appdata.calibration_points(rows, kind=kind, component=component)
st.plotly_chart(calibration_chart(points, quants=[q for q in QUANTS if any(p["quant"] == q for p in points)]),
                key="cal_scatter", config={"displayModeBar": False})
st.caption("Colour: the base weights' format. Error = (predicted - measured) / measured. GiB = 2³⁰ bytes.")
for col, (label, value) in zip(st.columns(4), appdata.error_stats(points).items()):
    col.metric(label, value)
st.caption("Over every record of this kind, against the estimator as shipped (its device terms in data/device_terms.json); "
           "the held-out errors above are `memplan calibrate`'s, on the records it did not fit.")
st.subheader("Worst cases")
st.dataframe(appdata.worst_rows(points), hide_index=True, key="cal_worst")
