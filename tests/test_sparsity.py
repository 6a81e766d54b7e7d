"""Tests for the sparsity terms: weighted L1, Lp, L0 and the JumpReLU L0 penalty."""

import inspect

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from helpers import randn
from peers import saelens_jumprelu_l0
from sae_losses import jumprelu_l0, l0_norm, l1_absolute, lp_sparsity

# The suite runs with the jaxtyping + beartype hook, which rejects bad shapes and dtypes before
# the body runs. The error-message tests call the bodies directly.
l1_unchecked = inspect.unwrap(l1_absolute)
lp_unchecked = inspect.unwrap(lp_sparsity)
l0_unchecked = inspect.unwrap(l0_norm)
jumprelu_unchecked = inspect.unwrap(jumprelu_l0)

REDUCE_MODES = ["none", "mean", "sum"]
SHAPES = [(5, 7), (4, 3, 6), (3, 2, 4, 5)]
DTYPE_TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}
OPS = ["l1", "l1_weighted", "lp", "lp_root", "l0", "jumprelu"]


# --- float64 references ---------------------------------------------------------------------------


def masked_reduce_reference(rows, reduce, mask):
    """``w * rows`` (exactly 0 where w = 0), its sum, or its sum over the sum of weights."""
    weights = torch.ones(rows.shape[0], dtype=torch.float64) if mask is None else mask.double()
    view = weights.reshape((-1,) + (1,) * (rows.ndim - 1))
    weighted = torch.where(view != 0, rows * view, 0)
    if reduce == "none":
        return weighted
    if reduce == "sum":
        return weighted.sum(0)
    return weighted.sum(0) / weights.sum()


def l1_rows(learned, weight=None):
    absolute = learned.double().abs()
    return (absolute if weight is None else absolute * weight.double()).sum(-1)


def lp_rows(learned, p, weight=None, root=False):
    scaled = learned.double() if weight is None else learned.double() * weight.double()
    total = scaled.abs().pow(p).sum(-1)
    return total.pow(1 / p) if root else total


def l0_rows(learned, threshold=0.0):
    return (learned.double().abs() > threshold).sum(-1).double()


def jumprelu_rows(pre, threshold):
    return (pre.double() > threshold.double()).sum(-1).double()


def op_and_reference(name, shape, dtype, seed):
    """``(call(reduce, mask), rows_reference)`` of one op on seeded inputs rounded to ``dtype``."""
    x = randn(*shape, dtype=dtype, seed=seed)
    weight = (randn(shape[-1], seed=seed + 1).abs() + 0.25).to(dtype)
    if name == "l1":
        return (lambda r, m: l1_absolute(x, reduce=r, mask=m)), l1_rows(x)
    if name == "l1_weighted":
        return (lambda r, m: l1_absolute(x, weight=weight, reduce=r, mask=m)), l1_rows(x, weight)
    if name == "lp":
        return (
            lambda r, m: lp_sparsity(x, p=0.5, weight=weight, reduce=r, mask=m),
            lp_rows(x, 0.5, weight),
        )
    if name == "lp_root":
        return (
            lambda r, m: lp_sparsity(x, p=3.0, weight=weight, root=True, reduce=r, mask=m),
            lp_rows(x, 3.0, weight, root=True),
        )
    if name == "l0":
        return (lambda r, m: l0_norm(x, threshold=0.5, reduce=r, mask=m)), l0_rows(x, 0.5)
    threshold = (randn(shape[-1], seed=seed + 2) * 0.5).to(dtype)
    return (
        lambda r, m: jumprelu_l0(x, threshold, bandwidth=0.1, reduce=r, mask=m),
        jumprelu_rows(x, threshold),
    )


def make_mask(kind, batch, dtype):
    if kind == "none":
        return None
    if kind == "bool":
        return torch.arange(batch) % 3 != 1  # drops row 1 (and 4), keeps at least 2 rows
    weights = torch.rand(batch, generator=torch.Generator().manual_seed(batch)) + 0.5
    weights[1] = 0.0
    return weights.to(dtype)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_matches_float64_reference(name, shape, reduce, dtype, mask_kind):
    call, rows = op_and_reference(name, shape, dtype, seed=len(shape))
    mask = make_mask(mask_kind, shape[0], dtype)
    result = call(reduce, mask)
    # Half inputs are compared with the float64 result on the same (rounded) inputs.
    expected = masked_reduce_reference(rows, reduce, mask)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.shape == expected.shape == (shape[:-1] if reduce == "none" else shape[1:-1])
    torch.testing.assert_close(result.double(), expected, rtol=DTYPE_TOLERANCES[dtype], atol=0)


def test_counts_are_exact_integers():
    # The two count ops return exact integers in float: compare with ==, not a tolerance.
    x = randn(6, 3, 40, seed=5)
    threshold = randn(40, seed=6)
    assert torch.equal(l0_norm(x, threshold=0.3, reduce="none").double(), l0_rows(x, 0.3))
    assert torch.equal(
        jumprelu_l0(x, threshold, bandwidth=0.1, reduce="none").double(),
        jumprelu_rows(x, threshold),
    )


