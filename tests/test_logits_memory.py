"""The memory cross_entropy and kl_divergence use: vocabulary row blocks, peak bytes, saved tensors.

The blocks of a next-token view ``logits[:, :-1]`` are views, not copies; the peak memory of the
forward and of the backward is a few blocks, a tenth of the float32 form's at most; only the
inputs (and per-row vectors) are saved for backward; the benchmark's smoke run prints every
table.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

from helpers import SavedTensors
from logits_cases import draw, make_mask, targets_for
from sae_losses import _rowops, cross_entropy, kl_divergence
from sae_losses._logits import vocab_blocks

ROOT = Path(__file__).resolve().parent.parent


def test_blocks_of_next_token_views_are_views():
    logits = torch.randn(4, 9, 1000)
    view = logits[:, :-1]
    with pytest.raises(RuntimeError):
        view.view(-1, 1000)  # the leading axes do not merge
    base = logits.untyped_storage().data_ptr()
    seen = []
    for block, (x,) in vocab_blocks(view):
        assert x.untyped_storage().data_ptr() == base  # a view, not a copy
        assert torch.equal(x, view.flatten(0, 1)[block])
        seen.append(block)
    assert [s.start for s in seen] == [0, 8, 16, 24]
    assert seen[-1].stop == 32


def peak_bytes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("bench_logits").peak_bytes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", ["cross_entropy", "kl_divergence"])
def test_peak_memory_is_a_few_blocks(monkeypatch, dtype, op):
    # 512 x 4096 logits (8 MiB in float32) in blocks of 2^14 elements (64 KiB in float32). The
    # profiler's memory trace counts every allocation of torch's CPU allocator, deterministically.
    measure = peak_bytes()
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 1 << 14)
    rows, vocab = 512, 4096
    logits = draw((rows, vocab), dtype, seed=70)
    if op == "cross_entropy":
        other = targets_for(logits, seed=71)
        ours = lambda z: cross_entropy(z, other)  # noqa: E731
        peer = lambda z: F.cross_entropy(z.float(), other, reduction="none").mean()  # noqa: E731
    else:
        other = draw((rows, vocab), dtype, seed=71)
        ours = lambda z: kl_divergence(other, z)  # noqa: E731
        peer = lambda z: (  # noqa: E731
            F.kl_div(
                F.log_softmax(z.float(), -1),
                F.log_softmax(other.float(), -1),
                log_target=True,
                reduction="none",
            )
            .sum(-1)
            .mean()
        )

    def both(loss):
        def run():
            leaf = logits.detach().requires_grad_()
            return torch.autograd.grad(loss(leaf), leaf)

        return run

    block_bytes = 4 * (1 << 14)
    gradient = logits.numel() * logits.element_size()
    forward, forward_peer = measure(lambda: ours(logits)), measure(lambda: peer(logits))
    backward, backward_peer = measure(both(ours)) - gradient, measure(both(peer)) - gradient
    # A handful of float32 blocks and per-row vectors; the float32 form holds whole copies.
    assert forward <= 8 * block_bytes + 64 * rows, forward
    assert backward <= 8 * block_bytes + 64 * rows, backward
    assert forward <= 0.1 * forward_peer
    assert backward <= 0.1 * backward_peer


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_only_the_inputs_are_saved_for_backward(mask_kind):
    logits = draw((64, 3, 50), torch.float32, seed=80).requires_grad_()
    reference = draw((64, 3, 50), torch.float32, seed=81).requires_grad_()
    targets = targets_for(logits, seed=82)
    mask = None if mask_kind == "none" else make_mask(mask_kind, 64)
    with SavedTensors() as saved:
        loss = cross_entropy(logits, targets, mask=mask) + kl_divergence(
            reference, logits, mask=mask
        )
    assert not saved.beyond([logits, reference], min_numel=64 * 50)
    # Beyond the inputs: the targets (made safe under a mask: a new tensor) and the keep.
    assert saved.bytes_beyond([logits, reference]) <= 2 * 8 * 64 * 3 + 2 * 64
    loss.sum().backward()
    assert logits.grad is not None
    assert reference.grad is not None


# --- the benchmark --------------------------------------------------------------------------------


def test_benchmark_smoke_run_prints_every_table():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_logits.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for op in ("cross_entropy", "kl_divergence"):
        for dtype in ("bfloat16", "float32"):
            assert f"### {op}, 64 x 1000, {dtype}: peak memory beyond the inputs" in result.stdout
            for mode in ("forward", "forward + backward"):
                assert f"### {op}, 64 x 1000, {dtype}, {mode}: time" in result.stdout
    assert result.stdout.count("- memory, ours / ") == 8
    assert result.stdout.count("- time, ours / ") == 16
