"""`memplan fit` through `memplan.cli.main`: one GPU, the fewest GPUs of a type, the cheapest cluster.

The command is a thin layer (flags -> `fit_answer` -> `render_fit`): its JSON must be what the
library's cluster search returns, and a layout the library refuses ends as one line, exit 2.
"""

from __future__ import annotations

import json

import pytest

from memplan.cli import main
from memplan.hardware.gpus import gpu_catalog
from memplan.planning.labels import layout_text
from memplan.training.clusters import best_cluster, cheapest_clusters, cluster_price, fewest_gpus
from memplan.training.estimate import estimate
from memplan.training.setup import Setup

FULL_70B = ["fit", "--model", "llama2-70b", "--method", "full"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_fewest_h100s_for_a_70b_full_fine_tune_under_zero3_and_fsdp(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *FULL_70B, "--gpu", "h100", "--format", "json")
    assert status == 0, err
    d = json.loads(out)
    rows = {(r["parallel"], r["fsdp_version"]): r for r in d["clusters"]["layouts"]}
    h100 = gpu_catalog().get("h100")
    for parallel, version in (("zero3", None), ("fsdp", 1), ("fsdp", 2)):
        r = rows[(parallel, version)]
        assert isinstance(r["gpus"], int) and r["gpus"] > 1 and r["gpu"] == "h100"
        # The per-GPU peak the command reports is estimate()'s at that count and layout, and it fits.
        s = Setup(model="llama2-70b", method="full", gpus=r["gpus"], parallel=parallel, fsdp_version=version or 1)
        assert r["peak_bytes_per_gpu"] == estimate(s).memory.peak <= h100.usable_bytes
    expected = fewest_gpus(Setup(model="llama2-70b", method="full"), h100)
    assert [r["gpus"] for r in d["clusters"]["layouts"]] == [f.fewest["h100"].gpus if "h100" in f.fewest else None for f in expected]


def test_the_table_names_each_layout_and_its_count(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *FULL_70B, "--gpu", "h100")
    assert status == 0 and "not modelled)" not in out
    lines = out.splitlines()
    for f in fewest_gpus(Setup(model="llama2-70b", method="full"), gpu_catalog().get("h100")):
        row = next(line for line in lines if line.startswith("  " + layout_text(f.parallel, f.fsdp_version) + " "))
        if "h100" in f.fewest:
            assert f"{f.fewest['h100'].gpus} x h100" in row
    assert any(line.startswith("  largest batch size per GPU (seq 512): ") for line in lines)


def test_the_cheapest_cluster_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *FULL_70B, "--format", "json")
    assert status == 0, err
    d = json.loads(out)
    assert d["clusters"]["gpu"] is None and d["clusters"]["ranked_by"] == "usd_per_hour"
    expected = cheapest_clusters(Setup(model="llama2-70b", method="full"), gpu_catalog().gpus)
    top = best_cluster(expected[0], cluster_price)
    first = d["clusters"]["layouts"][0]
    assert (first["gpu"], first["gpus"], first["parallel"]) == (top.gpu.key, top.gpus, top.setup.parallel)
    assert first["usd_per_hour"] == pytest.approx(top.gpus * gpu_catalog().get(top.gpu.key).usd_per_hour)
    status, text, _ = run(capsys, *FULL_70B)
    assert status == 0 and "cheapest cluster per layout" in text and f"{top.gpus} x {top.gpu.key}" in text


def test_the_single_gpu_answer_keeps_working(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "fit", "--model", "llama2-7b", "--quant", "nf4", "--gpu", "a10g")
    assert status == 0, err
    assert out.startswith("smallest GPU that fits: ")
    assert "  largest batch size (seq 512): " in out and "  highest LoRA rank: " in out
    assert "per layout" not in out  # one A10G holds it: no cluster search


def test_a_given_layout_and_node_size(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *FULL_70B, "--gpu", "h100", "--parallel", "zero3", "--gpus-per-node", "4", "--format", "json")
    assert status == 0, err
    rows = json.loads(out)["clusters"]["layouts"]
    assert [r["parallel"] for r in rows] == ["zero3"]
    assert rows[0]["gpus"] % 4 == 0 and rows[0]["gpus_per_node"] == 4


@pytest.mark.parametrize(("args", "fragment"), [
    (["--quant", "nf4", "--parallel", "fsdp"], "--quant-storage bf16"),  # uint8 cannot be flattened
    (["--quant", "nf4", "--parallel", "zero3", "--quant-storage", "fp16"], "must equal --compute-dtype bf16"),
    (["--gpus", "2"], "needs a layout"),
])
def test_a_layout_the_library_refuses_is_one_line(capsys: pytest.CaptureFixture[str], args: list[str], fragment: str) -> None:
    status, out, err = run(capsys, "fit", "--model", "llama2-70b", "--gpu", "h100", *args)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err
