r"""The moments of a batch's kept rows, exact at any feature offset.

The batch mean is taken about a pivot :math:`p`, one of the kept rows: the sums of
:math:`x - p` are exactly 0 for a constant component, so a constant feature keeps its exact
value as mean and 0 as variance.

- :func:`kept_mean`: the mean of the kept rows (the batch FVU's, the AuxK loss's, and
  StreamingFVU
- :func:`batch_state`: one batch's float64 ``(count, mean, m2, error)``, for StreamingFVU's
  update: each block of rows about its own mean (its float64 copy is two passes from memory).
"""

import math

import torch
from torch import Tensor

from sae_losses import _rowops
from sae_losses._masks import row_view
from sae_losses._rowops import uses_plain_formula

__all__ = ["batch_state", "kept_mean"]


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
    if keep is None:
        pivot = source[0].to(dtype)
    else:  # argmax, not nonzero: no host sync
        pivot = source.index_select(0, keep.to(torch.uint8).argmax().reshape(1)).to(dtype)[0]
    blocks = None if uses_plain_formula((source,)) else _rowops.row_blocks(source)
    if blocks is None or len(blocks) == 1:
        shifted = source.to(dtype) - pivot
        if keep is not None:
            shifted = torch.where(row_view(keep, shifted), shifted, 0)
        total = shifted.sum(0)
    else:
        total = _shifted_sums(source, pivot, keep, blocks)
    if keep is None:
        return pivot + total / source.shape[0]
    count = keep.sum(dtype=dtype)
    return torch.where(count > 0, pivot + total / count.clamp(min=1), 0)


def _shifted_sums(
    source: Tensor, pivot: Tensor, keep: Tensor | None, blocks: list[slice]
) -> Tensor:
    """``sum_b (x_b - p)`` over the kept rows: each block of rows is shifted into one reused
    buffer and summed over its rows while it is in cache. (A matrix-vector product with ones
    measured 10-20% slower than the column sum, side by side, in December 2026.)"""
    size = source.shape[0] if blocks[0].stop is None else min(blocks[0].stop, source.shape[0])
    buffer = torch.empty((size, *source.shape[1:]), dtype=pivot.dtype, device=source.device)
    total = torch.zeros(pivot.shape, dtype=pivot.dtype, device=source.device)
    dropped = None if keep is None else ~keep
    for block in blocks:
        part = source[block]
        shifted = torch.sub(part, pivot, out=buffer[: part.shape[0]])
        if dropped is not None:  # a fill, not a product: dropped rows may hold NaN or Inf
            shifted.masked_fill_(row_view(dropped[block], shifted), 0)
        total.add_(shifted.sum(0))
    return total


def batch_state(decoded: Tensor, source: Tensor, keep: Tensor | None) -> tuple[Tensor, ...]:
    r"""``(count, mean, m2, error)`` of the kept rows, in float64, exact at any offset.

    Each block of rows (about 1 MiB of float64, so that it stays in a core's cache) is
    converted to float64 once and taken about its own mean, in two passes over that float64
    copy: :math:`M_{2,k} = \sum (x - \mu_k)^2` is then the float64 two-pass value, whatever
    the offset. Several blocks are combined as Chan's update does,
    :math:`M_2 = \sum_k M_{2,k} + \sum_k n_k (\mu_k - \mu)^2`, a sum of non-negative terms, with
    :math:`\mu` taken about the first kept block's mean. Every block is computed in the same two
    float64 buffers: fresh block-sized temporaries made glibc's malloc hand out new pages, a page
    fault each, on some calls (12-15 thousand faults a call at 4096 x 768, 20-24 ms instead of
    3.7). The buffers are what bounds the memory: two blocks' worth, not the batch's. Under
    ``torch.compile``: the same, in one block.
    """
    rows, shape = source.shape[0], source.shape[1:]
    if torch.compiler.is_compiling():
        return _block_state(decoded, source, keep)
    size = max(1, _rowops.BLOCK_ELEMENTS // 4 // max(1, math.prod(shape)))  # 1 MiB of float64
    if rows <= size:
        return _block_state(decoded, source, keep)
    buffers = [torch.empty((size, *shape), dtype=torch.float64, device=source.device)]
    buffers.append(torch.empty_like(buffers[0]))
    states = []
    for start in range(0, rows, size):
        b = slice(start, start + size)
        out = tuple(buffer[: source[b].shape[0]] for buffer in buffers)
        states.append(_block_state(decoded[b], source[b], None if keep is None else keep[b], out))
    counts, means, m2s, errors = (torch.stack(field) for field in zip(*states, strict=True))
    total = counts.sum()
    weights = row_view(counts.to(torch.float64), means)
    # About a kept block's mean, so that a constant feature's mean (and m2 = 0) stays exact.
    reference = means.index_select(0, (counts > 0).to(torch.uint8).argmax().reshape(1))[0]
    offset = (weights * (means - reference)).sum(0) / total.clamp(min=1)
    mean = torch.where(total > 0, reference + offset, 0)
    m2 = m2s.sum(0) + (weights * (means - mean).square()).sum(0)
    return total, mean, m2, errors.sum(0)


def _block_state(
    decoded: Tensor, source: Tensor, keep: Tensor | None, out: tuple[Tensor, ...] = ()
) -> tuple[Tensor, ...]:
    """``(count, mean, m2, error)`` of one block of rows, in float64 about its own mean.

    The rows are shifted by a pivot, the first kept row, straight into float64 (one pass), and
    the mean is taken about it, as in :func:`kept_mean`: a constant feature has exactly 0 as
    ``m2``. The error is ``(decoded - p) - (source - p)``, each difference in float64. ``out``:
    two float64 buffers shaped like the block to compute in (fresh tensors when empty).
    """
    if source.shape[0] == 0:
        zeros = torch.zeros(source.shape[1:], dtype=torch.float64, device=source.device)
        return torch.zeros((), dtype=torch.int64, device=source.device), zeros, zeros, zeros.sum(-1)
    if keep is None:
        pivot = source[0].to(torch.float64)
    else:  # argmax, not nonzero: no host sync
        pivot = source.index_select(0, keep.to(torch.uint8).argmax().reshape(1))[0]
        pivot = pivot.to(torch.float64)
    if not out:
        out = tuple(torch.empty_like(source, dtype=torch.float64) for _ in range(2))
    # copy_ converts into the buffer: a mixed-dtype sub would first copy its input to float64.
    shifted = out[0].copy_(source).sub_(pivot)
    error = out[1].copy_(decoded).sub_(pivot).sub_(shifted).square_()
    if keep is None:
        count = torch.full((), source.shape[0], dtype=torch.int64, device=source.device)
        shift = shifted.mean(0)
        mean = pivot + shift
        deviation = shifted.sub_(shift)
    else:  # fills, not products: dropped rows may hold NaN or Inf
        dropped = row_view(~keep, shifted)
        count = keep.sum()
        shift = shifted.masked_fill_(dropped, 0).sum(0) / count.clamp(min=1)
        mean = torch.where(count > 0, pivot + shift, 0)
        deviation = shifted.sub_(shift).masked_fill_(dropped, 0)
        error.masked_fill_(dropped, 0)
    return count, mean, deviation.square_().sum(0), error.sum((0, -1))
