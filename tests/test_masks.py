"""The mask contract of every row op: bool masks select rows, float masks weight them, and
masked rows are inert (no value, no gradient, even when they hold NaN or Inf)."""

import dataclasses
import inspect
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from helpers import randn
from sae_losses import (
    StreamingFVU,
    StreamingMean,
    _rowops,
    fraction_of_variance_unexplained,
    fused_l1_absolute,
    fused_l2_reconstruction,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
)

REDUCE_MODES = ["none", "mean", "sum"]
TOLERANCES = {torch.float32: 1e-6, torch.float64: 1e-12}
SHAPE = (2, 5)  # (component, feature) after the batch axis


@dataclasses.dataclass(frozen=True)
class Case:
    """A row op with its batched inputs first, then its ``(feature,)`` parameters."""

    name: str
    call: Callable[..., torch.Tensor]  # call(*batched, *params, reduce=..., mask=...)
    n_batched: int
    n_params: int = 0
    differentiable: bool = True

    def inputs(self, batch, dtype=torch.float64, seed=0):
        batched = [randn(batch, *SHAPE, dtype=dtype, seed=seed + i) for i in range(self.n_batched)]
        params = [
            (randn(SHAPE[-1], dtype=dtype, seed=seed + 10 + i).abs() + 0.5)
            for i in range(self.n_params)
        ]
        # Every input asks for a gradient, l0_norm's too: its result must still not need one.
        return [t.requires_grad_() for t in (*batched, *params)]

    def index(self, inputs, mask):
        """``x[m]`` for the batched inputs; the parameters are shared by every row."""
        return [t[mask] if i < self.n_batched else t for i, t in enumerate(inputs)]


CASES = [
    Case("l2_reconstruction", l2_reconstruction, n_batched=2),
    Case("l1_absolute", l1_absolute, n_batched=1),
    Case("l1_absolute_weighted", lambda z, w, **kw: l1_absolute(z, weight=w, **kw), 1, 1),
    Case("lp_sparsity", lambda z, w, **kw: lp_sparsity(z, p=0.5, weight=w, **kw), 1, 1),
    Case("lp_sparsity_root", lambda z, **kw: lp_sparsity(z, p=3.0, root=True, **kw), 1),
    Case("l0_norm", lambda z, **kw: l0_norm(z, threshold=0.3, **kw), 1, differentiable=False),
    Case("jumprelu_l0", lambda x, t, **kw: jumprelu_l0(x, t - 1.0, bandwidth=1.0, **kw), 1, 1),
]
CASE_IDS = [case.name for case in CASES]


def gradients(result, inputs):
    """The gradients of ``result.sum()`` for every input, zeros where none flows."""
    if not result.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    found = torch.autograd.grad(result.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found, strict=True)]


def assert_same(actual, expected, dtype):
    rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-3, equal_nan=True)


# --- bool masks: the same as indexing -------------------------------------------------------------

bool_masks = st.lists(st.booleans(), min_size=1, max_size=9).map(torch.tensor)


@settings(max_examples=8, deadline=None)
@given(mask=bool_masks, seed=st.integers(0, 1000))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_bool_mask_equals_indexing(case, dtype, reduce, mask, seed):
    inputs = case.inputs(len(mask), dtype, seed)
    masked = case.call(*inputs, reduce=reduce, mask=mask)
    indexed = case.call(*case.index(inputs, mask), reduce=reduce)
    assert masked.requires_grad == indexed.requires_grad == case.differentiable
    assert masked.dtype == indexed.dtype
    assert_same(masked, indexed, dtype)
    for got, want in zip(gradients(masked, inputs), gradients(indexed, inputs), strict=True):
        assert_same(got, want, dtype)


@settings(max_examples=8, deadline=None)
@given(mask=bool_masks, seed=st.integers(0, 1000))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bool_mask_none_gives_exact_zeros_on_masked_rows(case, mask, seed):
    inputs = case.inputs(len(mask), torch.float64, seed)
    rows = case.call(*inputs, reduce="none", mask=mask)
    assert rows.shape == (len(mask), SHAPE[0])
    assert torch.equal(rows[~mask], torch.zeros_like(rows[~mask]))
    assert_same(rows[mask], case.call(*case.index(inputs, mask), reduce="none"), torch.float64)
    # The masked rows get no gradient; the kept ones get the unmasked op's.
    unmasked = gradients(case.call(*inputs, reduce="none"), inputs)
    for got, full, t in zip(gradients(rows, inputs), unmasked, inputs, strict=True):
        if t.ndim == 1:  # a parameter: only the kept rows contribute
            continue
        assert not got[~mask].any()
        assert_same(got[mask], full[mask], torch.float64)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("reduce", REDUCE_MODES)
