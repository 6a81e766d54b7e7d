"""Tests for the counts: l0_norm and jumprelu_l0 (an exact count forward, a straight-through
threshold gradient backward).

The float64 references across shapes, reduce modes, dtypes and masks are in test_terms.py, for
every term. Here: exact integer counts, the strict thresholds, gradients worked by hand, the
SAELens transcription, and the error messages.
"""

import inspect

import pytest
import torch

from helpers import randn
from peers import saelens_jumprelu_l0
from sae_losses import jumprelu_l0, l0_norm

# The suite runs with the jaxtyping + beartype hook, which rejects bad shapes and dtypes before
# the body runs. The error-message tests call the bodies directly.
l0_unchecked = inspect.unwrap(l0_norm)
jumprelu_unchecked = inspect.unwrap(jumprelu_l0)

REDUCE_MODES = ["none", "mean", "sum"]


def l0_rows(learned, threshold=0.0):
    return (learned.double().abs() > threshold).sum(-1).double()


def jumprelu_rows(pre, threshold):
    return (pre.double() > threshold.double()).sum(-1).double()


def test_counts_are_exact_integers():
    # The two count ops return exact integers in float: compare with ==, not a tolerance.
    x = randn(6, 3, 40, seed=5)
    threshold = randn(40, seed=6)
    assert torch.equal(l0_norm(x, threshold=0.3, reduce="none").double(), l0_rows(x, 0.3))
    assert torch.equal(
        jumprelu_l0(x, threshold, bandwidth=0.1, reduce="none").double(),
        jumprelu_rows(x, threshold),
    )


# --- l0_norm --------------------------------------------------------------------------------------


