"""tanh_sparsity: float64 references, the right derivative at 0, gradcheck, checks.

The mask, torch.func, DTensor, compile and saved-bytes contracts come from its entry in
tests/terms.py.
"""

import inspect
import math

import pytest
import torch

from helpers import randn
from sae_losses import l1_absolute, tanh_sparsity

# The runtime type check (conftest.py) would reject the bad arguments first: call past it.
UNCHECKED = inspect.unwrap(tanh_sparsity)
REDUCE = {"none": lambda r: r, "mean": lambda r: r.mean(0), "sum": lambda r: r.sum(0)}


def reference(learned, scale, weight=None):
    """Per row, in float64: sum over features of tanh(scale * w * |z|)."""
    w = 1.0 if weight is None else weight.double()
    return torch.tanh(scale * w * learned.double().abs()).sum(-1)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 6)])
@pytest.mark.parametrize("reduce", list(REDUCE))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_values_match_the_float64_reference(shape, reduce, weighted, dtype, rtol):
    learned = randn(*shape, dtype=dtype, seed=1)
    weight = randn(shape[-1], dtype=dtype, seed=2).abs() if weighted else None
    found = tanh_sparsity(learned, scale=4.0, weight=weight, reduce=reduce)
    expected = REDUCE[reduce](reference(learned, 4.0, weight))
    assert found.dtype == dtype
    torch.testing.assert_close(found, expected.to(dtype), rtol=rtol, atol=rtol)


def test_half_precision_accumulates_in_float32():
    learned = randn(64, 512, dtype=torch.bfloat16, seed=3)
    found = tanh_sparsity(learned, scale=4.0, reduce="sum")
    assert found.dtype == torch.float32
    torch.testing.assert_close(found.double(), reference(learned, 4.0).sum(), rtol=1e-6, atol=0)


def test_gradient_at_zero_is_the_right_derivative_scale_times_weight():
    # Worked by hand: d/dz tanh(s w |z|) at z = 0+ is s w; L1's is 0 there.
    z = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    tanh_sparsity(z, scale=4.0, weight=weight, reduce="sum").backward()
    assert torch.equal(z.grad, torch.tensor([[4.0, 8.0, 2.0]] * 2, dtype=torch.float64))
    assert torch.equal(weight.grad, torch.zeros(3, dtype=torch.float64))  # s |z| (1 - t^2) = 0
    l1_grad = torch.autograd.grad(l1_absolute(z, reduce="sum"), z)[0]
    assert not l1_grad.any()


def test_gradient_away_from_zero_by_hand():
    z = torch.tensor([[0.5, -0.25]], dtype=torch.float64, requires_grad=True)
    tanh_sparsity(z, scale=4.0, reduce="sum").backward()
    expected = [4 * (1 - math.tanh(2.0) ** 2), -4 * (1 - math.tanh(1.0) ** 2)]
    torch.testing.assert_close(z.grad, torch.tensor([expected], dtype=torch.float64))


def test_gradcheck_in_float64_away_from_zero():
    learned = randn(4, 2, 5, dtype=torch.float64, seed=4)
    learned = (learned + learned.sign() * 0.1).requires_grad_()
    weight = (randn(5, dtype=torch.float64, seed=5).abs() + 0.1).requires_grad_()
    for reduce in REDUCE:
        assert torch.autograd.gradcheck(
            lambda z, w, r=reduce: tanh_sparsity(z, scale=1.5, weight=w, reduce=r),
            (learned, weight),
        )


def test_jumprelu_threshold_gradient_reaches_through_the_derivative_at_zero():
    # A latent switched off by the threshold (z = 0) still tells the threshold its cost: the
    # straight-through product d(penalty)/dz * dz/d(threshold) is s w times the STE factor.
    pre = torch.tensor([[0.9, 1.2]], dtype=torch.float64)
    threshold = torch.ones(2, dtype=torch.float64, requires_grad=True)
    gate = (pre > threshold).to(pre) + threshold - threshold.detach()  # a toy STE: d/dθ = 1
    tanh_sparsity(pre * gate, scale=4.0, reduce="sum").backward()
    assert threshold.grad[0] == pytest.approx(0.9 * 4.0)  # z = 0 there: the right derivative


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), True, "4", 10**400])
def test_scale_must_be_a_positive_number(scale):
    with pytest.raises(ValueError, match="`scale` must be a positive float"):
        UNCHECKED(torch.ones(2, 3), scale=scale)


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match=r"`weight` must have shape \(feature,\) = \(3,\)"):
        UNCHECKED(torch.ones(2, 3), scale=4.0, weight=torch.ones(4))
