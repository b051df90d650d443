"""Capacity planning over many setups: grids, sweeps, the HTML report, text renderers and the app's rows."""