def test_l0_counts_and_threshold_is_strict():
    learned = torch.tensor(
        [[0.0, 0.5, -2.0, 0.25], [0.0, 0.0, 0.0, -0.0], [-0.5, 0.5, 0.75, 1.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(
        l0_norm(learned, reduce="none"), torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)
    )
    # |z| > 0.5, strictly: 0.5 and -0.5 are not counted.
    torch.testing.assert_close(
        l0_norm(learned, threshold=0.5, reduce="none"),
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64),
    )
    assert l0_norm(learned, threshold=0.5, reduce="sum").item() == 3.0
    assert l0_norm(learned, threshold=2.0, reduce="sum").item() == 0.0  # |-2| is not > 2
    # The annotation says float (the import hook rejects an int); the body takes an int too.
    assert l0_unchecked(learned, threshold=1, reduce="sum").item() == 1.0


@pytest.mark.parametrize(
    ("dtype", "value", "threshold"),
    [
        (torch.bfloat16, 0.30078125, 0.3),  # 0.3 rounds UP to 0.30078125 in bfloat16
        (torch.float32, 0.10000000149011612, 0.1),  # float32(0.1) is just above 0.1
        (torch.float16, 0.0999755859375, 0.09997),  # float16(0.09997) rounds up to the value
    ],
)
def test_l0_threshold_is_not_rounded_to_the_input_dtype(dtype, value, threshold):
    # The documented count is #{f : |z_f| > threshold} with a Python-float threshold. The value
    # is exactly representable in `dtype` and strictly above the threshold, so it counts.
    learned = torch.tensor([[value, -value, 0.0]], dtype=dtype)
    assert learned.double().abs()[0, 0].item() > threshold
    assert l0_norm(learned, threshold=threshold, reduce="sum").item() == 2.0


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_l0_has_no_gradient_and_the_accumulation_dtype(dtype, expected):
    learned = randn(5, 2, 6, dtype=dtype, seed=30).requires_grad_()
    for reduce in REDUCE_MODES:
        for mask in (None, torch.tensor([True, False, True, True, False])):
            result = l0_norm(learned, reduce=reduce, mask=mask)
            assert result.dtype == expected
            assert not result.requires_grad
            assert result.grad_fn is None
    weights = torch.ones(5, requires_grad=True)
    assert not l0_norm(learned, mask=weights).requires_grad


# --- jumprelu_l0 ----------------------------------------------------------------------------------

# A small case worked by hand. bandwidth eps = 0.2, so the window is |pre - theta| < 0.1.
#                 feature:  f0     f1     f2     f3
JUMP_THRESHOLD = [1.0, 1.0, 2.0, 0.4]
JUMP_PRE = [
    [0.95, 1.25, 2.05, 0.10],  # |pre - theta| = .05 .25 .05 .30: in  out in  out; above: f1 f2
    [1.02, 1.60, 1.93, 0.45],  # |pre - theta| = .02 .60 .07 .05: in  out in  in;  above: f0 f1 f3
    [0.70, 1.08, 2.50, 0.35],  # |pre - theta| = .30 .08 .50 .05: out in  out in;  above: f1 f2
]
# Counts per row: 2, 3, 2.  In-window rows per feature: f0 {0, 1}, f1 {2}, f2 {0, 1}, f3 {1, 2}.


def jump_inputs():
    pre = torch.tensor(JUMP_PRE, dtype=torch.float64, requires_grad=True)
    threshold = torch.tensor(JUMP_THRESHOLD, dtype=torch.float64, requires_grad=True)
    return pre, threshold


@pytest.mark.parametrize(
    ("reduce", "mask", "value", "grad"),
    [
        # g_row = 1: -(1/0.2) * (number of in-window rows) = -5 * (2, 1, 2, 2).
        ("sum", None, 7.0, [-10.0, -5.0, -10.0, -10.0]),
        # g_row = 1/3: -5 * (2, 1, 2, 2) / 3.
        ("mean", None, 7.0 / 3, [-10.0 / 3, -5.0 / 3, -10.0 / 3, -10.0 / 3]),
        # Rows 0 and 2 kept, g_row = (1/2, 0, 1/2): f0 {0} -> -5/2, f1 {2} -> -5/2,
        # f2 {0} -> -5/2, f3 {2} -> -5/2; value (2 + 2) / 2.
        ("mean", [True, False, True], 2.0, [-2.5, -2.5, -2.5, -2.5]),
        # Row weights g_row = (2, 0, 1): f0 -5 * 2 = -10, f1 -5 * 1 = -5, f2 -5 * 2 = -10,
        # f3 -5 * (0 + 1) = -5; value 2 * 2 + 0 * 3 + 1 * 2 = 6.
        ("sum", [2.0, 0.0, 1.0], 6.0, [-10.0, -5.0, -10.0, -5.0]),
        # Mean with those weights: g_row = (2, 0, 1) / 3; value 6 / 3.
        ("mean", [2.0, 0.0, 1.0], 2.0, [-10.0 / 3, -5.0 / 3, -10.0 / 3, -5.0 / 3]),
    ],
)
def test_jumprelu_threshold_gradient_by_hand(reduce, mask, value, grad):
    pre, threshold = jump_inputs()
    if mask is not None:
        mask = torch.tensor(mask, dtype=torch.bool if isinstance(mask[0], bool) else torch.float64)
    result = jumprelu_l0(pre, threshold, bandwidth=0.2, reduce=reduce, mask=mask)
    assert result.item() == pytest.approx(value, rel=1e-15)
    result.backward()
    torch.testing.assert_close(threshold.grad, torch.tensor(grad, dtype=torch.float64))
    assert pre.grad is None or not pre.grad.any()  # no gradient to the pre-activations


def test_jumprelu_threshold_gradient_by_hand_three_dimensional():
    # (batch=2, component=2, feature=2), theta = (0, 1), eps = 0.5: window |pre - theta| < 0.25.
    pre = torch.tensor(
        [
            [[0.10, 0.90], [-0.20, 1.50]],  # (0,0): in, in; above f0.   (0,1): in, out; above f1.
            [[0.60, 1.20], [0.05, 0.80]],  # (1,0): out, in; above both. (1,1): in, in; above f0.
        ],
        dtype=torch.float64,
    )
    threshold = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    counts = jumprelu_l0(pre, threshold, bandwidth=0.5, reduce="sum")
    # Per component, summed over the batch: c0 = 1 + 2 = 3, c1 = 1 + 1 = 2.
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0], dtype=torch.float64))
    (counts * torch.tensor([1.0, 3.0], dtype=torch.float64)).sum().backward()
    # g = 1 for component 0 rows, 3 for component 1 rows. f0 in-window: (0,0) g1, (0,1) g3,
    # (1,1) g3 -> -(1/0.5) * 7 = -14. f1 in-window: (0,0) g1, (1,0) g1, (1,1) g3 -> -2 * 5 = -10.
    torch.testing.assert_close(threshold.grad, torch.tensor([-14.0, -10.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 5), (3, 2, 4, 5)])
