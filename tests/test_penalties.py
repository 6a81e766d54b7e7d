"""Tests for the penalties: l1_absolute (weighted or not) and lp_sparsity (rooted or not).

The float64 references across shapes, reduce modes, dtypes and masks are in test_terms.py, for
every term. Here: the seed's cases, gradients (gradcheck in float64, the values at 0 by hand),
the identities between the two, and the error messages.
"""

import inspect

import pytest
import torch

from helpers import randn
from sae_losses import l1_absolute, lp_sparsity

# The suite runs with the jaxtyping + beartype hook, which rejects bad shapes and dtypes before
# the body runs. The error-message tests call the bodies directly.
l1_unchecked = inspect.unwrap(l1_absolute)
lp_unchecked = inspect.unwrap(lp_sparsity)

REDUCE_MODES = ["none", "mean", "sum"]


# --- the seed library's published cases -----------------------------------------------------


def test_seed_l1_example():
    # sparse_autoencoder's L1AbsoluteLoss docstring: L1 of 2 and 1, mean 1.5.
    learned = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
    torch.testing.assert_close(l1_absolute(learned), torch.tensor([1.5]))


@pytest.mark.parametrize("num_components", [1, 2])
@pytest.mark.parametrize(("fill", "expected"), [(0.0, 0.0), (1.0, 4.0), (-1.0, 4.0)])
def test_seed_l1_constant_cases(num_components, fill, expected):
    # 4 features of |fill| each: the per-row sum is 4 |fill|, and so is the mean over rows.
    learned = torch.full((3, num_components, 4), fill)
    torch.testing.assert_close(l1_absolute(learned), torch.full((num_components,), expected))


# --- gradients ------------------------------------------------------------------------------------


def away_from_zero(*shape, seed):
    """float64 values with |z| >= 0.1, where |z| and |z|^p have finite differences."""
    z = randn(*shape, dtype=torch.float64, seed=seed)
    return ((z.abs() + 0.1) * z.sign()).requires_grad_()


def positive_weight(features, seed):
    return (randn(features, dtype=torch.float64, seed=seed).abs() + 0.5).requires_grad_()


@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4)])
def test_gradcheck_l1(reduce, shape):
    learned = away_from_zero(*shape, seed=14)
    assert torch.autograd.gradcheck(lambda z: l1_absolute(z, reduce=reduce), (learned,))


@pytest.mark.parametrize("reduce", REDUCE_MODES)
def test_gradcheck_weighted_l1(reduce):
    learned, weight = away_from_zero(3, 2, 4, seed=10), positive_weight(4, seed=11)
    mask = torch.tensor([1.5, 0.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z, w: l1_absolute(z, weight=w, reduce=reduce), (learned, weight)
    )
    assert torch.autograd.gradcheck(
        lambda z, w: l1_absolute(z, weight=w, reduce=reduce, mask=mask), (learned, weight)
    )
    assert torch.autograd.gradgradcheck(
        lambda z, w: l1_absolute(z, weight=w, reduce=reduce), (learned, weight)
    )


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("root", [False, True])
def test_gradcheck_lp(p, root):
    learned, weight = away_from_zero(3, 2, 4, seed=12), positive_weight(4, seed=13)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda z, w: lp_sparsity(z, p=p, weight=w, root=root, reduce="sum"), (learned, weight)
    )
    assert torch.autograd.gradcheck(
        lambda z, w: lp_sparsity(z, p=p, weight=w, root=root, reduce="mean", mask=mask),
        (learned, weight),
    )
    assert torch.autograd.gradcheck(
        lambda z: lp_sparsity(z, p=p, root=root, reduce="none"), (learned,)
    )


def test_l1_closed_form_gradient_is_zero_at_zero():
    learned = torch.tensor([[2.0, 0.0, -3.0]], requires_grad=True)
    l1_absolute(learned, reduce="sum").backward()
    torch.testing.assert_close(learned.grad, torch.tensor([[1.0, 0.0, -1.0]]))  # 0 at z = 0


def test_l1_gradient_at_zero_and_weight_gradient_closed_form():
    learned = torch.tensor([[2.0, 0.0, -3.0], [0.0, -1.0, 0.5]], requires_grad=True)
    weight = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    l1_absolute(learned, weight=weight, reduce="mean").backward()
    # d/dz = sign(z) w / B with B = 2, and 0 at z = 0.
    torch.testing.assert_close(
        learned.grad, torch.tensor([[0.5, 0.0, -2.0], [0.0, -1.0, 2.0]]), rtol=0, atol=0
    )
    # d/dw_f = sum_b g_b |z_bf| with g_b = 1/2: (2 + 0)/2, (0 + 1)/2, (3 + 0.5)/2.
    torch.testing.assert_close(weight.grad, torch.tensor([1.0, 0.5, 1.75]), rtol=0, atol=0)


def test_lp_gradient_is_zero_at_zero_for_p_below_one():
    learned = torch.tensor([[0.0, 1.0, -4.0]], dtype=torch.float64, requires_grad=True)
    lp_sparsity(learned, p=0.5, reduce="sum").backward()
    # d/dz |z|^0.5 = 0.5 |z|^-0.5 sign(z): 0.5 at 1, -0.5 / 2 = -0.25 at -4; the naive formula
    # gives inf at 0 (0.5 * 0^-0.5), and 0 is what the subgradient convention picks.
    torch.testing.assert_close(learned.grad, torch.tensor([[0.0, 0.5, -0.25]], dtype=torch.float64))
    naive = learned.detach().clone().requires_grad_()
    naive.abs().pow(0.5).sum().backward()
    assert not naive.grad.isfinite().all()  # what the op avoids


