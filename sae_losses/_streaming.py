"""StreamingMean: an immutable accumulator of row-weighted means.

A loop that reports a metric over many batches keeps one accumulator and replaces it::

    >>> import torch
    >>> from sae_losses import StreamingMean, l2_reconstruction
    >>> metric = StreamingMean.empty()
    >>> for batch in ([1.0], [0.0, 0.0, 0.0]):  # 1 row of 1.0, then 3 rows of 0.0
    ...     metric = metric.update(torch.tensor(batch))
    >>> metric.compute()  # row-weighted: 1 / 4, not the mean of the batch means (1 + 0) / 2
    tensor(0.2500, dtype=torch.float64)

Its contracts:

- ``update`` and ``merge`` return new accumulators and never change their inputs.
- Exactly: ``count`` is the same however the rows are split into updates and merged (an int64
  sum); ``empty()`` is an identity of ``merge`` (``total + 0.0`` equals ``total``); a two-way
  ``merge`` is commutative (so is IEEE addition). ``total`` too is the same, bit for bit, for
  any split and merge order while every partial sum is exact in float64: integer rows (0/1
  firing counts, say) whose partial sums stay below 2**53 in magnitude.
- Only to rounding, otherwise: ``merge`` is associative, and any split of the rows gives the
  same ``total``, to within about ``(n - 1) * 2**-53 * sum(|v|)`` of the exact sum of ``n``
  rows ``v``, since each float64 addition rounds: ``(1e16 + 1) + 1`` is ``1e16``, but
  ``1e16 + (1 + 1)`` is ``1e16 + 2``.
- The state is float64 (``total``) and int64 (``count``), so long float32 streams do not drift.
- Nothing syncs with the device, and it is a pytree node, so it can be the input and output of a
  ``torch.compile(fullgraph=True)`` step.
- A bool ``mask`` drops rows: they add nothing to ``total`` or ``count``, even when they are NaN.
- It is unhashable (equal by value, with mutable tensor fields), and every way to build one
  (constructor, ``from_state_dict``, unpickling and copies) rejects a negative ``count``, where
  there is a value to check (a meta accumulator has none, and copies as it is).
- ``merge`` of accumulators on different devices raises a ``ValueError``.
"""

import dataclasses

import torch
from jaxtyping import Bool, Float64, Int64, Shaped
from torch import Tensor

from sae_losses._accumulator import Accumulator, check_state_tensor, register_accumulator
from sae_losses._checks import describe, shape_str
from sae_losses._masks import check_mask, row_view

__all__ = ["StreamingMean"]


@register_accumulator
@dataclasses.dataclass(frozen=True, eq=False)
class StreamingMean(Accumulator):
    r"""The running mean of per-row values, as a sum and a row count.

    .. math::

        \text{compute}() = \frac{\text{total}}{\text{count}}
        = \frac{\sum_{\text{updates}} \sum_b m_b v_{b,c}}{\sum_{\text{updates}} \sum_b m_b}

    with :math:`m_b` the bool mask of each update (all ones without one).

    Fields:
        total: ``(*component)`` float64, the sum of every row seen.
        count: ``()`` int64, the number of rows seen.

    Example:
        >>> import torch
        >>> from sae_losses import StreamingMean, l1_absolute
        >>> learned = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
        >>> metric = StreamingMean.empty((1,)).update(l1_absolute(learned, reduce="none"))
        >>> metric.compute()
        tensor([1.5000], dtype=torch.float64)
        >>> metric.merge(StreamingMean.empty((1,))) == metric  # empty() is the identity
        True

    Associativity holds to rounding only:

        >>> rows = torch.tensor([[1e16], [1.0], [1.0]], dtype=torch.float64)
        >>> a, b, c = (StreamingMean.empty().update(row) for row in rows)
        >>> a.merge(b).merge(c).total.item(), a.merge(b.merge(c)).total.item()
        (1e+16, 1.0000000000000002e+16)
    """

    total: Float64[Tensor, "*component"]
    count: Int64[Tensor, ""]

    def _check_metadata(self) -> None:
        check_state_tensor("total", self.total, torch.float64, None)
        check_state_tensor("count", self.count, torch.int64, 0)
        if self.total.device != self.count.device:
            raise ValueError(
                "`total` and `count` must be on one device, "
                f"got {self.total.device} and {self.count.device}."
            )

    @classmethod
    def empty(
        cls, shape: tuple[int, ...] = (), *, device: torch.device | str | None = None
    ) -> "StreamingMean":
        """An accumulator that has seen no rows: ``total`` zeros of ``shape``, ``count`` 0."""
        return cls._trusted(
            torch.zeros(shape, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )

    def update(
        self,
        values: Shaped[Tensor, " batch *component"],
        *,
        mask: Bool[Tensor, " batch"] | None = None,
    ) -> "StreamingMean":
        """Add a batch of per-row values shaped ``(batch, *component)``; return a new accumulator.

        The sum over the batch axis is taken in float64, and ``values`` is detached, so the
        accumulator never holds an autograd graph. With a bool ``mask``, only the rows it keeps
        are added, and ``count`` grows by their number; dropped rows may hold NaN.

        Raises:
            TypeError: ``values`` is not a real (non-complex) tensor, or ``mask`` is not bool
                (a floating mask is rejected: counts are counts).
            ValueError: ``values`` has no batch axis, its trailing shape is not ``total``'s, or
                ``mask`` is not ``(batch,)`` on ``values``' device.
        """
        if not isinstance(values, Tensor) or values.is_complex():
            raise TypeError(f"`values` must be a real tensor, got {describe(values)}.")
        if values.ndim == 0 or values.shape[1:] != self.total.shape:
            raise ValueError(
                f"`values` must have shape (batch, *{shape_str(self.total)}), "
                f"got {shape_str(values)}."
            )
        mask = check_mask(mask, values, weights_allowed=False)
        values = values.detach()
        if mask is None:
            return self._trusted(
                self.total + values.sum(0, dtype=torch.float64), self.count + values.shape[0]
            )
        keep = row_view(mask, values)
        kept = torch.where(keep, values, 0).sum(0, dtype=torch.float64)
        return self._trusted(self.total + kept, self.count + mask.sum())

    def merge(self, other: "StreamingMean") -> "StreamingMean":
        """Combine two accumulators, e.g. from two shards of the data; return a new one.

        Raises:
            TypeError: ``other`` is not a StreamingMean.
            ValueError: the two ``total`` shapes differ, or the two are on different devices.
        """
        self._check_mergeable(other)
        if other.total.shape != self.total.shape:
            raise ValueError(
                "cannot merge accumulators of different shapes, "
                f"got {shape_str(self.total)} and {shape_str(other.total)}."
            )
        return self._trusted(self.total + other.total, self.count + other.count)

    def compute(self) -> Float64[Tensor, "*component"]:
        """``total / count`` in float64; NaN when no rows were seen (no exception, no sync)."""
        return self.total / self.count
