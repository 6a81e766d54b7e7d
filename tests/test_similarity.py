"""Tests for cosine_similarity and l2_norm_ratio: float64 references, the zero-row rules,
magnitudes where the naive formulas overflow or underflow, the algebra (scale laws), gradcheck,
NaN-safe masks, the blocked eager path, saved bytes and compile."""

import inspect

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter

from helpers import RowBlocksSpy, SavedTensors, blocked_rows, masked_reduce, randn
from sae_losses import StreamingMean, cosine_similarity, l2_norm_ratio


def cosine_reference(decoded, source):
    """Float64 per-row cosine, the textbook formula (inputs of moderate magnitude only)."""
    d, s = decoded.double(), source.double()
    return (d * s).sum(-1) / (d.norm(dim=-1) * s.norm(dim=-1))


def ratio_reference(decoded, source):
    d, s = decoded.double(), source.double()
    return d.norm(dim=-1) / s.norm(dim=-1)


TERMS = {"cosine_similarity": (cosine_similarity, cosine_reference)}
TERMS["l2_norm_ratio"] = (l2_norm_ratio, ratio_reference)
each_term = pytest.mark.parametrize(("term", "reference"), TERMS.values(), ids=TERMS)


MASKS = {
    "none": lambda batch: None,
    "bool": lambda batch: torch.arange(batch) % 3 != 1,
    "float": lambda batch: (0.5 + torch.arange(batch)) * (torch.arange(batch) % 3 != 1),
}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


@each_term
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 6), (1, 1)])
@pytest.mark.parametrize("reduce", ["none", "mean", "sum"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_matches_the_float64_reference(term, reference, shape, reduce, mask_kind, dtype):
    decoded, source = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    mask = MASKS[mask_kind](shape[0])
    result = term(decoded, source, reduce=reduce, mask=mask)
    expected = masked_reduce(reference(decoded, source), reduce, mask)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(result.double(), expected, rtol=TOLERANCE[dtype], atol=1e-7)


def test_hand_worked_values():
    # cos: (1,0)·(2,0) = 2 over 1·2; (3,4)·(4,-3) = 0; (1,1)·(1,-1) = 0; (1,2)·(2,4) = 10/(√5·√20).
    source = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    decoded = torch.tensor([[2.0, 0.0], [4.0, -3.0], [1.0, -1.0], [2.0, 4.0]], dtype=torch.float64)
    assert cosine_similarity(decoded, source, reduce="none").tolist() == [1.0, 0.0, 0.0, 1.0]
    # ratio: 2/1, 5/5, √2/√2, √20/√5 = 2
    assert l2_norm_ratio(decoded, source, reduce="none").tolist() == [2.0, 1.0, 1.0, 2.0]


def test_zero_rows():
    zero, one = torch.zeros(1, 3), torch.ones(1, 3)
    rows = [(zero, one), (one, zero), (zero, zero)]  # (decoded, source)
    cosines = [cosine_similarity(d, s).item() for d, s in rows]
    ratios = [l2_norm_ratio(d, s).item() for d, s in rows]
    assert all(c != c for c in cosines)  # NaN: no angle
    assert ratios[0] == 0.0
    assert ratios[1] == float("inf")
    assert ratios[2] != ratios[2]  # 0 / 0


@pytest.mark.parametrize(
    ("dtype", "magnitude"),
    [
        (torch.float32, 1e20),  # squares overflow float32
        (torch.float32, 1e-25),  # squares underflow float32
        (torch.float32, 1e-40),  # subnormal inputs
        (torch.float64, 1e200),
        (torch.float64, 1e-200),
        (torch.float16, 6e4),  # near float16's largest
        (torch.bfloat16, 1e38),  # squares overflow bfloat16's float32 accumulation
    ],
)
def test_exact_at_any_magnitude(dtype, magnitude):
    # Where the textbook formula returns 0, NaN or inf, these equal the float64 value of the same
    # rows rescaled to magnitude 1 (both terms are invariant to, or homogeneous in, the scale).
    unit_d, unit_s = (randn(4, 9, dtype=torch.float64, seed=i) for i in (3, 4))
    unit_d, unit_s = unit_d / unit_d.abs().amax(), unit_s / unit_s.abs().amax()  # largest is 1
    decoded, source = (magnitude * unit_d).to(dtype), (magnitude * unit_s).to(dtype)
    back_d, back_s = decoded.double() / magnitude, source.double() / magnitude
    cos = cosine_similarity(decoded, source, reduce="none").double()
    torch.testing.assert_close(cos, cosine_reference(back_d, back_s), rtol=1e-5, atol=1e-6)
    ratio = l2_norm_ratio(decoded, source, reduce="none").double()
    torch.testing.assert_close(ratio, ratio_reference(back_d, back_s), rtol=1e-5, atol=0)
    if dtype == torch.float32 and magnitude == 1e20:  # what the naive formula gives
        assert torch.nn.functional.cosine_similarity(decoded, decoded, dim=-1).eq(0).all()


# Rows of moderate magnitude, with a few exact zeros, and positive row scales.
row = st.lists(st.floats(-100, 100).map(lambda v: 0.0 if abs(v) < 1 else v), min_size=3, max_size=3)
rows = st.lists(row, min_size=1, max_size=6).map(lambda r: torch.tensor(r, dtype=torch.float64))
scales = st.floats(1e-30, 1e30)


@settings(max_examples=60, deadline=None)
@given(d=rows, s=rows, a=scales, b=scales)
def test_scale_laws_and_symmetry(d, s, a, b):
    n = min(len(d), len(s))
    d, s = d[:n], s[:n]
    cos = cosine_similarity(d, s, reduce="none")
    # cos(a x̂, b x) = cos(x̂, x), cos is symmetric and within [-1, 1] to rounding.
    torch.testing.assert_close(cosine_similarity(a * d, b * s, reduce="none"), cos, equal_nan=True)
    torch.testing.assert_close(cosine_similarity(s, d, reduce="none"), cos, equal_nan=True)
    assert (cos[~cos.isnan()].abs() <= 1 + 1e-15).all()
    # ‖a x̂‖ / ‖b x‖ = (a / b) ‖x̂‖ / ‖x‖, and the ratio of the swapped rows is the reciprocal.
    ratio = l2_norm_ratio(d, s, reduce="none")
    torch.testing.assert_close(
        l2_norm_ratio(a * d, b * s, reduce="none"), ratio * (a / b), equal_nan=True
    )
    torch.testing.assert_close(l2_norm_ratio(s, d, reduce="none"), 1 / ratio, equal_nan=True)


@each_term
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4)])
def test_gradcheck_both_inputs(term, reference, shape):
    decoded = randn(*shape, dtype=torch.float64, seed=4).requires_grad_()
    source = randn(*shape, dtype=torch.float64, seed=5).requires_grad_()
    mask = torch.tensor([True, False, True] + [True] * (shape[0] - 3))
    assert torch.autograd.gradcheck(lambda d, s: term(d, s, reduce="none"), (decoded, source))
    assert torch.autograd.gradcheck(lambda d, s: term(d, s, mask=mask), (decoded, source))
    assert torch.autograd.gradgradcheck(lambda d, s: term(d, s, reduce="sum"), (decoded, source))


