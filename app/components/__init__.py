"""Streamlit building blocks shared by the pages: guards, inputs and charts (no formulas)."""
