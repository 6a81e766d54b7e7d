"""The mask contract of every term (tests/terms.py): bool masks select rows, float masks weight
them, and masked rows are inert (no value, no gradient, even when they hold NaN or Inf).

A term without ``reduce`` (the FVU) or with bool-only masks enters the tests that apply to it.
"""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from helpers import RowBlocksSpy, gradients, one_call_elements
from sae_losses import _rowops
from terms import cases, cases_with_reduce

TOLERANCES = {torch.float32: 1e-6, torch.float64: 1e-12}


def takes_mask(term):
    return term.masks is not None


def assert_same(actual, expected, dtype, scale=1e-3):
    rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)


def assert_same_values(term, actual, expected, dtype):
    # A sum of signed terms (a mean of cosines) is exact relative to Term.value_scale, not to
    # itself: a float32 mean of 3 cosines near 1e-3 is 4e-9 off.
    assert_same(actual, expected, dtype, term.value_scale or 1e-3)


def assert_same_gradients(term, got, want, dtype):
    for g, w in zip(got, want, strict=True):
        # Some gradients are exact relative to their largest entry (Term.gradients_to_largest).
        largest = term.gradients_to_largest and w.is_floating_point()
        scale = max(1e-3, w.abs().max().item()) if largest else 1e-3
        assert_same(g, w, dtype, scale)


def inputs_of(term, batch, dtype=torch.float64, seed=0):
    # Every input asks for a gradient, l0_norm's too: its result must still not need one.
    return term.inputs(batch, None, dtype, seed, requires_grad=True)


# --- bool masks: the same as indexing -------------------------------------------------------------

bool_masks = st.lists(st.booleans(), min_size=1, max_size=9).map(torch.tensor)


@settings(max_examples=8, deadline=None)
@given(mask=bool_masks, seed=st.integers(0, 1000))
@pytest.mark.parametrize(
    ("term", "reduce"), cases_with_reduce(takes_mask, compiled=False, reduces=["sum", "mean"])
)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_bool_mask_equals_indexing(term, reduce, dtype, mask, seed):
    inputs = inputs_of(term, len(mask), dtype, seed)
    masked = term(*inputs, reduce=reduce, mask=mask)
    indexed = term(*term.index(inputs, mask), reduce=reduce)
    assert masked.dtype == indexed.dtype
    assert_same_values(term, masked, indexed, dtype)
    assert masked.requires_grad == bool(term.grads)
    if term.ratio and mask.sum() < 2:
        return  # NaN by definition, and its gradient: test_terms.py checks what it must be
    assert indexed.requires_grad == bool(term.grads)
    assert_same_gradients(term, gradients(masked, inputs), gradients(indexed, inputs), dtype)


@settings(max_examples=8, deadline=None)
@given(mask=bool_masks, seed=st.integers(0, 1000))
@pytest.mark.parametrize("term", cases(lambda term: term.reduce and term.masks, compiled=False))
def test_bool_mask_none_gives_exact_zeros_on_masked_rows(term, mask, seed):
    inputs = inputs_of(term, len(mask), seed=seed)
    rows = term(*inputs, reduce="none", mask=mask)
    assert rows.shape[0] == len(mask)
    assert torch.equal(rows[~mask], torch.zeros_like(rows[~mask]))
    assert_same(rows[mask], term(*term.index(inputs, mask), reduce="none"), torch.float64)
    # The masked rows get no gradient; the kept ones get the unmasked term's.
    unmasked = gradients(term(*inputs, reduce="none"), inputs)
    for got, full in zip(gradients(rows, inputs)[: term.n_batched], unmasked, strict=False):
        assert not got[~mask].any()
        assert_same(got[mask], full[mask], torch.float64)


@pytest.mark.parametrize(("term", "reduce"), cases_with_reduce(takes_mask, compiled=False))
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_all_true_mask_equals_no_mask(term, reduce, dtype):
    inputs = inputs_of(term, 6, dtype, seed=3)
    with_mask = term(*inputs, reduce=reduce, mask=torch.ones(6, dtype=torch.bool))
    without = term(*inputs, reduce=reduce)
    assert_same_values(term, with_mask, without, dtype)
    for got, want in zip(gradients(with_mask, inputs), gradients(without, inputs), strict=True):
        assert_same(got, want, dtype)
    if term.float_masks:
        ones = torch.ones(6, dtype=dtype)
        assert_same_values(term, term(*inputs, reduce=reduce, mask=ones), without, dtype)


# --- float masks: row weights ---------------------------------------------------------------------


def weighted_reference(rows, weights, reduce):
    weighted = rows * weights.reshape((-1,) + (1,) * (rows.ndim - 1))
    return {
        "none": weighted,
        "sum": weighted.sum(0),
        "mean": weighted.sum(0) / weights.sum(),
    }[reduce]


@pytest.mark.parametrize(
    ("term", "reduce"), cases_with_reduce(lambda t: t.float_masks, compiled=False)
)
def test_float_mask_weights_the_rows(term, reduce):
    inputs = inputs_of(term, 6, seed=4)
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 3.0], dtype=torch.float64)
    result = term(*inputs, reduce=reduce, mask=weights)
    # "none" = w l, "sum" = sum w l, "mean" = sum w l / sum w, with l the unmasked rows.
    expected = weighted_reference(term(*inputs, reduce="none"), weights, reduce)
    assert_same(result, expected, torch.float64)
    for got, want in zip(gradients(result, inputs), gradients(expected, inputs), strict=True):
        assert_same(got, want, torch.float64)
    # A float32 mask on float64 inputs weights the same way.
    assert_same(
        term(*inputs, reduce=reduce, mask=weights.float()),
        weighted_reference(term(*inputs, reduce="none"), weights.float().double(), reduce),
        torch.float64,
    )