def test_all_true_mask_equals_no_mask(case, dtype, reduce):
    inputs = case.inputs(6, dtype, seed=3)
    with_mask = case.call(*inputs, reduce=reduce, mask=torch.ones(6, dtype=torch.bool))
    without = case.call(*inputs, reduce=reduce)
    assert_same(with_mask, without, dtype)
    for got, want in zip(gradients(with_mask, inputs), gradients(without, inputs), strict=True):
        assert_same(got, want, dtype)
    ones = case.call(*inputs, reduce=reduce, mask=torch.ones(6, dtype=dtype))
    assert_same(ones, without, dtype)


# --- float masks: row weights ---------------------------------------------------------------------


def weighted_reference(rows, weights, reduce):
    view = weights.reshape(-1, 1)
    weighted = rows * view
    return {
        "none": weighted,
        "sum": weighted.sum(0),
        "mean": weighted.sum(0) / weights.sum(),
    }[reduce]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reduce", REDUCE_MODES)
def test_float_mask_weights_the_rows(case, reduce):
    inputs = case.inputs(6, torch.float64, seed=4)
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 3.0], dtype=torch.float64)
    result = case.call(*inputs, reduce=reduce, mask=weights)
    # "none" = w l, "sum" = sum w l, "mean" = sum w l / sum w, with l the unmasked rows.
    expected = weighted_reference(case.call(*inputs, reduce="none"), weights, reduce)
    assert_same(result, expected, torch.float64)
    for got, want in zip(gradients(result, inputs), gradients(expected, inputs), strict=True):
        assert_same(got, want, torch.float64)
    # A float32 mask on float64 inputs weights the same way.
    assert_same(
        case.call(*inputs, reduce=reduce, mask=weights.float()),
        weighted_reference(case.call(*inputs, reduce="none"), weights.float().double(), reduce),
        torch.float64,
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_all_zero_weights(case):
    inputs = case.inputs(4, torch.float64, seed=5)
    zeros = torch.zeros(4, dtype=torch.float64)
    assert case.call(*inputs, reduce="mean", mask=zeros).isnan().all()  # 0 / 0, like empty
    assert torch.equal(case.call(*inputs, reduce="sum", mask=zeros), torch.zeros(SHAPE[0]).double())
    assert torch.equal(
        case.call(*inputs, reduce="none", mask=zeros), torch.zeros(4, SHAPE[0]).double()
    )
    nothing = torch.zeros(4, dtype=torch.bool)
    assert case.call(*inputs, reduce="mean", mask=nothing).isnan().all()
    for grad in gradients(case.call(*inputs, reduce="mean", mask=zeros), inputs):
        assert not grad.any()  # the NaN value sends no NaN back


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reduce", REDUCE_MODES)
def test_mask_gets_no_gradient(case, reduce):
    inputs = case.inputs(5, torch.float64, seed=6)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    result = case.call(*inputs, reduce=reduce, mask=weights)
    if case.differentiable:
        result.sum().backward()
        assert any(t.grad is not None for t in inputs)
    else:
        assert not result.requires_grad
    assert weights.grad is None


# --- NaN and Inf padding --------------------------------------------------------------------------


def pad(inputs, case, keep, fill):
    """The batched inputs with the rows ``keep`` drops set to ``fill`` (NaN or +-Inf)."""
    out = []
    for i, t in enumerate(inputs):
        t = t.detach().clone()
        if i < case.n_batched:
            t[~keep] = fill if i % 2 == 0 else -fill
        out.append(t.requires_grad_())
    return out


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_padded_rows_are_inert(case, reduce, fill, mask_kind):
    keep = torch.tensor([True, False, True, True, False, True])
    mask = keep if mask_kind == "bool" else keep.double() * torch.arange(1.0, 7.0).double()
    clean = case.inputs(6, torch.float64, seed=7)
    padded = pad(clean, case, keep, fill)
    value = case.call(*padded, reduce=reduce, mask=mask)
    expected = case.call(*clean, reduce=reduce, mask=mask)
    assert value.isfinite().all()
    assert_same(value, expected, torch.float64)
    for got, want in zip(gradients(value, padded), gradients(expected, clean), strict=True):
        assert got.isfinite().all()
        assert_same(got, want, torch.float64)


@pytest.mark.parametrize("case", [c for c in CASES if c.differentiable], ids=lambda c: c.name)
def test_padded_rows_are_inert_under_torch_func(case):
    # torch.func runs the plain formula path (the one DTensor and torch.compile take too).
    keep = torch.tensor([True, False, True, False])
    clean = [t.detach() for t in case.inputs(4, torch.float64, seed=8)]
    padded = [t.detach() for t in pad(clean, case, keep, float("nan"))]
    argnums = tuple(range(len(clean)))

    def loss(*args):
        return case.call(*args, reduce="mean", mask=keep).sum()

    got = torch.func.grad(loss, argnums=argnums)(*padded)
    want = gradients(
        case.call(*[t.requires_grad_() for t in clean], reduce="mean", mask=keep), clean
    )
    for g, w in zip(got, want, strict=True):
        assert g.isfinite().all()
        assert_same(g, w, torch.float64)


def padded_sae_batch():
    """A decoder Linear whose output is non-finite on padded rows, and a NaN-padded source.

    The Linear's own input stays finite (huge on padded rows, so the output overflows there):
    a NaN input would reach the Linear's weight gradient through its own backward (0 * NaN in
    the matmul), which no loss can prevent; padding must be masked before the first Linear.
    """
    torch.manual_seed(0)
    decoder = torch.nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        decoder.weight.mul_(4.0)  # sum_j |W_0j| > 1, so the padded rows' first output overflows
    keep = torch.tensor([True, True, False, True, False])
    learned = torch.rand(5, 6, dtype=torch.float64)
    learned[~keep] = torch.finfo(torch.float64).max * decoder.weight[0].detach().sign()
    source = torch.randn(5, 4, dtype=torch.float64)
    source[~keep] = torch.nan
    return decoder, keep, learned, source


def test_nan_padding_gives_finite_values_and_linear_gradients():
    decoder, keep, learned, source = padded_sae_batch()
    decoded = decoder(learned)
    assert not decoded[~keep].isfinite().all()  # the padded rows really are poisoned
    weight = decoder.weight.norm(dim=0)
    loss = (
        l2_reconstruction(decoded, source, mask=keep)
        + l1_absolute(decoded, mask=keep)
        + l1_absolute(learned, weight=weight, mask=keep)
        + lp_sparsity(decoded, p=0.5, root=True, mask=keep)
        + jumprelu_l0(decoded, decoder.bias.detach() * 0 + 0.1, bandwidth=1.0, mask=keep)
    )
    loss.backward()
    assert loss.isfinite()
    grads = (decoder.weight.grad.clone(), decoder.bias.grad.clone())
    assert all(g.isfinite().all() for g in grads)

    # The same loss on the kept rows only (boolean indexing, no mask).
    decoder.zero_grad()
    d, s, z = decoder(learned[keep]), source[keep], learned[keep]
    clean = (
        l2_reconstruction(d, s)
        + l1_absolute(d)
        + l1_absolute(z, weight=decoder.weight.norm(dim=0))
        + lp_sparsity(d, p=0.5, root=True)
        + jumprelu_l0(d, decoder.bias.detach() * 0 + 0.1, bandwidth=1.0)
    )
    clean.backward()
    # float64: the masked and the indexed sums differ only by rounding (the matmuls have 5 and
    # 3 rows, and the weight gradient sums terms of both signs).
    torch.testing.assert_close(loss, clean, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], decoder.weight.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1], decoder.bias.grad, rtol=1e-12, atol=1e-14)


