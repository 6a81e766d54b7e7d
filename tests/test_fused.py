"""Tests for the inductor-generated fused ops: same contract as the eager ones."""

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import l1_reference, l2_reference, randn
from sae_losses import fused_l1_absolute, fused_l2_reconstruction, l1_absolute, l2_reconstruction

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduce", ["none", "mean", "sum"])
def test_fused_matches_float64_reference(dtype, reduce):
    decoded, source = randn(6, 3, 10, dtype=dtype, seed=1), randn(6, 3, 10, dtype=dtype, seed=2)
    result_l2 = fused_l2_reconstruction(decoded, source, reduce=reduce)
    result_l1 = fused_l1_absolute(decoded, reduce=reduce)
    assert result_l2.dtype == result_l1.dtype == l2_reconstruction(decoded, source).dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(
        result_l2.double(), l2_reference(decoded, source, reduce), rtol=rtol, atol=0
    )
    torch.testing.assert_close(result_l1.double(), l1_reference(decoded, reduce), rtol=rtol, atol=0)


def test_fused_gradients_match_eager_and_save_only_inputs():
    decoded = randn(8, 2, 16, seed=3).requires_grad_()
    source = randn(8, 2, 16, seed=4)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_l2_reconstruction(decoded, source).sum() + fused_l1_absolute(decoded).sum()
    big = [t for t in saved if t.numel() >= decoded.numel()]
    assert big, "the compiled backward keeps its inputs"
    assert all(t.data_ptr() in {decoded.data_ptr(), source.data_ptr()} for t in big)
    (fused_grad,) = torch.autograd.grad(loss, decoded)
    eager = l2_reconstruction(decoded, source).sum() + l1_absolute(decoded).sum()
    (eager_grad,) = torch.autograd.grad(eager, decoded)
    torch.testing.assert_close(fused_grad, eager_grad)


def test_fused_errors_are_the_eager_errors():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(2, 4\)\."):
        fused_l2_reconstruction(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(TypeError, match=r"`learned` must be a floating-point tensor"):
        fused_l1_absolute(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"`reduce` must be one of"):
        fused_l1_absolute(torch.ones(2, 3), reduce="max")


def test_fused_reuses_its_kernel_across_batch_sizes():
    torch._dynamo.reset()
    counters.clear()
    for batch in (2, 3, 5, 8, 13, 21):
        decoded, source = randn(batch, 12, seed=batch), randn(batch, 12, seed=batch + 1)
        torch.testing.assert_close(
            fused_l2_reconstruction(decoded, source), l2_reconstruction(decoded, source)
        )
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
