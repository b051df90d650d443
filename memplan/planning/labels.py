"""Words, option lists and defaults that the CLI and the web app both show, kept in one place.

The option lists come from the library's own tuples (`QUANTS`, `OPTIMIZERS`, ...), the
defaults from `Setup`'s and `PlanInputs`' fields, so a new choice or a changed default reaches
`--help`, the renderers and the app's widgets at once.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, Iterable

from memplan.serving.fleet import PlanInputs
from memplan.training.clusters import LAYOUT_NAMES, layout_text  # noqa: F401  (the words live beside the search)
from memplan.training.setup import Setup

__all__ = ["PART_LABELS", "PLAN_DEFAULTS", "SETUP_DEFAULTS", "LAYOUT_NAMES", "choices_text", "fit_verdict", "layout_text"]

# The peak's parts: `Estimate.peak_parts` keys, in the order the app stacks them and
# `memplan estimate` lists them.
PART_LABELS: dict[str, str] = {
    "weights": "weights",
    "adapters": "LoRA adapters",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "master_weights": "fp32 master shard",
    "comm_buffers": "comm buckets",
    "gathered": "gathered params/grads",
    "activations": "activations",
    "logits": "logits + loss",
    "transients": "transients",
    "overhead": "device overhead",
}

# `memplan estimate`/`fit`'s flag defaults and the fine-tune page's starting values: `Setup`'s own
# (tests/app/test_app.py checks that the CLI's flags and the page start from these).
SETUP_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Setup) if f.default is not MISSING}
# Setup's None means PEFT's default: off unless prepare_kbit_training (also off by default).
SETUP_DEFAULTS["grad_checkpointing"] = bool(SETUP_DEFAULTS["prepare_kbit_training"])

# `memplan plan`'s flag defaults and the fleet page's starting values: `PlanInputs`' own.
PLAN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(PlanInputs) if f.default is not MISSING}


def choices_text(choices: Iterable[str], sep: str = " | ") -> str:
    """A list of choices as help text: `bf16 | fp16 | fp32` (or `bf16, fp16, fp32` with sep=", ")."""
    return sep.join(choices)


def fit_verdict(fits: bool) -> str:
    """The words for a fit, as `memplan fit` and the app's headroom card say them."""
    return "fits" if fits else "does not fit"