@each_term
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_rows_are_inert_even_when_nan(term, reference, mask_kind):
    decoded = randn(6, 5, dtype=torch.float64, seed=6)
    source = randn(6, 5, dtype=torch.float64, seed=7)
    mask = MASKS[mask_kind](6)  # drops rows 1 and 4
    keep = mask if mask.dtype == torch.bool else mask != 0
    bad_d, bad_s = decoded.clone(), source.clone()
    bad_d[1], bad_s[1] = torch.nan, torch.inf
    bad_d[4], bad_s[4] = 0.0, 0.0  # a zero row: NaN if it were kept
    leaves = [t.requires_grad_() for t in (bad_d, bad_s)]
    value = term(*leaves, mask=mask, reduce="sum")
    value.backward()
    clean = [t[keep].requires_grad_() for t in (decoded, source)]
    expected = term(*clean, mask=mask[keep], reduce="sum")
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    for leaf, kept in zip(leaves, clean, strict=True):
        assert leaf.grad[~keep].eq(0).all()
        torch.testing.assert_close(leaf.grad[keep], kept.grad, rtol=1e-12, atol=1e-15)


@each_term
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("blocked", [False, True], ids=["one call", "blocked"])
def test_eager_gradients_match_the_float64_reference(
    term, reference, dtype, tolerance, blocked, monkeypatch
):
    # The hand-written float64 gradients of float32 and half inputs, in one call or in row
    # blocks, against autograd through the textbook formula in float64 on the same values.
    if blocked:
        monkeypatch.setattr("sae_losses._rowops.BLOCK_ELEMENTS", 48)  # 2 rows of (3, 8) a block
    decoded, source = (randn(40, 3, 8, dtype=dtype, seed=i) for i in (13, 14))
    keep = torch.arange(40) % 7 != 3
    cotangent = randn(40, 3, dtype=torch.float64, seed=15)
    bad = [
        torch.where(keep[:, None, None], x, torch.nan).requires_grad_() for x in (decoded, source)
    ]
    (term(*bad, reduce="none", mask=keep) * cotangent).sum().backward()
    clean = [x.double().requires_grad_() for x in (decoded, source)]
    (torch.where(keep[:, None], reference(*clean), 0) * cotangent).sum().backward()
    for ours, expected in zip(bad, clean, strict=True):
        assert ours.grad.dtype == dtype
        assert ours.grad[~keep].eq(0).all()
        scale = expected.grad.abs().max()
        torch.testing.assert_close(
            ours.grad.double(), expected.grad, rtol=0, atol=tolerance * scale
        )