def test_lp_root_gradient_is_zero_on_an_all_zero_row():
    learned = torch.tensor([[0.0, 0.0, 0.0], [3.0, -4.0, 0.0]], requires_grad=True)
    weight = torch.tensor([1.0, 1.0, 2.0], requires_grad=True)
    lp_sparsity(learned, p=2.0, weight=weight, root=True, reduce="sum").backward()
    # Row 1: ||w z|| = 5 and d/dz = w^2 z / 5 = (0.6, -0.8, 0); row 0 is all zeros: gradient 0
    # (the chain rule through s^(1/2) at s = 0 would give inf * 0 = NaN).
    torch.testing.assert_close(learned.grad, torch.tensor([[0.0, 0.0, 0.0], [0.6, -0.8, 0.0]]))
    # d/dw_f = w_f z_f^2 / 5 summed over rows: (9/5, 16/5, 0).
    torch.testing.assert_close(weight.grad, torch.tensor([1.8, 3.2, 0.0]))


@pytest.mark.parametrize("p", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("root", [False, True])
def test_lp_gradient_at_zero_with_weight_is_finite_and_zero(p, root):
    learned = torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([3.0, 0.5], dtype=torch.float64, requires_grad=True)
    lp_sparsity(learned, p=p, weight=weight, root=root, reduce="sum").backward()
    assert learned.grad[:, 0].eq(0).all()
    assert learned.grad[1].eq(0).all()
    assert weight.grad[0] == 0  # no row has z_0 != 0
    assert learned.grad.isfinite().all()
    assert weight.grad.isfinite().all()


# --- identities -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduce", REDUCE_MODES)
def test_lp_with_p_one_equals_l1(dtype, reduce):
    learned, weight = randn(6, 2, 9, dtype=dtype, seed=20), randn(9, dtype=dtype, seed=21).abs()
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for w in (None, weight):
        torch.testing.assert_close(
            lp_sparsity(learned, p=1.0, weight=w, reduce=reduce),
            l1_absolute(learned, weight=w, reduce=reduce),
            rtol=rtol,
            atol=0,
        )


def test_lp_root_two_is_the_euclidean_norm_of_the_weighted_row():
    learned, weight = randn(6, 2, 9, dtype=torch.float64, seed=22), randn(9, seed=23).double()
    torch.testing.assert_close(
        lp_sparsity(learned, p=2.0, weight=weight, root=True, reduce="none"),
        torch.linalg.vector_norm(learned * weight, dim=-1),
        rtol=1e-12,
        atol=0,
    )


def test_lp_integer_p_is_accepted_as_a_float():
    # The annotation says float (the import hook rejects an int); the body takes any real number.
    learned = randn(4, 5, dtype=torch.float64, seed=24)
    torch.testing.assert_close(lp_unchecked(learned, p=2), lp_sparsity(learned, p=2.0))


# --- errors ---------------------------------------------------------------------------------------


def bad_p(p):
    return lambda: lp_unchecked(torch.ones(2, 3), p=p)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: l1_unchecked(torch.ones(2, 7), weight=torch.ones(6)),
            ValueError,
            r"`weight` must have shape \(feature,\) = \(7,\), got \(6,\)\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 7), weight=torch.ones(1, 7)),
            ValueError,
            r"`weight` must have shape \(feature,\) = \(7,\), got \(1, 7\)\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3, 7), weight=torch.ones(3, 7)),
            ValueError,
            r"`weight` must have shape \(feature,\) = \(7,\), got \(3, 7\)\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 7), p=2.0, weight=torch.ones(2, 7)),
            ValueError,
            r"`weight` must have shape \(feature,\) = \(7,\), got \(2, 7\)\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3), weight=torch.ones(3, dtype=torch.int64)),
            TypeError,
            r"`weight` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 3), p=1.0, weight=torch.ones(3, dtype=torch.bool)),
            TypeError,
            r"`weight` must be a floating-point tensor, got dtype torch\.bool\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3), weight=[1.0, 1.0, 1.0]),
            TypeError,
            r"`weight` must be a torch\.Tensor, got list\.",
        ),
        (bad_p(0.0), ValueError, r"`p` must be a positive float, got 0\.0\."),
        (bad_p(-1.0), ValueError, r"`p` must be a positive float, got -1\.0\."),
        (bad_p("2"), ValueError, r"`p` must be a positive float, got '2'\."),
        (bad_p(True), ValueError, r"`p` must be a positive float, got True\."),
        (bad_p(float("inf")), ValueError, r"`p` must be a positive float, got inf\."),
        (bad_p(float("nan")), ValueError, r"`p` must be a positive float, got nan\."),
        (
            bad_p(torch.tensor(2.0)),
            ValueError,
            r"`p` must be a positive float, got tensor\(2\.\)\.",
        ),
        (
            lambda: l1_unchecked(torch.tensor(1.0)),
            ValueError,
            r"`learned` must have shape .*\(\)\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 0)),
            ValueError,
            r"`learned` has an empty feature axis",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3, dtype=torch.bool)),
            TypeError,
            r"`learned` must be a floating-point tensor, got dtype torch\.bool\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3, dtype=torch.complex64)),
            TypeError,
            r"got dtype torch\.complex64\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3), reduce="batchmean"),
            ValueError,
            r"`reduce` must be one of 'none', 'mean' or 'sum', got 'batchmean'\.",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