def test_the_masking_traps_the_mask_avoids():
    # Why `mask=` exists: the two obvious hand-written masks fail on NaN padding.
    decoder, keep, learned, source = padded_sae_batch()
    rows = (decoder(learned) - source).pow(2).mean(-1)
    weights = keep.double()
    assert (rows * weights).sum().div(weights.sum()).isnan()  # 0 * NaN = NaN in the value
    where = torch.where(keep, rows, 0).sum() / keep.sum()
    assert where.isfinite()  # the value is right...
    where.backward()
    assert decoder.weight.grad.isnan().any()  # ...but the where's zero gradient times NaN is NaN
    decoder.zero_grad()
    l2_reconstruction(decoder(learned), source, mask=keep).backward()
    torch.testing.assert_close(l2_reconstruction(decoder(learned), source, mask=keep), where)
    assert decoder.weight.grad.isfinite().all()


def test_a_mask_cannot_clean_a_linear_whose_input_is_nan():
    # The limit of any loss-side mask, indexing included: NaN in a Linear's input reaches its
    # weight gradient through the Linear's own backward. Mask (or zero) the rows before it.
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3)
    keep = torch.tensor([True, False, True])
    source = torch.randn(3, 4)
    source[~keep] = torch.nan
    l1_absolute(encoder(source), mask=keep).backward()
    assert encoder.weight.grad.isnan().any()
    encoder.zero_grad()
    l1_absolute(encoder(torch.where(keep[:, None], source, 0)), mask=keep).backward()
    assert encoder.weight.grad.isfinite().all()


