"""The CPU storage ledger against allocations whose sizes the test itself chooses."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")

from memplan.measure.profiler.ledger import CATEGORIES, StorageLedger  # noqa: E402


def test_counts_new_storages_once_and_releases_them() -> None:
    led = StorageLedger("cpu")
    with led:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        view = a[10:]  # same storage
        assert led.live_bytes == 4000
        b = a.clone()
        assert led.live_bytes == 8000
        del b
        gc.collect()
        assert led.live_bytes == 4000
        assert led.phase_peak_bytes == 8000
    del a, view
    gc.collect()
    assert led.live_bytes == 0  # freed after the mode exited too


def test_resize_and_foreign_storages() -> None:
    outside = torch.zeros(256, dtype=torch.int64)  # 2048 bytes, made before the mode
    raw = torch.frombuffer(bytearray(1024), dtype=torch.uint8)  # not a dispatcher op
    led = StorageLedger("cpu")
    with led:
        x = torch.empty(0)
        x.resize_(100)  # 400 bytes, same StorageImpl
        assert led.live_bytes == 400
        led.adopt([outside, outside[5:], raw, raw[:10]], "parameters")
        assert led.live_bytes == 400 + 2048 + 1024
        assert led.category_bytes("parameters") == 2048 + 1024
        with torch.device("meta"):
            torch.empty(10**6)  # meta tensors own no memory
        assert led.live_bytes == 400 + 2048 + 1024
    del x


def test_window_breakdown_classifies_activations_and_temporaries() -> None:
    led = StorageLedger("cpu")
    weight = torch.ones(64, 64)  # 16384 bytes
    with led:
        led.adopt([weight], "parameters")
        led.open_window()
        led.begin_phase("step2_forward")
        saved = torch.empty(500, dtype=torch.float32)  # kept for backward: 2000 bytes
        scratch = torch.empty(250, dtype=torch.float32)  # freed inside forward: 1000 bytes
        del scratch
        led.end_forward()
        led.begin_phase("step2_backward")
        grad = torch.empty(64, 64)  # 16384 bytes, tagged as a gradient afterwards
        led.adopt([grad], "gradients")
        led.close_window()
    assert led.window_peak_bytes == 16384 + 2000 + 16384
    breakdown = led.window_breakdown()
    assert set(breakdown) == set(CATEGORIES)
    assert breakdown == {"parameters": 16384, "gradients": 16384, "optimizer_state": 0, "activations": 2000, "temporaries": 0}
    assert sum(breakdown.values()) == led.window_peak_bytes
    del saved, grad
