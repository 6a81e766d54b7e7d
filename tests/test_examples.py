"""The demo, the evaluation example and the benchmark script run, and say what they should."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.compile  # each of them calls torch.compile


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_demo_trains_syncs_and_plots(tmp_path):
    run(
        "examples/demo.py",
        "--steps",
        "120",
        "--epochs",
        "3",
        "--batch-size",
        "128",
        "--out-dir",
        str(tmp_path),
    )
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    for name in ("eager", "compiled", "ddp"):
        total = summary[name]["history"]["total"]
        assert total[-1] < total[0], (name, total)
    ddp = summary["ddp"]
    assert ddp["eval_rows"] == 4 * 128
    for metric in ("l2", "l1", "total"):
        synced, single = ddp["synced_eval"][metric], ddp["one_process_eval"][metric]
        assert synced == pytest.approx(single, rel=1e-12, abs=0)
    plot = Path(summary["plot"])
    assert plot.stat().st_size > 10_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_options():
    result = subprocess.run(
        [sys.executable, "examples/demo.py", "--steps", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--steps: must be a positive integer, got 0" in result.stderr


def test_eval_loop_gives_the_same_metrics_on_one_and_two_processes():
    one = run("examples/eval_loop.py").strip()
    two = (
        run(
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "examples/eval_loop.py",
        )
        .strip()
        .splitlines()[-1]
    )
    assert one.startswith("world_size=1 rows=118 ")
    assert two == one.replace("world_size=1", "world_size=2")


def test_benchmark_smoke_run_prints_every_figure():
    output = run("benchmarks/bench.py", "--quick")
    for heading in (
        "L2 forward",
        "L1 forward",
        "L2 forward + backward",
        "L1 forward + backward",
        "Per-call overhead on 8x16",
        "Streaming mean",
        "Bytes saved for backward",
        "Goals",
    ):
        assert f"### {heading}" in output
    assert "| bytes saved beyond the inputs (eager, fused) | 0, 0 |" in output
