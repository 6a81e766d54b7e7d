"""NaN-padded batches through a whole SAE: what ``mask=`` is for, the traps it avoids, the limit
of any loss-side mask, and StreamingMean's mask for the same padded rows.

The mask contract of each term on its own is in test_masks.py.
"""

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from helpers import randn
from sae_losses import (
    StreamingMean,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
)

bool_masks = st.lists(st.booleans(), min_size=1, max_size=9).map(torch.tensor)


# --- a whole SAE ----------------------------------------------------------------------------------


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