@pytest.mark.parametrize("term", cases(takes_mask, compiled=False))
def test_all_zero_weights(term):
    inputs = inputs_of(term, 4, seed=5)
    nothing = torch.zeros(4, dtype=torch.bool)
    assert term(*inputs, mask=nothing).isnan().all()  # the mean of no rows: 0 / 0, like empty
    for grad in gradients(term(*inputs, mask=nothing), inputs):
        assert not grad.any()  # the NaN value sends no NaN back
    if not term.float_masks:
        return
    zeros = torch.zeros(4, dtype=torch.float64)
    assert term(*inputs, reduce="mean", mask=zeros).isnan().all()
    for reduce in ("sum", "none"):
        result = term(*inputs, reduce=reduce, mask=zeros)
        assert torch.equal(result, torch.zeros_like(result))
    for grad in gradients(term(*inputs, reduce="mean", mask=zeros), inputs):
        assert not grad.any()


@pytest.mark.parametrize(
    ("term", "reduce"), cases_with_reduce(lambda t: t.float_masks, compiled=False)
)
def test_mask_gets_no_gradient(term, reduce):
    inputs = inputs_of(term, 5, seed=6)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    result = term(*inputs, reduce=reduce, mask=weights)
    if term.grads:
        result.sum().backward()
        assert all(inputs[i].grad is not None for i in term.grads)
    else:
        assert not result.requires_grad
    assert weights.grad is None


# --- NaN and Inf padding --------------------------------------------------------------------------


def pad(inputs, term, keep, fill):
    """The batched inputs with the rows ``keep`` drops set to ``fill`` (NaN or +-Inf)."""
    out = []
    for i, t in enumerate(inputs):
        t = t.detach().clone()
        if i < term.n_batched:
            t[~keep] = fill if i % 2 == 0 else -fill
        out.append(t.requires_grad_(t.is_floating_point()))
    return out


def padding_masks(term):
    keep = torch.tensor([True, False, True, True, False, True])
    kinds = {"bool": keep, "float": keep.double() * torch.arange(1.0, 7.0).double()}
    return [
        (kind, keep, mask) for kind, mask in kinds.items() if kind == "bool" or term.float_masks
    ]


# Compiled terms too: the side under test compiles; the expected side is their eager twin.
@pytest.mark.parametrize(("term", "reduce"), cases_with_reduce(takes_mask))
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_padded_rows_are_inert(term, reduce, fill):
    clean = inputs_of(term, 6, seed=7)
    for _, keep, mask in padding_masks(term):
        padded = pad(clean, term, keep, fill)
        value = term(*padded, reduce=reduce, mask=mask)
        expected = term.expected(*clean, reduce=reduce, mask=mask)
        assert value.isfinite().all()
        assert_same(value, expected, torch.float64)
        got, want = gradients(value, padded), gradients(expected, clean)
        assert all(g.isfinite().all() for g in got)
        assert_same_gradients(term, got, want, torch.float64)


@pytest.mark.parametrize("term", cases(lambda term: term.grads and term.masks))
def test_padded_rows_are_inert_under_torch_func(term):
    # torch.func runs the plain formula path (the one DTensor and torch.compile take too).
    keep = torch.tensor([True, False, True, False])
    clean = [t.detach() for t in inputs_of(term, 4, seed=8)]
    padded = [t.detach() for t in pad(clean, term, keep, float("nan"))]

    def loss(*args):
        return term(*args, mask=keep).sum()

    got = torch.func.grad(loss, argnums=term.grads)(*padded)
    clean = [t.requires_grad_(t.is_floating_point()) for t in clean]
    want = gradients(term.expected(*clean, mask=keep), clean)
    for g, w in zip(got, [want[i] for i in term.grads], strict=True):
        assert g.isfinite().all()
        assert_same(g, w, torch.float64)


# --- the blocked eager path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "mask_kind"),
    [
        pytest.param(*p.values, kind, id=f"{p.id}-{kind}")
        for p in cases(lambda term: term.masks and term.blocked, compiled=False)
        for kind in (["bool", "float"] if p.values[0].float_masks else ["bool"])
    ],
)
def test_masked_calls_through_many_row_blocks(monkeypatch, term, mask_kind):
    # Blocks of 2 rows: the loop, its last partial block and the slices all run.
    keep = torch.tensor([True, False, True, True, False, True, True, True, False])
    mask = keep if mask_kind == "bool" else keep.float() * torch.linspace(0.5, 2.0, 9)
    clean = inputs_of(term, 9, torch.float32, seed=9)
    padded = pad(clean, term, keep, float("nan"))
    expected = {r: term(*clean, reduce=r, mask=mask) for r in term.reduces}
    expected_grads = gradients(term(*clean, mask=mask), clean)
    row_elements = math.prod(term.example_shape)
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * row_elements)
    assert one_call_elements() < 9 * row_elements
    spy = RowBlocksSpy.install(monkeypatch)
    for reduce in term.reduces:
        with torch.no_grad():
            value = term(*padded, reduce=reduce, mask=mask)
            assert_same_values(term, value, expected[reduce], torch.float32)
        value = term(*padded, reduce=reduce, mask=mask)
        assert_same_values(term, value, expected[reduce], torch.float32)
    got = gradients(term(*padded, mask=mask), padded)
    for g, w in zip(got, expected_grads, strict=True):
        assert g.isfinite().all()
        assert_same(g, w, torch.float32)
    assert spy.blocked() >= 2 * len(term.reduces) + 1, spy.calls  # every call was blocked
