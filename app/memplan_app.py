"""memplan's web app: `memplan app`, or `streamlit run app/memplan_app.py`.

A thin layer over the library: the pages read widgets, call `memplan` and draw.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="memplan", page_icon=":material/memory:", layout="wide")

# Widget values survive a page switch: re-assigning a key keeps Streamlit from
# dropping the state of widgets that the current page does not draw.
_PAGE_PREFIXES = ("ft_", "fleet_", "cal_", "rep_")
_NOT_SETTABLE = ("ft_upload", "fleet_prices", "rep_download")
for _key in list(st.session_state.keys()):
    if isinstance(_key, str) and _key.startswith(_PAGE_PREFIXES) and _key not in _NOT_SETTABLE:
        st.session_state[_key] = st.session_state[_key]

# Metric values at a size that fits three cards side by side.
st.html("<style>[data-testid='stMetricValue'] { font-size: 1.75rem; }</style>")

pages = [
    st.Page("views/fine_tune.py", title="Fine-tune", icon=":material/tune:", default=True),
    st.Page("views/fleet.py", title="Fleet and cost", icon=":material/payments:"),
    st.Page("views/calibration.py", title="Calibration", icon=":material/query_stats:"),
    st.Page("views/report.py", title="Report", icon=":material/table_view:"),
]
st.navigation(pages, position="top").run()
