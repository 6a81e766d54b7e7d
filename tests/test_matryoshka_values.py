"""matryoshka_l2's values: float64 references, masks and half precision.

Hand-worked prefixes; the float64 reference across reduce modes, dtypes, widths and the optional
bias; the last width is the full reconstruction's L2; each entry depends on its own width only
and "sum" adds over a split of the batch; an empty batch; non-contiguous inputs; masked rows are
inert and equal indexing, float weights; half inputs give float32 within half rounding and
accumulate the reconstruction in float32; mixed dtypes promote.
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from matryoshka_cases import BATCH, D_SAE, WIDTHS, call, inputs, naive_grads, reference
from sae_losses import l2_reconstruction, matryoshka_l2

# --- values --------------------------------------------------------------------------------------


def test_hand_worked_prefixes():
    z = torch.tensor([[1.0, 2.0, 0.5]])
    w_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    x = torch.tensor([[1.0, 3.0]])
    # Width 1: (1, 0) - (1, 3) = (0, -3), mean 4.5. Width 2: (1, 2): (0, -1), 0.5.
    # Width 3: (2, 3): (1, 0), 0.5. With bias (1, 1), width 2: (2, 3): (1, 0), 0.5.
    none = matryoshka_l2(z, w_dec, x, widths=[1, 2, 3], reduce="none")
    assert torch.equal(none, torch.tensor([[4.5, 0.5, 0.5]]))
    biased = matryoshka_l2(z, w_dec, x, widths=(2,), decoder_bias=torch.ones(2), reduce="none")
    assert torch.equal(biased, torch.tensor([[0.5]]))


@pytest.mark.parametrize("reduce", ["none", "mean", "sum"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("widths", [WIDTHS, [12], [3], [1, 4, 7]])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(reduce, dtype, rtol, widths, bias):
    z, w_dec, x, b_dec = inputs(dtype=dtype, grad=False)
    b_dec = b_dec if bias else None
    result = call(z, w_dec, x, b_dec, widths, reduce=reduce)
    expected = reference(z, w_dec, x, b_dec, widths, reduce)
    assert result.dtype == dtype
    assert result.shape == ((BATCH, len(widths)) if reduce == "none" else (len(widths),))
    torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=0)


def test_the_last_width_d_sae_is_the_full_reconstructions_l2():
    z, w_dec, x, b_dec = inputs(grad=False)
    full = l2_reconstruction(z @ w_dec + b_dec, x, reduce="none")
    torch.testing.assert_close(
        call(z, w_dec, x, b_dec, reduce="none")[:, -1], full, rtol=1e-13, atol=0
    )


@settings(max_examples=40, deadline=None)
@given(
    widths=st.sets(st.integers(1, D_SAE), min_size=1, max_size=6).map(sorted),
    batch=st.integers(0, 9),
    cut=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_each_entry_depends_on_its_own_width_only_and_sums_over_a_split(widths, batch, cut, seed):
    # Laws: column i equals the call with widths[i] alone, and "sum" is additive over the batch.
    z, w_dec, x, b_dec = inputs(batch=batch, seed=seed, grad=False)
    rows = call(z, w_dec, x, b_dec, widths, reduce="none")
    for i, w in enumerate(widths):
        torch.testing.assert_close(rows[:, i], call(z, w_dec, x, b_dec, [w], reduce="none")[:, 0])
    cut = min(cut, batch)
    parts = [slice(None, cut), slice(cut, None)]
    split = sum(call(z[p], w_dec, x[p], b_dec, widths, reduce="sum") for p in parts)
    torch.testing.assert_close(call(z, w_dec, x, b_dec, widths, reduce="sum"), split)


def test_empty_batch():
    z, w_dec, x, b_dec = inputs(batch=0)
    assert call(z, w_dec, x, b_dec, reduce="none").shape == (0, len(WIDTHS))
    assert torch.equal(call(z, w_dec, x, b_dec, reduce="sum"), torch.zeros(4, dtype=torch.float64))
    assert call(z, w_dec, x, b_dec).isnan().all()
    call(z, w_dec, x, b_dec, reduce="sum").sum().backward()
    assert torch.equal(w_dec.grad, torch.zeros_like(w_dec))


def test_non_contiguous_inputs():
    z, w_dec, x, b_dec = inputs(grad=False)
    zt, wt, xt = z.T.contiguous().T, w_dec.T.contiguous().T, x.T.contiguous().T
    assert not zt.is_contiguous()
    torch.testing.assert_close(
        call(zt, wt, xt, b_dec), reference(z, w_dec, x, b_dec, WIDTHS), rtol=1e-12, atol=0
    )


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["none", "mean", "sum"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_masked_rows_are_inert_and_the_mask_equals_indexing(reduce, fill):
    tensors = inputs(seed=9)
    keep = torch.arange(BATCH) % 3 != 1
    dirty = [t.detach().clone() for t in tensors]
    dirty[0][1], dirty[2][4] = fill, fill  # a latent row and a source row the mask drops
    dirty = [t.requires_grad_() for t in dirty]
    result = call(*dirty, reduce=reduce, mask=keep)
    indexed = call(tensors[0][keep], tensors[1], tensors[2][keep], tensors[3], reduce=reduce)
    if reduce == "none":
        assert torch.equal(result[~keep], torch.zeros_like(result[~keep]))
        result, full = result[keep], result
    else:
        full = result
    torch.testing.assert_close(result, indexed, rtol=1e-12, atol=0)
    got = torch.autograd.grad(full.sum(), dirty)
    want = torch.autograd.grad(indexed.sum(), tensors)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.isfinite().all()
        if i in (0, 2):  # batched: the dropped rows get exactly 0, as indexing gives them
            assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_float_weights_and_all_zero_weights():
    tensors = inputs(seed=10, grad=False)
    weights = torch.rand(BATCH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights[2] = 0.0
    for reduce in ("none", "mean", "sum"):
        torch.testing.assert_close(
            call(*tensors, reduce=reduce, mask=weights),
            reference(*tensors, WIDTHS, reduce, weights),
            rtol=1e-12,
            atol=0,
        )
    leaves = [t.requires_grad_() for t in tensors]
    zero = call(*leaves, mask=torch.zeros(BATCH, dtype=torch.float64))
    assert zero.isnan().all()
    for g in torch.autograd.grad(zero.sum(), leaves):
        assert torch.equal(g, torch.zeros_like(g))


# --- half precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_within_half_rounding_of_float64(dtype):
    tensors = inputs(batch=16, d_sae=32, d_model=8, dtype=dtype, seed=12)
    widths = [4, 8, 16, 32]
    result = call(*tensors, widths, reduce="none")
    assert result.dtype == torch.float32
    # Each segment's decode is rounded to half once, as latents @ decoder_weight would be.
    torch.testing.assert_close(
        result.double(), reference(*tensors, widths, "none"), rtol=3e-2, atol=1e-3
    )
    grads = torch.autograd.grad(result.sum(), tensors)
    assert [g.dtype for g in grads] == [dtype] * 4
    want = naive_grads(
        [t.double() for t in tensors], widths, torch.ones(16, 4, dtype=torch.float64)
    )
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


def test_half_inputs_accumulate_the_reconstruction_in_float32():
    # Eight segments each add 0.5 to a bias of 256. In bfloat16, 256 + 0.5 rounds back to 256
    # (the spacing there is 2), so a half-precision running reconstruction would stay at 256.
    d_sae = 8
    z = torch.ones(1, d_sae, dtype=torch.bfloat16)
    w_dec = torch.full((d_sae, 1), 0.5, dtype=torch.bfloat16)
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    b_dec = torch.full((1,), 256.0, dtype=torch.bfloat16)
    rows = call(z, w_dec, x, b_dec, list(range(1, d_sae + 1)), reduce="none")
    assert torch.equal(rows[0], torch.tensor([(256 + 0.5 * k) ** 2 for k in range(1, d_sae + 1)]))


def test_mixed_dtypes_promote():
    z, w_dec, x, b_dec = inputs(grad=False)
    result = call(z.float(), w_dec, x.float(), b_dec.float())
    assert result.dtype == torch.float64
    torch.testing.assert_close(
        result, reference(z.float(), w_dec, x, b_dec, WIDTHS), rtol=1e-6, atol=0
    )
