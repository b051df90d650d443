"""memplan.training.sharding: a layout's per-phase tables are read through one chain of stand-in
phases (`SAME_AS`), so that a moment estimate.py tells apart and a layout does not takes the figure of
the nearest phase the layout's table has. The values below are the tables' own entries (no formula is
under test): which entry a phase reads is."""

from __future__ import annotations

from memplan.training.sharding import SAME_AS, LayoutTerms, same_as


def _terms(inflight: dict[str, int], grads: dict[str, int] | None = None) -> LayoutTerms:
    return LayoutTerms(memory=None, gradients=lambda g: 1000 + g, inflight=inflight,  # type: ignore[arg-type]
                       phase_buffers=dict(inflight), phase_gradients=grads or {})


def test_a_phase_takes_its_own_entry_first() -> None:
    t = _terms({"forward_layers": 3, "forward": 5})
    assert t.inflight_in("forward_layers") == 3
    assert t.inflight_in("forward") == 5


def test_a_missing_phase_follows_the_chain_to_the_nearest_entry() -> None:
    # FSDP tables name the layer moments; ZeRO's name only the coarse phases.
    fsdp = _terms({"forward_layers": 3, "forward": 5, "backward_layer_norm": 7, "backward_layers": 11})
    zero = _terms({"forward": 5, "backward_layers": 11})
    assert (fsdp.inflight_in("forward_mlp"), zero.inflight_in("forward_mlp")) == (3, 5)
    assert (fsdp.inflight_in("backward_attention"), zero.inflight_in("backward_attention")) == (7, 11)
    assert (fsdp.buffers_in("backward_attention"), zero.buffers_in("backward_attention")) == (7, 11)


def test_a_phase_no_entry_stands_for_holds_nothing_and_its_gradients_come_from_the_rule() -> None:
    t = _terms({"forward": 5})
    assert t.inflight_in("backward_end") == 0
    assert t.inflight_in("backward_recompute") == 0  # -> backward_layers, absent, ends the chain
    assert t.gradients_in("backward_layer_end", 24) == 1024
    assert _terms({}, {"backward_layers": 9}).gradients_in("backward_layer_end", 24) == 9


def test_the_chain_ends() -> None:
    for phase in SAME_AS:
        seen, at = set(), phase
        while at in SAME_AS:
            assert at not in seen, f"SAME_AS loops at {at}"
            seen.add(at)
            at = SAME_AS[at]
        assert same_as(phase, ()) == phase  # (after the loop check: a loop would hang it)
