"""Show a `MemplanError` as one red line and stop the page: never a traceback."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from memplan.errors import MemplanError


@contextmanager
def shown_errors() -> Iterator[None]:
    try:
        yield
    except MemplanError as exc:
        st.error(str(exc), icon=":material/error:")
        st.stop()

