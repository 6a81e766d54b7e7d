r"""The moments of a batch's kept rows, taken about a pivot: one of those rows itself.

About a kept row :math:`p`, the sums of :math:`x - p` are exactly 0 for a constant component,
and :math:`(\mu - p)^2` is at most the sum of squared deviations, so neither a constant feature
nor a large feature offset loses digits to cancellation.

- :func:`kept_mean`: the mean of the kept rows (the batch FVU's, the AuxK loss's, and
  StreamingFVU's when compiled).
- :func:`batch_state`: one batch's float64 ``(count, mean, m2, error)``, in one pass, for
  StreamingFVU's update.
"""

import math

import torch
from torch import Tensor

from sae_losses import _rowops
from sae_losses._masks import row_view
from sae_losses._rowops import uses_plain_formula

__all__ = ["MAX_BLOCK_ROWS", "batch_state", "kept_mean"]

# Rows per block at most: the sums about one of the block's rows lose at most log10(1 + rows)
# digits (see batch_state), so 1024 rows keep m2 within about 1e-12 of float64's rounding.
MAX_BLOCK_ROWS = 1024


def kept_mean(source: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    r"""The mean of the kept rows, ``(*component, feature)`` in ``dtype``, with no gradient.

    It is taken about a pivot :math:`p`, the first kept row: :math:`p + \sum_b (x_b - p) / n`.
    Where every kept row equals :math:`p`, the sum is exactly 0, so a constant component has
    exactly its value as mean and exactly 0 as variance, in any dtype (a plain float32 sum of
    ``3000.11`` three times is not exact). With no kept row it is 0, so that it stays finite
    in the gradients of masked rows.
    """
    source = source.detach()
    if source.shape[0] == 0:
        return torch.zeros(source.shape[1:], dtype=dtype, device=source.device)
    first = torch.zeros(1, dtype=torch.int64, device=source.device)
    if keep is not None:
        first = keep.to(torch.uint8).argmax().reshape(1)  # argmax, not nonzero: no host sync
    pivot = source.index_select(0, first).to(dtype)[0]
    if uses_plain_formula((source,)):
        shifted = source.to(dtype) - pivot
        if keep is not None:
            shifted = torch.where(row_view(keep, shifted), shifted, 0)
        total = shifted.sum(0)
    else:
        total = _shifted_sums(source, pivot, keep)
    if keep is None:
        return pivot + total / source.shape[0]
    count = keep.sum(dtype=dtype)
    return torch.where(count > 0, pivot + total / count.clamp(min=1), 0)


def _shifted_sums(source: Tensor, pivot: Tensor, keep: Tensor | None) -> Tensor:
    """``sum_b (x_b - p)`` over the kept rows: each block of rows is shifted into one reused
    buffer, then summed by a matrix-vector product (a column sum costs about twice as much)."""
    blocks = _rowops.row_blocks(source)
    size = source.shape[0] if blocks[0].stop is None else min(blocks[0].stop, source.shape[0])
    buffer = torch.empty((size, *source.shape[1:]), dtype=pivot.dtype, device=source.device)
    ones = torch.ones(size, dtype=pivot.dtype, device=source.device)
    total = torch.zeros(pivot.numel(), dtype=pivot.dtype, device=source.device)
    dropped = None if keep is None else ~keep
    for block in blocks:
        part = source[block]
        rows = part.shape[0]
        shifted = torch.sub(part, pivot, out=buffer[:rows])
        if dropped is not None:  # a fill, not a product: dropped rows may hold NaN or Inf
            shifted.masked_fill_(row_view(dropped[block], shifted), 0)
        total.addmv_(shifted.reshape(rows, -1).T, ones[:rows])
    return total.reshape(pivot.shape)


def batch_state(decoded: Tensor, source: Tensor, keep: Tensor | None) -> tuple[Tensor, ...]:
    r"""``(count, mean, m2, error)`` of the kept rows, in float64, in one pass over the inputs.

    The rows go in float64 blocks of about 1 MiB (at most ``MAX_BLOCK_ROWS`` rows). In each
    block :math:`k`, the sums of :math:`x - p_k` and :math:`(x - p_k)^2` about a pivot
    :math:`p_k`, its first kept row, give its mean :math:`\mu_k` and :math:`M_{2,k} = \sum
    (x - p_k)^2 - n_k (\mu_k - p_k)^2`. Since :math:`p_k` is one of the rows,
    :math:`(\mu_k - p_k)^2 \le M_{2,k}` for every feature: the difference loses at most
    :math:`\log_{10}(1 + n_k)` digits, whatever the offset. The blocks are then combined as
    Chan's update does, :math:`M_2 = \sum_k M_{2,k} + \sum_k n_k (\mu_k - \mu)^2`: a sum
    of non-negative terms. Under ``torch.compile``: two passes, the mean first.
    """
    rows, shape = source.shape[0], source.shape[1:]
    device = source.device
    dropped = None if keep is None else ~keep
    count = torch.full((), rows, device=device) if keep is None else keep.sum()
    if torch.compiler.is_compiling():
        x = source.to(torch.float64)
        mean = kept_mean(x, keep, torch.float64)
        deviation = (x - mean).square()
        squared_error = (decoded.to(torch.float64) - x).square().sum(-1)
        if dropped is not None:
            deviation = torch.where(row_view(dropped, deviation), 0, deviation)
            squared_error = torch.where(row_view(dropped, squared_error), 0, squared_error)
        return count, mean, deviation.sum(0), squared_error.sum(0)
    if rows == 0:
        zeros = torch.zeros(shape, dtype=torch.float64, device=device)
        return count, zeros, zeros.clone(), zeros.sum(-1)
    numel, features = max(1, math.prod(shape)), shape[-1]
    size = max(1, min(rows, MAX_BLOCK_ROWS, _rowops.BLOCK_ELEMENTS // 4 // numel))
    starts = range(0, rows, size)
    # Per block: the pivot, and the sums of x - pivot and (x - pivot)^2, in rows of one tensor.
    sums = torch.zeros((3, len(starts), numel), dtype=torch.float64, device=device)
    counts = torch.zeros(len(starts), dtype=torch.float64, device=device)
    buffers = torch.empty((2, size, numel), dtype=torch.float64, device=device)
    ones = torch.ones(max(size, features), dtype=torch.float64, device=device)
    error = torch.zeros(math.prod(shape[:-1]), dtype=torch.float64, device=device)
    for k, start in enumerate(starts):
        block = slice(start, start + size)
        n = min(size, rows - start)
        x, difference = buffers[0, :n].copy_(source[block].reshape(n, -1)), buffers[1, :n]
        squared = difference.copy_(decoded[block].reshape(n, -1)).sub_(x).square_()
        squared_error = torch.mv(squared.reshape(-1, features), ones[:features]).reshape(n, -1)
        if dropped is None:
            sums[0, k] = x[0]
            shifted = x.sub_(sums[0, k])
        else:  # fills, not products: dropped rows may hold NaN or Inf
            first = dropped[block].to(torch.uint8).argmin().reshape(1)  # no host sync
            sums[0, k] = x.index_select(0, first)[0]
            counts[k] = n - dropped[block].sum()
            shifted = x.sub_(sums[0, k]).masked_fill_(row_view(dropped[block], x), 0)
            squared_error.masked_fill_(row_view(dropped[block], squared_error), 0)
        error.addmv_(squared_error.T, ones[:n])
        torch.mv(shifted.T, ones[:n], out=sums[1, k])
        torch.mv(shifted.square_().T, ones[:n], out=sums[2, k])
    if dropped is None:
        counts = torch.tensor([min(size, rows - start) for start in starts], dtype=torch.float64)
    mean, m2 = _combined(counts.to(device), *sums)
    return count, mean.reshape(shape), m2.reshape(shape), error.reshape(shape[:-1])


def _combined(
    counts: Tensor, pivots: Tensor, first: Tensor, second: Tensor
) -> tuple[Tensor, Tensor]:
    """The mean and m2 of blocks given by their row counts and sums about their pivots."""
    kept = counts > 0
    offsets = torch.where(kept.unsqueeze(-1), first / counts.clamp(min=1).unsqueeze(-1), 0)
    means = torch.where(kept.unsqueeze(-1), pivots + offsets, 0)  # empty blocks: weight 0
    total = counts.sum()
    # About a kept block's mean, so that a constant feature's mean (and m2 = 0) stays exact.
    reference = means.index_select(0, kept.to(torch.uint8).argmax().reshape(1))[0]  # no sync
    mean = torch.where(total > 0, reference + counts @ (means - reference) / total.clamp(min=1), 0)
    within = (second - first * offsets).clamp_(min=0).sum(0)
    between = counts @ (means - mean).square()
    return mean, within + between