# --- gradients ------------------------------------------------------------------------------------


def away_from_zero(*shape, seed):
    """float64 values with |z| >= 0.1, where |z| and |z|^p have finite differences."""
    z = randn(*shape, dtype=torch.float64, seed=seed)
    return ((z.abs() + 0.1) * z.sign()).requires_grad_()


def positive_weight(features, seed):
    return (randn(features, dtype=torch.float64, seed=seed).abs() + 0.5).requires_grad_()


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


# --- errors ---------------------------------------------------------------------------------------


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
        (
            lambda: lp_unchecked(torch.ones(2, 3), p=0.0),
            ValueError,
            r"`p` must be a positive float, got 0\.0\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 3), p=-1.0),
            ValueError,
            r"`p` must be a positive float, got -1\.0\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 3), p="2"),
            ValueError,
            r"`p` must be a positive float, got '2'\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 3), p=True),
            ValueError,
            r"`p` must be a positive float, got True\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 3), p=float("inf")),
            ValueError,
            r"`p` must be a positive float, got inf\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 3), p=float("nan")),
            ValueError,
            r"`p` must be a positive float, got nan\.",
        ),
        (
            lambda: lp_unchecked(torch.ones(2, 3), p=torch.tensor(2.0)),
            ValueError,
            r"`p` must be a positive float, got tensor\(2\.\)\.",
        ),
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


# --- saved for backward ---------------------------------------------------------------------------


def saved_op_calls(batch, features):
    learned = randn(batch, features, seed=50).requires_grad_()
    weight = (randn(features, seed=51).abs() + 0.5).requires_grad_()
    threshold = (randn(features, seed=52) * 0.2).requires_grad_()
    inputs = (learned, weight, threshold)
    return inputs, {
        "l1_weighted": lambda m: l1_absolute(learned, weight=weight, mask=m),
        "lp": lambda m: lp_sparsity(learned, p=0.5, weight=weight, mask=m),
        "lp_root": lambda m: lp_sparsity(learned, p=2.0, weight=weight, root=True, mask=m),
        "l0": lambda m: l0_norm(learned, threshold=0.1, mask=m),
        "jumprelu": lambda m: jumprelu_l0(learned, threshold, bandwidth=0.1, mask=m),
    }


@pytest.mark.parametrize("name", ["l1_weighted", "lp", "lp_root", "l0", "jumprelu"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_only_the_inputs_are_saved_for_backward(name, mask_kind):
    batch, features = 64, 32
    inputs, calls = saved_op_calls(batch, features)
    mask = make_mask(mask_kind, batch, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = calls[name](mask)
    big = [t for t in saved if t.numel() >= batch * features]
    allowed = {t.data_ptr() for t in inputs}
    assert all(t.data_ptr() in allowed for t in big), [tuple(t.shape) for t in big]
    if name == "l0":
        assert not loss.requires_grad
    else:
        assert big, "the row op keeps its input for backward"
        loss.backward()  # the hooks did not break the graph


# --- torch.compile --------------------------------------------------------------------------------


def sae_objective(learned, pre, w_dec_norm, threshold, mask):
    return (
        l1_absolute(learned, weight=w_dec_norm, mask=mask)
        + 0.1 * lp_sparsity(learned, p=0.5, weight=w_dec_norm, mask=mask)
        + 0.1 * lp_sparsity(learned, p=2.0, root=True, mask=mask)
        + 0.01 * l0_norm(learned, threshold=0.1, mask=mask)
        + jumprelu_l0(pre, threshold, bandwidth=0.5, mask=mask)
    )


@pytest.mark.compile
def test_compiled_objective_matches_eager_without_recompiling():
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(sae_objective, backend=counter, fullgraph=True)
    for batch in (2, 3, 5, 8, 13, 21):
        learned = randn(batch, 2, 6, seed=batch)
        pre = randn(batch, 2, 6, seed=batch + 100)
        w_dec_norm = randn(6, seed=1).abs() + 0.5
        threshold = randn(6, seed=2) * 0.3
        mask = torch.arange(batch) % 3 != 1
        mask[batch - 1] = False
        learned[batch - 1] = torch.nan  # a padded row
        pre[batch - 1] = torch.nan
        args = [t.clone().requires_grad_() for t in (learned, pre, w_dec_norm, threshold)]
        eager_args = [t.detach().clone().requires_grad_() for t in args]
        result = compiled(*args, mask)
        expected = sae_objective(*eager_args, mask)
        torch.testing.assert_close(result, expected)
        assert result.isfinite().all()
        result.sum().backward()
        expected.sum().backward()
        for a, e in zip(args, eager_args, strict=True):
            if e.grad is None:
                assert a.grad is None or not a.grad.any()
            else:
                torch.testing.assert_close(a.grad, e.grad)
                assert a.grad.isfinite().all()
    assert counter.frame_count <= 2