@pytest.mark.parametrize("magnitude", [1e20, 1e-25])
def test_float32_gradients_are_exact_at_any_magnitude(magnitude):
    # cos(a x̂, a x) = cos(x̂, x), so its gradient at (a x̂, a x) is the gradient at (x̂, x) / a.
    unit_d, unit_s = (randn(3, 6, dtype=torch.float64, seed=i) for i in (16, 17))
    d, s = ((magnitude * x).float().requires_grad_() for x in (unit_d, unit_s))
    cosine_similarity(d, s, reduce="sum").backward()
    back = [(x.detach().double() / magnitude).requires_grad_() for x in (d, s)]
    cosine_reference(*back).sum().backward()
    for ours, expected in zip((d, s), back, strict=True):
        torch.testing.assert_close(
            ours.grad.double() * magnitude, expected.grad, rtol=1e-5, atol=1e-6
        )


@each_term
def test_only_the_inputs_are_saved_for_backward(term, reference):
    decoded, source = (randn(64, 32, seed=i).requires_grad_() for i in (8, 9))
    mask = torch.arange(64) % 2 == 0
    with SavedTensors() as saved:
        value = term(decoded, source, mask=mask)
    # Beyond the inputs, only per-row or smaller tensors (the reduce's), nothing batch x feature.
    assert saved.beyond([decoded, source, mask], min_numel=65) == []
    value.backward()
    assert decoded.grad is not None


@each_term
def test_blocked_eager_path_equals_one_call(term, reference, monkeypatch):
    features = 64
    batch = blocked_rows(features)
    decoded, source = randn(batch, features, seed=10), randn(batch, features, seed=11)
    one_call = term(decoded, source, reduce="none")
    spy = RowBlocksSpy.install(monkeypatch)
    monkeypatch.setattr("sae_losses._rowops.BLOCK_ELEMENTS", 4096)
    blocked = term(decoded, source, reduce="none")
    assert spy.blocked() == 1
    torch.testing.assert_close(blocked, one_call, rtol=0, atol=0)


@each_term
def test_torch_func_grad_matches_autograd(term, reference):
    decoded, source = randn(5, 4, dtype=torch.float64, seed=12), randn(5, 4, dtype=torch.float64)
    found = torch.func.grad(lambda d: term(d, source))(decoded)
    leaf = decoded.clone().requires_grad_()
    term(leaf, source).backward()
    torch.testing.assert_close(found, leaf.grad, rtol=1e-12, atol=1e-15)


def test_streams_into_a_streaming_mean_as_the_peers_cossim():
    # SAELens/SAEBench cossim: torch.cat of every batch's per-token values, then .mean().
    batches = [(randn(n, 6, seed=n), randn(n, 6, seed=n + 50)) for n in (3, 8, 1)]
    mean = StreamingMean.empty()
    for d, s in batches:
        mean = mean.update(cosine_similarity(d, s, reduce="none"))
    expected = torch.cat([cosine_reference(d, s) for d, s in batches]).mean()
    torch.testing.assert_close(mean.compute(), expected, rtol=1e-6, atol=0)


ERRORS = [
    (lambda f: f(torch.ones(2, 3), torch.ones(2, 4)), ValueError, r"`decoded` and `source` must"),
    (lambda f: f(torch.ones(3), torch.ones(3)), ValueError, r"at least 2 dimensions, got shape"),
    (lambda f: f(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3)), TypeError, "floating"),
    (lambda f: f(torch.ones(2, 3), torch.ones(2, 3), reduce="max"), ValueError, "`reduce` must"),
    (
        lambda f: f(torch.ones(2, 3), torch.ones(2, 3), mask=torch.ones(3, dtype=torch.bool)),
        ValueError,
        r"`mask` must have shape \(batch,\) = \(2,\), got \(3,\)",
    ),
]


@each_term
@pytest.mark.parametrize(("call", "error", "message"), ERRORS)
def test_errors(term, reference, call, error, message):
    with pytest.raises(error, match=message):
        call(inspect.unwrap(term))


@pytest.mark.compile
@each_term
def test_compiles_fullgraph_without_recompiling_across_batch_sizes(term, reference):
    counter = CompileCounter()
    compiled = torch.compile(term, backend=counter, fullgraph=True)
    for batch in (4, 9, 17):
        decoded, source = randn(batch, 8, seed=batch), randn(batch, 8, seed=batch + 1)
        mask = torch.arange(batch) % 3 != 0
        decoded[0] = torch.nan  # a masked row
        torch.testing.assert_close(
            compiled(decoded, source, mask=mask), term(decoded, source, mask=mask)
        )
    assert counter.frame_count <= 2
