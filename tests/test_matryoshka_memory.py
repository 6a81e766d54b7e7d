"""What matryoshka_l2 saves for backward, and the benchmark's smoke run.

Whatever the number of widths, the inputs and at most two ``(batch, d_model)`` residuals
(float32 for bfloat16 inputs); the benchmark prints its time and peak-memory figures against
the bound and the peers.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SavedTensors
from matryoshka_cases import call, inputs

ROOT = Path(__file__).resolve().parent.parent


# --- what is saved for backward ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "residuals"),
    [([96], 1), ([8, 24, 48, 96], 2), (list(range(8, 97, 8)), 2), ([4, 40], 2)],
)
@pytest.mark.parametrize("mask", [None, "bool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_the_inputs_and_at_most_two_residuals(widths, residuals, mask, dtype):
    batch, d_sae, d_model = 64, 96, 16
    tensors = inputs(batch, d_sae, d_model, dtype=dtype)
    mask = None if mask is None else torch.arange(batch) % 2 == 0
    with SavedTensors() as saved:
        call(*tensors, widths, mask=mask)
    beyond = saved.beyond(tensors, min_numel=2 * batch)
    # Whatever G: one or two (batch, d_model) residuals, accumulated in float32 for bfloat16.
    assert [tuple(t.shape) for t in beyond] == [(batch, d_model)] * residuals
    assert all(t.dtype == torch.float32 for t in beyond)
    # Beyond them, only the mean's 0-d denominator and its test (the mask is an input too).
    given = tensors if mask is None else [*tensors, mask]
    assert saved.bytes_beyond(given) <= residuals * batch * d_model * 4 + 8


# --- the benchmark script ------------------------------------------------------------------------


def test_benchmark_smoke_run_prints_every_figure():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_matryoshka.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("time against bound", "time against SAELens", "time against dictionary_learning"):
        assert f"- {line}" in result.stdout
    assert result.stdout.count("- peak memory against") == 3
