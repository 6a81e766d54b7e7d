"""benchmarks/gpu_check.py says "no CUDA device" without one; on the CPU every op row passes.

The script runs as a subprocess, as the lead runs it on a GPU machine. ``--device cpu --quick``
runs the correctness section (and the code of the other sections) on small CPU inputs; it calls
the fused functions, which compile, so these tests run in the pass without the runtime type check.
"""

import contextlib
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sae_losses

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.compile


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def table_rows(stdout: str) -> list[list[str]]:
    """The markdown table's body rows, as lists of cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert lines, stdout
    assert lines[0] == "| section | check | dtype | measured | bound | result |"
    return [line[2:-2].split(" | ") for line in lines[1:]]


def load_script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_flag_it_exits_0_and_says_there_is_no_cuda_device():
    # On a GPU machine the run without a flag is the full check (minutes): run its quick form.
    result = run_script(*(["--quick"] if torch.cuda.is_available() else []))
    assert result.returncode == 0, result.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no CUDA device" in result.stdout
        assert "| section |" not in result.stdout


def test_on_the_cpu_every_op_row_passes_and_every_public_callable_is_covered():
    result = run_script("--device", "cpu", "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not covered" not in result.stdout
    rows = table_rows(result.stdout)
    assert all(len(row) == 6 for row in rows), rows
    assert not [row for row in rows if row[5] == "FAIL"], result.stdout

    correctness = [row for row in rows if row[0] == "correctness"]
    assert all(row[5] == "PASS" for row in correctness), result.stdout
    checked = {(row[1], row[2]) for row in correctness}
    for op in load_script().OPS:
        assert {(op.name, "float32"), (op.name, "bfloat16")} <= checked, op.name

    coverage = [row for row in rows if row[0] == "coverage"]
    assert [row[5] for row in coverage] == ["PASS"]
    sync = [row for row in rows if row[0] == "host sync"]
    assert sync
    assert all(row[5] == "n/a" for row in sync)
    step = [row for row in rows if row[0] == "training step"]
    assert [row[5] for row in step] == ["n/a"], step  # it ran; the sync check needs CUDA
    assert "loss" in step[0][3]
    assert [row for row in rows if row[0] == "bandwidth" and "floor" in row[3]]
    assert "0 FAIL" in result.stdout


def test_a_public_callable_without_a_row_is_a_visible_warning():
    script = load_script()
    assert [row.result for row in script.coverage_rows(list(sae_losses.__all__))] == ["PASS"]
    grown = types.SimpleNamespace(
        **{name: getattr(sae_losses, name) for name in sae_losses.__all__}
    )
    grown.future_term = lambda *args: None
    rows = script.coverage_rows([*sae_losses.__all__, "future_term"], grown)
    assert [(row.check, row.result) for row in rows] == [("not covered: future_term", "WARN")]
    assert "not covered: future_term" in rows[0].markdown()


def test_a_failing_or_wrong_op_is_a_fail_row_not_a_crash():
    script = load_script()
    base = {"z": torch.randn(4, 3, dtype=torch.float64)}

    def broken(t):
        raise RuntimeError("boom")

    wrong = script.Op(
        "wrong",
        ("x",),
        make=None,
        call=lambda t: t["z"].abs().sum(-1).mean(0) * 1.01,
        grad=("z",),
        formula=lambda t: t["z"].abs().sum(-1).mean(0),
    )
    raising = script.Op("raising", ("x",), make=None, call=broken)
    cpu = torch.device("cpu")
    row, rerun = script.check_op(wrong, base, torch.float32, cpu)
    assert row.result == "FAIL"
    assert rerun is not None
    assert row.measured.count("/ 1.0e-02") == 2  # forward and backward, against the formula
    row, rerun = script.check_op(raising, base, torch.float32, cpu)
    assert (row.result, rerun) == ("FAIL", None)
    assert row.measured.startswith("RuntimeError: boom at ")


def test_a_host_sync_is_a_fail_row_that_names_the_op_and_the_line(monkeypatch):
    # The CUDA branch, with the sync debug mode's error raised by hand (there is no GPU here).
    script = load_script()
    monkeypatch.setattr(script, "sync_debug_error", lambda device: contextlib.nullcontext())
    cuda = types.SimpleNamespace(type="cuda")
    op = script.Op("some_loss", ("x",), make=None, call=None, grad=("z",))

    def syncs():
        raise RuntimeError("called a synchronizing CUDA operation")

    row = script.host_sync_row(op, {"float32": syncs, "bfloat16": lambda: None}, cuda)
    assert (row.section, row.check, row.dtype, row.result) == (
        "host sync",
        "some_loss",
        "float32, bfloat16",
        "FAIL",
    )
    assert row.measured.startswith("float32: synced: RuntimeError: called a synchronizing")
    assert "(syncs)" in row.measured
    row = script.host_sync_row(op, {"float32": lambda: None}, cuda)
    assert (row.measured, row.result) == ("fwd+bwd: no host sync", "PASS")