def test_jumprelu_forward_is_the_exact_count_and_any_rank_works(shape):
    pre = randn(*shape, dtype=torch.float32, seed=40).requires_grad_()
    threshold = (randn(shape[-1], seed=41) * 0.3).requires_grad_()
    rows = jumprelu_l0(pre, threshold, bandwidth=0.5, reduce="none")
    assert rows.shape == shape[:-1]
    assert torch.equal(rows.double(), jumprelu_rows(pre, threshold))
    rows.sum().backward()
    # Flattening the leading axes into rows gives the same threshold gradient.
    flat_threshold = threshold.detach().clone().requires_grad_()
    jumprelu_l0(pre.detach().flatten(0, -2), flat_threshold, bandwidth=0.5, reduce="sum").backward()
    torch.testing.assert_close(threshold.grad, flat_threshold.grad)
    window = ((pre.detach() - threshold.detach()).abs() < 0.25).flatten(0, -2).sum(0)
    torch.testing.assert_close(threshold.grad, -window.float() / 0.5)
    assert pre.grad is None or not pre.grad.any()


def test_jumprelu_matches_saelens_step():
    # tests/peers.py transcribes SAELens's Step (decoderesearch/SAELens,
    # sae_lens/saes/jumprelu_sae.py): mean over rows of the count, rectangle-kernel gradient.
    pre, threshold = jump_inputs()
    peer_threshold = threshold.detach().clone().requires_grad_()
    ours = jumprelu_l0(pre, threshold, bandwidth=0.2)
    peer = saelens_jumprelu_l0(pre.detach(), peer_threshold, 0.2)
    torch.testing.assert_close(ours, peer)
    ours.backward()
    peer.backward()
    torch.testing.assert_close(threshold.grad, peer_threshold.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_jumprelu_threshold_gradient_dtype(dtype):
    pre = randn(6, 8, dtype=dtype, seed=42)
    threshold = (randn(8, seed=43) * 0.2).to(dtype).requires_grad_()
    result = jumprelu_l0(pre, threshold, bandwidth=0.5)
    assert result.dtype == torch.float32
    result.backward()
    assert threshold.grad.dtype == dtype
    window = ((pre.double() - threshold.detach().double()).abs() < 0.25).sum(0)
    assert window.any()
    # -(1/eps) * (in-window rows) / B, computed in float32 and rounded to the threshold's dtype.
    torch.testing.assert_close(threshold.grad, (-window.double() / 0.5 / 6).to(dtype))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: jumprelu_unchecked(torch.ones(2, 3), torch.ones(3), bandwidth=0.0),
            ValueError,
            r"`bandwidth` must be a positive float, got 0\.0\.",
        ),
        (
            lambda: jumprelu_unchecked(torch.ones(2, 3), torch.ones(3), bandwidth=-0.1),
            ValueError,
            r"`bandwidth` must be a positive float, got -0\.1\.",
        ),
        (
            lambda: jumprelu_unchecked(torch.ones(2, 3), torch.ones(3), bandwidth=None),
            ValueError,
            r"`bandwidth` must be a positive float, got None\.",
        ),
        (
            lambda: l0_unchecked(torch.ones(2, 3), threshold=-0.1),
            ValueError,
            r"`threshold` must be a non-negative float, got -0\.1\.",
        ),
        (
            lambda: l0_unchecked(torch.ones(2, 3), threshold=True),
            ValueError,
            r"`threshold` must be a non-negative float, got True\.",
        ),
        (
            lambda: l0_unchecked(torch.ones(2, 3), threshold=torch.tensor(0.5)),
            ValueError,
            r"`threshold` must be a non-negative float",
        ),
        (
            lambda: jumprelu_unchecked(torch.ones(2, 3), torch.ones(4), bandwidth=0.1),
            ValueError,
            r"`threshold` must have shape \(feature,\) = \(3,\), got \(4,\)\.",
        ),
        (
            lambda: jumprelu_unchecked(torch.ones(2, 5, 3), torch.ones(5, 3), bandwidth=0.1),
            ValueError,
            r"`threshold` must have shape \(feature,\) = \(3,\), got \(5, 3\)\.",
        ),
        (
            lambda: jumprelu_unchecked(
                torch.ones(2, 3), torch.ones(3, dtype=torch.int32), bandwidth=0.1
            ),
            TypeError,
            r"`threshold` must be a floating-point tensor, got dtype torch\.int32\.",
        ),
        (
            lambda: jumprelu_unchecked(torch.ones(3), torch.ones(3), bandwidth=0.1),
            ValueError,
            r"`pre_activations` must have shape \(batch, \*component, feature\)",
        ),
        (
            lambda: jumprelu_unchecked(
                torch.ones(2, 3, dtype=torch.int64), torch.ones(3), bandwidth=0.1
            ),
            TypeError,
            r"`pre_activations` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: l0_unchecked(torch.ones(2, 3), reduce="max"),
            ValueError,
            r"`reduce` must be one of 'none', 'mean' or 'sum', got 'max'\.",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
