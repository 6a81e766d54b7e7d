"""What every term in the registry (tests/terms.py) must do: match its float64 reference across
shapes, reduce modes, dtypes and masks; sum over any split of the batch; handle empty batches
and non-contiguous inputs; leave its inputs alone. And the registry must cover every public term.
"""

import hypothesis.strategies as st
import jaxtyping
import pytest
import torch
from hypothesis import given, settings

import sae_losses
from terms import NOT_TERMS, TERMS, cases, cases_with_reduce

SHAPES = [(5, 7), (4, 3, 6), (3, 2, 4, 5), (1, 1)]
DTYPE_TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}


def test_every_public_term_has_an_entry():
    covered = {term.function for term in TERMS} | {term.eager for term in TERMS} - {None}
    public = set(sae_losses.__all__)
    assert public - set(NOT_TERMS) == covered, "add an entry to tests/terms.py::TERMS"
    assert set(NOT_TERMS) <= public
    assert len({term.name for term in TERMS}) == len(TERMS)


def make_mask(kind, batch, dtype):
    if kind == "none":
        return None
    if kind == "bool":
        return torch.arange(batch) % 3 != 1  # drops row 1 (and 4), keeps at least 2 rows of 3+
    weights = torch.rand(batch, generator=torch.Generator().manual_seed(batch)) + 0.5
    weights[1 % batch] = 0.0
    return weights.to(dtype)


@pytest.mark.parametrize(
    ("term", "reduce", "mask_kind", "shape"),
    [
        pytest.param(term, reduce, kind, shape, id=f"{param.id}-{kind}-{shape}", marks=param.marks)
        for param in cases_with_reduce(compiled=False)
        for term, reduce in [param.values]
        for kind in term.mask_kinds
        for shape in SHAPES
        if len(shape) == 2 or term.components
    ],
)
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES))
def test_matches_float64_reference(term, reduce, mask_kind, shape, dtype):
    inputs = term.inputs(shape[0], shape[1:], dtype, seed=len(shape))
    mask = make_mask(mask_kind, shape[0], dtype)
    result = term(*inputs, reduce=reduce, mask=mask)
    # Half inputs are compared with the float64 result on the same (rounded) inputs.
    expected = term.float64_reference(*inputs, reduce=reduce, mask=mask)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.shape == expected.shape
    if term.default_axes:
        assert result.shape == (shape[:-1] if reduce == "none" else shape[1:-1])
    rtol = dict(term.rtol).get(dtype, DTYPE_TOLERANCES[dtype])
    atol = 0 if term.value_scale is None else rtol * term.value_scale
    torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=atol, equal_nan=True)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 12),
    features=st.integers(1, 9),
    cut=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("term", cases(lambda term: term.reduce, compiled=False))
def test_sum_over_a_batch_is_the_sum_over_any_split(term, batch, features, cut, seed):
    cut = min(cut, batch)
    inputs = term.inputs(batch, (features,), seed=seed)
    whole = term(*inputs, reduce="sum")
    parts = term(*term.index(inputs, slice(None, cut)), reduce="sum") + term(
        *term.index(inputs, slice(cut, None)), reduce="sum"
    )
    torch.testing.assert_close(whole, parts)


@pytest.mark.parametrize("term", cases(compiled=False))
def test_empty_batch(term):
    inputs = term.inputs(0)
    for reduce in term.reduces:
        result = term(*inputs, reduce=reduce)
        expected = term.float64_reference(*inputs, reduce=reduce)
        assert result.shape == expected.shape
        torch.testing.assert_close(result.double(), expected, equal_nan=True)
    if term.default_axes and term.reduce:  # "sum" is 0, "mean" is NaN (0 / 0)
        assert term(*inputs, reduce="none").shape == (0, 2)
        assert torch.equal(term(*inputs, reduce="sum"), torch.zeros(2, dtype=torch.float64))
        assert term(*inputs, reduce="mean").isnan().all()


# A loss that is NaN by definition (the FVU of fewer than 2 rows) must still be one to call
# backward on: its NaN then reaches no input (checked in test_masks.py).
@pytest.mark.parametrize(
    ("term", "batch"),
    [
        pytest.param(
            *param.values,
            batch,
            id=f"{param.id}-{batch}",
        )
        for param in cases(lambda term: term.grads, compiled=False)
        for batch in (0, 1, 2)
    ],
)
def test_the_result_has_a_gradient_at_any_batch_size(term, batch):
    inputs = term.inputs(batch, (3,), requires_grad=True)
    for reduce in term.reduces:
        result = term(*inputs, reduce=reduce)
        assert result.requires_grad
        grads = torch.autograd.grad(result.sum(), [inputs[i] for i in term.grads])
        assert all(g is not None for g in grads)


@pytest.mark.parametrize(("term", "reduce"), cases_with_reduce(compiled=False))
def test_non_contiguous_inputs(term, reduce):
    # Every other row of column-major inputs: views with gaps, none of them contiguous.
    base = term.inputs(12, (3, 8) if term.components else (8,), seed=8)
    inputs = [
        t.transpose(0, -1).contiguous().transpose(0, -1)[::2] if i < term.n_batched else t
        for i, t in enumerate(base)
    ]
    assert not inputs[0].is_contiguous()
    torch.testing.assert_close(
        term(*inputs, reduce=reduce),
        term.float64_reference(*inputs, reduce=reduce),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("term", cases(lambda term: term.grads, compiled=False))
def test_inputs_are_not_modified(term):
    inputs = term.inputs(4, dtype=torch.bfloat16, seed=10, requires_grad=True)
    before = [t.detach().clone() for t in inputs]
    term(*inputs).sum().backward()
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t.detach(), b)


def test_runtime_type_check_is_on_in_the_suite(request):
    if request.config.getoption("--no-typecheck"):
        pytest.skip("this pass runs without the import hook")
    # The hook's check fires before the body: a shape mismatch between the two annotated
    # arguments is caught by jaxtyping itself.
    with pytest.raises(jaxtyping.TypeCheckError):
        sae_losses.l2_reconstruction(torch.ones(2, 3), torch.ones(2, 4))
