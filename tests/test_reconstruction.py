"""Tests for l2_reconstruction: the seed's published cases, dtypes, gradients and errors.

The float64 references across shapes, reduce modes, dtypes and masks are in test_terms.py, for
every term; the blocked eager path and what is saved for backward are in test_eager_path.py.
"""

import inspect

import pytest
import torch

from helpers import check_fp16_backward_in_float32, l2_reference, randn
from sae_losses import l1_absolute, l2_reconstruction

# The suite runs with the jaxtyping + beartype hook on, which rejects bad shapes and dtypes
# before the function body runs. The error-message tests call the body directly.
l2_unchecked = inspect.unwrap(l2_reconstruction)

REDUCE_MODES = ["none", "mean", "sum"]


# --- the seed library's published cases -----------------------------------------------------


def test_seed_l2_example():
    # sparse_autoencoder's L2ReconstructionLoss docstring: MSEs of 4 and 2, mean 3.
    source = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])
    decoded = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    torch.testing.assert_close(l2_reconstruction(decoded, source), torch.tensor([3.0]))
    torch.testing.assert_close(
        l2_reconstruction(decoded, source, reduce="none"), torch.tensor([[4.0], [2.0]])
    )


@pytest.mark.parametrize("num_components", [1, 2])
@pytest.mark.parametrize(
    ("fill_decoded", "fill_source", "expected"),
    [(0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (-1.0, 1.0, 4.0), (1.0, -1.0, 4.0)],
)
def test_seed_l2_constant_cases(num_components, fill_decoded, fill_source, expected):
    # Constant inputs: every squared error is (fill_decoded - fill_source)^2, so is every mean.
    decoded = torch.full((3, num_components, 5), fill_decoded)
    source = torch.full((3, num_components, 5), fill_source)
    torch.testing.assert_close(
        l2_reconstruction(decoded, source), torch.full((num_components,), expected)
    )


def test_seed_composed_sae_loss():
    # Zeros source and ones decoded give L2 = 1 per component; 4 learned features of 1 give
    # L1 = 4, so l2 + 0.01 * l1 = 1.04 for each of the 2 components.
    source = torch.zeros(2, 2, 2)
    decoded = torch.ones(2, 2, 2)
    learned = torch.ones(2, 2, 4)
    loss = l2_reconstruction(decoded, source) + 0.01 * l1_absolute(learned)
    torch.testing.assert_close(loss, torch.tensor([1.04, 1.04]))


# --- shapes and dtypes --------------------------------------------------------------------------


def test_result_shapes_follow_the_component_axes():
    x = torch.ones(8, 3, 2, 5)  # (batch, seq, component, feature)
    assert l2_reconstruction(x, x, reduce="none").shape == (8, 3, 2)
    assert l2_reconstruction(x, x).shape == (3, 2)
    assert l1_absolute(x, reduce="sum").shape == (3, 2)
    assert l1_absolute(x[:, 0, 0]).shape == ()


def test_mixed_dtypes_promote_then_accumulate_in_float32():
    decoded, source = randn(6, 9, dtype=torch.bfloat16, seed=4), randn(6, 9, seed=5)
    result = l2_reconstruction(decoded, source, reduce="none")
    assert result.dtype == torch.float32
    torch.testing.assert_close(
        result.double(), l2_reference(decoded, source, "none"), rtol=1e-5, atol=0
    )


def test_half_precision_differences_are_not_rounded_to_half():
    # 256 and 2^-8 are exact in bf16 but their difference is not (it needs 17 mantissa bits):
    # rounded to bf16 it would be 256 and the mean squared error 32768, not 255.99609375^2 / 2.
    decoded = torch.tensor([[256.0, 0.0]], dtype=torch.bfloat16)
    source = torch.tensor([[2.0**-8, 0.0]], dtype=torch.bfloat16)
    expected = (256.0 - 2.0**-8) ** 2 / 2
    assert l2_reconstruction(decoded, source).item() == pytest.approx(expected, rel=1e-7)


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4)])
def test_gradcheck(reduce, shape):
    decoded = randn(*shape, dtype=torch.float64, seed=12).requires_grad_()
    source = randn(*shape, dtype=torch.float64, seed=13).requires_grad_()
    mask = torch.tensor([1.5, 0.0, 0.5] + [1.0] * (shape[0] - 3), dtype=torch.float64)
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda d, s, m=m: l2_reconstruction(d, s, reduce=reduce, mask=m), (decoded, source)
        )
    assert torch.autograd.gradgradcheck(
        lambda d, s: l2_reconstruction(d, s, reduce=reduce), (decoded, source)
    )


def test_closed_form_gradients():
    decoded = torch.tensor([[1.0, 3.0], [0.0, -2.0]], requires_grad=True)
    source = torch.tensor([[0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    l2_reconstruction(decoded, source).backward()
    # d/dd mean_b mean_f (d - s)^2 = 2 (d - s) / (F B) = (d - s) / 2 here.
    torch.testing.assert_close(decoded.grad, torch.tensor([[0.5, 1.0], [0.0, -1.0]]))
    torch.testing.assert_close(source.grad, -decoded.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gradients_flow_back_in_the_input_dtype(dtype):
    decoded = randn(3, 4, dtype=dtype, seed=15).requires_grad_()
    source = randn(3, 4, dtype=dtype, seed=16).requires_grad_()
    (l2_reconstruction(decoded, source) + l1_absolute(decoded)).backward()
    assert decoded.grad.dtype == dtype
    assert source.grad.dtype == dtype
    expected = 2 * (decoded.double() - source.double()) / (4 * 3) + decoded.double().sign() / 3
    torch.testing.assert_close(decoded.grad.double(), expected, rtol=1e-2, atol=1e-2)


def test_fp16_backward_computes_in_float32():
    check_fp16_backward_in_float32(l2_reconstruction)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(2, 4)),
            ValueError,
            r"`decoded` and `source` must have the same shape, got \(2, 3\) and \(2, 4\)\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(1, 3)),
            ValueError,
            r"same shape, got \(2, 3\) and \(1, 3\)\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(3), torch.ones(3)),
            ValueError,
            r"`decoded` must have shape \(batch, \*component, feature\) "
            r"with at least 2 dimensions, got shape \(3,\)\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 0), torch.ones(2, 0)),
            ValueError,
            r"`decoded` has an empty feature axis: shape \(2, 0\)\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int64)),
            TypeError,
            r"`source` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: l2_unchecked([[1.0]], torch.ones(1, 1)),
            TypeError,
            r"`decoded` must be a torch\.Tensor, got list\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(2, 3), reduce=True),
            ValueError,
            r"`reduce` must be one of 'none', 'mean' or 'sum', got True\.",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
