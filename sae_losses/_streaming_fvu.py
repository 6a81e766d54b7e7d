r"""StreamingFVU: the fraction of variance unexplained over every row of an evaluation stream.

It keeps Chan et al.'s sufficient statistics per component and feature: the row count, the mean
and ``M2``, the sum of squared deviations about that mean, plus the summed squared error. Each
batch's statistics are computed in float64 in one pass, in blocks about one of their rows (see
``_batch_state`` for why that loses no more than :math:`\log_{10}(1 + n_k)` digits), then
merged with Chan's parallel update

.. math::

    n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad \mu = \mu_a + \delta \frac{n_b}{n},
    \quad M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n}

which never subtracts two large sums, so a feature offset of 10^4 or 10^6 loses no digits. A
one-pass :math:`\sum x^2 - (\sum x)^2 / n` would lose :math:`\log_{10}(\text{offset}^2/\sigma^2)`
of them. Across ranks, :func:`all_reduce` gathers every rank's state and merges them in rank
order, the same way.
"""

import dataclasses
import math

import torch
from jaxtyping import Bool, Float, Float64, Int64
from torch import Tensor

from sae_losses import _rowops
from sae_losses._accumulator import Accumulator, check_state_tensor, register_accumulator
from sae_losses._checks import check_activations, check_same_shape, shape_str
from sae_losses._fvu import kept_mean
from sae_losses._masks import check_mask, row_view

__all__ = ["StreamingFVU"]

# Rows per block at most: the sums about one of the block's rows lose at most log10(1 + rows)
# digits (see _batch_state), so 1024 rows keep m2 within about 1e-12 of float64's rounding.
MAX_BLOCK_ROWS = 1024


def _batch_state(decoded: Tensor, source: Tensor, keep: Tensor | None) -> tuple[Tensor, ...]:
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


@register_accumulator
@dataclasses.dataclass(frozen=True, eq=False)
class StreamingFVU(Accumulator):
    r"""Streaming fraction of variance unexplained, exact at any feature offset.

    .. math::

        \text{FVU}_c = \frac{\sum_b \sum_f (\hat{x}_{b,c,f} - x_{b,c,f})^2}
                            {\sum_b \sum_f (x_{b,c,f} - \bar{x}_{c,f})^2}

    over **every row seen**, with :math:`\bar{x}` the mean of all of them (not of each batch).
    ``explained_variance()`` is ``1 - FVU``. ``compute()`` is NaN before 2 rows, and ``+inf``
    when the source has zero variance but the error is positive.

    Fields (float64 but ``count``):
        count: ``()`` int64, rows seen.
        mean: ``(*component, feature)``, the mean of the source rows.
        m2: ``(*component, feature)``, the sum of squared deviations about ``mean``.
        error: ``(*component)``, the summed squared error over rows and features.

    Laws: ``empty`` is the identity of ``merge``; ``merge`` is associative and commutative to
    rounding; splitting the rows into updates in any way gives the same result to rounding;
    nothing syncs with the device; it is a pytree node, like :class:`StreamingMean`.

    Example:
        >>> import torch
        >>> from sae_losses import StreamingFVU
        >>> source = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
        >>> decoded = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
        >>> fvu = StreamingFVU.empty((2,))
        >>> fvu = fvu.update(decoded[:1], source[:1]).update(decoded[1:], source[1:])
        >>> fvu.compute()  # error 2 over variance 10, with the mean of both rows
        tensor(0.2000, dtype=torch.float64)
        >>> fvu.explained_variance()
        tensor(0.8000, dtype=torch.float64)
    """

    count: Int64[Tensor, ""]
    mean: Float64[Tensor, "*component feature"]
    m2: Float64[Tensor, "*component feature"]
    error: Float64[Tensor, "*component"]

    def _check_metadata(self) -> None:
        check_state_tensor("count", self.count, torch.int64, 0)
        mean = check_state_tensor("mean", self.mean, torch.float64, None)
        m2 = check_state_tensor("m2", self.m2, torch.float64, None)
        error = check_state_tensor("error", self.error, torch.float64, None)
        if mean.ndim == 0 or m2.shape != mean.shape or error.shape != mean.shape[:-1]:
            raise ValueError(
                "`mean` and `m2` must share a (*component, feature) shape and `error` be "
                f"(*component), got {shape_str(mean)}, {shape_str(m2)} and {shape_str(error)}."
            )
        if len({t.device for t in (self.count, mean, m2, error)}) != 1:
            raise ValueError("the fields of a StreamingFVU must be on one device.")

    @classmethod
    def empty(
        cls, shape: tuple[int, ...], *, device: torch.device | str | None = None
    ) -> "StreamingFVU":
        """An accumulator that has seen no rows, for sources shaped ``(batch, *shape)``.

        ``shape`` is ``(*component, feature)``: at least the feature axis.
        """
        zeros = torch.zeros(shape, dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        return cls._trusted(count, zeros, zeros.clone(), zeros.sum(-1))

    def update(
        self,
        decoded: Float[Tensor, "batch *component feature"],
        source: Float[Tensor, "batch *component feature"],
        *,
        mask: Bool[Tensor, " batch"] | None = None,
    ) -> "StreamingFVU":
        """Add a batch of rows (detached); return a new accumulator.

        The batch is summed in cache-sized blocks, then merged in with Chan's update. With a
        bool ``mask`` only the rows it keeps count; dropped rows may hold NaN.

        Raises:
            TypeError: an input is not a floating-point tensor, or ``mask`` is not bool.
            ValueError: the shapes differ, are not ``(batch, *shape)`` for this accumulator's
                ``shape``, or ``mask`` is not ``(batch,)`` on the inputs' device.
        """
        check_activations("decoded", decoded)
        check_activations("source", source)
        check_same_shape("`decoded` and `source`", decoded, source)
        if source.shape[1:] != self.mean.shape:
            raise ValueError(
                f"`source` must have shape (batch, *{shape_str(self.mean)}), "
                f"got {shape_str(source)}."
            )
        mask = check_mask(mask, source, weights_allowed=False)
        decoded, source = decoded.detach(), source.detach()
        return self.merge(self._trusted(*_batch_state(decoded, source, mask)))

    def merge(self, other: "StreamingFVU") -> "StreamingFVU":
        """Combine two accumulators with Chan's parallel update; return a new one.

        Raises:
            TypeError: ``other`` is not a StreamingFVU.
            ValueError: the two shapes or devices differ.
        """
        self._check_mergeable(other)
        if other.mean.shape != self.mean.shape:
            raise ValueError(
                "cannot merge accumulators of different shapes, "
                f"got {shape_str(self.mean)} and {shape_str(other.mean)}."
            )
        count = self.count + other.count
        total = count.to(torch.float64)
        share = torch.where(count > 0, other.count / total, 0)
        delta = other.mean - self.mean
        cross = torch.where(count > 0, self.count * share, 0)  # n_a n_b / n
        return self._trusted(
            count,
            self.mean + delta * share,
            self.m2 + other.m2 + delta.square() * cross,
            self.error + other.error,
        )

    def compute(self) -> Float64[Tensor, "*component"]:
        """The FVU over every row seen, float64 ``(*component)``; NaN before 2 rows."""
        fvu = self.error / self.m2.sum(-1)
        return torch.where(self.count >= 2, fvu, torch.nan)

    def explained_variance(self) -> Float64[Tensor, "*component"]:
        """``1 - compute()``."""
        return 1 - self.compute()
