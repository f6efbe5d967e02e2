"""The benchmark harness: a --quick run end to end, and its statistics on known numbers."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # bench/ is a folder of the checkout, not an installed package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.bench_conv2d import PROBE_DENSE, make_case  # noqa: E402
from bench.harness import COLUMNS, Provider, TimingPlan, run_case  # noqa: E402
from bench.report import SUMMARY_COLUMNS, summarize  # noqa: E402
from bench.stats import geomean, median, percentile  # noqa: E402


def test_percentiles_interpolate_between_ranks_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # order must not matter
    assert median(values) == 3.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert percentile(values, 20) == pytest.approx(1.8)  # position 0.8 between 1 and 2
    assert percentile(values, 80) == pytest.approx(4.2)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile([7.0], 20) == 7.0


def test_geomean_of_ratios():
    assert geomean([2.0, 0.5]) == pytest.approx(1.0)
    assert geomean([1.0, 4.0, 16.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        geomean([1.0, 0.0])


def test_summary_leaves_wrong_rows_and_the_reference_out_of_the_geomean():
    base = {"op": "conv2d", "set": "s", "batch": 1, "dtype": "float32", "provider": "p"}
    rows = [
        {**base, "speedup": 2.0, "correct": "yes"},
        {**base, "speedup": 8.0, "correct": "yes"},
        {**base, "speedup": 100.0, "correct": "NO"},
        {**base, "speedup": None, "correct": "error"},
        {**base, "provider": "torch", "speedup": 1.0, "correct": "yes", "reference": True},
    ]
    (summary,) = summarize(rows)
    assert summary["cases"] == 4 and summary["not correct"] == 2
    assert summary["geomean speedup"] == pytest.approx(4.0)


def test_a_fast_wrong_provider_is_marked_not_correct():
    case = make_case("probe", PROBE_DENSE, 1, torch.float32, torch.device("cpu"), (), False)
    case.providers = (
        Provider("torch", lambda x, w: F.conv2d(x, w, None, 1, 1)),
        Provider("off-by-a-bit", lambda x, w: F.conv2d(x, w, None, 1, 1) * 1.001),
        Provider("broken", lambda x, w: x.new_zeros(1)[2]),
    )
    rows = {r["provider"]: r for r in run_case(case, TimingPlan(budget_s=0.01, min_samples=5))}
    assert rows["torch"]["correct"] == "yes" and rows["torch"]["samples"] >= 5
    assert rows["off-by-a-bit"]["correct"] == "NO" and rows["off-by-a-bit"]["speedup"] > 0
    assert rows["broken"]["correct"] == "error" and "IndexError" in rows["broken"]["error_message"]


def run_quick_bench(tmp_path, *extra, op="conv2d"):
    """`python -m bench --quick` on the CPU into tmp_path; returns the finished process."""
    command = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--op", op]
    run = subprocess.run(
        [*command, *extra, "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a busy 2-core machine: the quick model run takes 5 s when idle
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_quick_run_writes_md_and_csv_with_every_row_correct(tmp_path):
    run = run_quick_bench(tmp_path)
    (csv_path,) = tmp_path.glob("*-quick.csv")
    (md_path,) = tmp_path.glob("*-quick.md")

    lines = csv_path.read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    for key in ("device", "threads", "torch", "cnnops", "git commit", "date", "command"):
        assert any(line.startswith(f"# {key}: ") for line in header), key
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert rows and tuple(rows[0]) == COLUMNS
    assert {row["provider"] for row in rows} >= {"torch", "cpu-im2col", "cpu-auto", "cpu-direct"}
    assert all(row["correct"] == "yes" for row in rows), [r for r in rows if r["correct"] != "yes"]
    for row in rows:
        assert float(row["median_ms"]) > 0 and float(row["p20_ms"]) <= float(row["p80_ms"])
        assert int(row["samples"]) >= 3 and math.isfinite(float(row["speedup"]))
    assert all(float(row["speedup"]) == 1.0 for row in rows if row["provider"] == "torch")

    md = md_path.read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    assert "| " + " | ".join(SUMMARY_COLUMNS) + " |" in md
    assert "git commit:" in md and "threads:" in md
    # Progress lines go to stderr, one per case.
    assert "[1/" in run.stderr


def test_quick_backward_run_checks_and_times_both_gradients(tmp_path):
    run_quick_bench(tmp_path, "--backward", "--set", "resnext50_grouped")
    (csv_path,) = tmp_path.glob("*-quick-backward.csv")
    lines = csv_path.read_text().splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert {row["op"] for row in rows} == {"conv2d fwd+bwd"}
    assert {row["provider"] for row in rows} >= {"torch", "cpu-im2col", "cpu-auto", "cpu-direct"}
    assert all(row["correct"] == "yes" for row in rows), [r for r in rows if r["correct"] != "yes"]


def test_quick_models_run_checks_swapped_models_against_float64(tmp_path):
    """The whole-model cases: a swapped MobileNetV2 and, under patch_torchvision, a Faster R-CNN,
    each checked against the unswapped model in float64 and timed against it."""
    run_quick_bench(tmp_path, op="models")
    (csv_path,) = tmp_path.glob("*-quick.csv")
    lines = csv_path.read_text().splitlines()
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert {(row["layer"], row["provider"]) for row in rows} == {
        (model, provider)
        for model in ("mobilenet_v2", "fasterrcnn_mobilenet_v3_large_320_fpn")
        for provider in ("torch", "cnnops-cpu")
    }
    assert all(row["correct"] == "yes" for row in rows), [r for r in rows if r["correct"] != "yes"]
    assert all(math.isfinite(float(row["speedup"])) for row in rows)