# --- errors ---------------------------------------------------------------------------------------

UNCHECKED = {
    "l2_reconstruction": inspect.unwrap(l2_reconstruction),
    "l1_absolute": inspect.unwrap(l1_absolute),
    "lp_sparsity": inspect.unwrap(lp_sparsity),
    "l0_norm": inspect.unwrap(l0_norm),
    "jumprelu_l0": inspect.unwrap(jumprelu_l0),
    "fused_l2_reconstruction": inspect.unwrap(fused_l2_reconstruction),
    "fused_l1_absolute": inspect.unwrap(fused_l1_absolute),
}


def unchecked_call(name, mask):
    x = torch.ones(4, 3)
    return {
        "l2_reconstruction": lambda: UNCHECKED[name](x, x, mask=mask),
        "l1_absolute": lambda: UNCHECKED[name](x, mask=mask),
        "lp_sparsity": lambda: UNCHECKED[name](x, p=2.0, mask=mask),
        "l0_norm": lambda: UNCHECKED[name](x, mask=mask),
        "jumprelu_l0": lambda: UNCHECKED[name](x, torch.ones(3), bandwidth=0.1, mask=mask),
        # The fused functions check eagerly, before any compiled kernel: no compile here.
        "fused_l2_reconstruction": lambda: UNCHECKED[name](x, x, mask=mask),
        "fused_l1_absolute": lambda: UNCHECKED[name](x, mask=mask),
    }[name]


@pytest.mark.parametrize("name", list(UNCHECKED))
@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (
            torch.ones(4, 2, dtype=torch.bool),
            ValueError,
            r"`mask` must have shape \(batch,\) = \(4,\), got \(4, 2\)\.",
        ),
        (
            torch.ones(3, dtype=torch.bool),
            ValueError,
            r"`mask` must have shape \(batch,\) = \(4,\), got \(3,\)\.",
        ),
        (
            torch.ones((), dtype=torch.bool),
            ValueError,
            r"`mask` must have shape \(batch,\) = \(4,\), got \(\)\.",
        ),
        (
            torch.ones(1),
            ValueError,
            r"`mask` must have shape \(batch,\) = \(4,\), got \(1,\)\.",  # no broadcasting
        ),
        (
            torch.ones(4, dtype=torch.int64),
            TypeError,
            r"`mask` must be a bool or floating \(row weights\) tensor, got dtype torch\.int64\.",
        ),
        (
            torch.ones(4, dtype=torch.uint8),
            TypeError,
            r"`mask` must be a bool or floating \(row weights\) tensor, got dtype torch\.uint8\.",
        ),
        (
            torch.ones(4, dtype=torch.complex64),
            TypeError,
            r"got dtype torch\.complex64\.",
        ),
        (
            [True, True, False, True],
            TypeError,
            r"`mask` must be a torch\.Tensor or None, got list\.",
        ),
        (
            torch.ones(4, dtype=torch.bool, device="meta"),
            ValueError,
            r"`mask` is on meta but the inputs are on cpu\.",
        ),
    ],
)
def test_mask_errors(name, mask, error, message):
    with pytest.raises(error, match=message):
        unchecked_call(name, mask)()


FVU_UNCHECKED = inspect.unwrap(fraction_of_variance_unexplained)
UPDATE_UNCHECKED = inspect.unwrap(StreamingMean.update)
FVU_UPDATE_UNCHECKED = inspect.unwrap(StreamingFVU.update)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: UPDATE_UNCHECKED(StreamingMean.empty(), torch.ones(4), mask=m),
        lambda m: FVU_UNCHECKED(torch.ones(4, 3), torch.ones(4, 3), mask=m),
        lambda m: FVU_UPDATE_UNCHECKED(
            StreamingFVU.empty((3,)), torch.ones(4, 3), torch.ones(4, 3), mask=m
        ),
    ],
    ids=["StreamingMean.update", "fraction_of_variance_unexplained", "StreamingFVU.update"],
)
def test_bool_only_masks_reject_float_and_integer_masks(call):
    for dtype in (torch.float32, torch.float64, torch.int64):
        with pytest.raises(TypeError, match=r"`mask` must be a bool tensor, got dtype torch\."):
            call(torch.ones(4, dtype=dtype))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(batch,\) = \(4,\), got \(2,"):
        call(torch.ones(2, dtype=torch.bool))


# --- StreamingMean.update(mask=) ------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(mask=bool_masks, seed=st.integers(0, 1000))
def test_streaming_mean_mask_equals_indexing(mask, seed):
    values = randn(len(mask), 3, seed=seed)
    padded = values.clone()
    padded[~mask] = torch.nan  # masked rows are ignored even when NaN
    start = StreamingMean.empty((3,)).update(randn(2, 3, seed=seed + 1))
    masked = start.update(padded, mask=mask)
    assert masked == start.update(values[mask])
    assert masked.count.item() == start.count.item() + int(mask.sum())
    assert masked.total.isfinite().all()


def test_streaming_mean_mask_counts_true_rows_and_takes_counts():
    values = torch.tensor([1.0, torch.nan, 3.0, torch.inf])
    mean = StreamingMean.empty().update(values, mask=torch.tensor([True, False, True, False]))
    assert mean.count.item() == 2
    assert mean.count.dtype == torch.int64
    assert mean.compute().item() == 2.0
    # Active-latent counts (l0_norm rows) stream with the same mask.
    learned = torch.tensor([[1.0, 0.0], [torch.nan, 1.0], [1.0, 1.0]])
    keep = torch.tensor([True, False, True])
    rows = l0_norm(learned, reduce="none", mask=keep)
    assert StreamingMean.empty().update(rows, mask=keep).compute().item() == 1.5
    nothing = StreamingMean.empty().update(values, mask=torch.zeros(4, dtype=torch.bool))
    assert nothing.count.item() == 0
    assert nothing.compute().isnan()


# --- the blocked eager path -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_calls_through_many_row_blocks(monkeypatch, case, mask_kind):
    # Blocks of 2 rows of (2, 5): the loop, its last partial block and the slices all run.
    keep = torch.tensor([True, False, True, True, False, True, True, True, False])
    mask = keep if mask_kind == "bool" else keep.float() * torch.linspace(0.5, 2.0, 9)
    clean = case.inputs(9, torch.float32, seed=9)
    padded = pad(clean, case, keep, float("nan"))
    expected = {r: case.call(*clean, reduce=r, mask=mask) for r in REDUCE_MODES}
    expected_grads = gradients(expected["mean"], clean)
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * SHAPE[0] * SHAPE[1])
    for reduce in REDUCE_MODES:
        with torch.no_grad():
            assert_same(
                case.call(*padded, reduce=reduce, mask=mask), expected[reduce], torch.float32
            )
        assert_same(case.call(*padded, reduce=reduce, mask=mask), expected[reduce], torch.float32)
    got = gradients(case.call(*padded, reduce="mean", mask=mask), padded)
    for g, w in zip(got, expected_grads, strict=True):
        assert g.isfinite().all()
        assert_same(g, w, torch.float32)


# --- the fused functions (compiled) ---------------------------------------------------------------


@pytest.mark.compile
def test_fused_functions_take_a_mask():
    keep = torch.tensor([True, False, True, True, False])
    decoded, source = randn(5, 2, 6, seed=10), randn(5, 2, 6, seed=11)
    decoded[~keep], source[~keep] = torch.nan, torch.inf
    decoded.requires_grad_()
    weight = (randn(6, seed=12).abs() + 0.5).requires_grad_()
    for mask in (keep, keep.float() * 2.0):
        loss = fused_l2_reconstruction(decoded, source, mask=mask) + fused_l1_absolute(
            decoded, weight=weight, mask=mask
        )
        d = decoded.detach()[keep].requires_grad_()
        w = weight.detach().clone().requires_grad_()
        expected = l2_reconstruction(d, source[keep]) + l1_absolute(d, weight=w)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        grad_decoded, grad_weight = torch.autograd.grad(loss.sum(), (decoded, weight))
        expected_decoded, expected_weight = torch.autograd.grad(expected.sum(), (d, w))
        assert not grad_decoded[~keep].any()
        torch.testing.assert_close(grad_decoded[keep], expected_decoded, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_weight, expected_weight, rtol=1e-6, atol=1e-7)
        rows = fused_l1_absolute(decoded, weight=weight, reduce="none", mask=mask)
        assert torch.equal(rows[~keep], torch.zeros(2, 2))
