r"""StreamingFVU: the fraction of variance unexplained over every row of an evaluation stream.

It keeps Chan et al.'s sufficient statistics per component and feature: the row count, the mean
and ``M2``, the sum of squared deviations about that mean, plus the summed squared error. Each
batch's statistics are computed in float64, each block of rows about its own mean (see
:func:`sae_losses._batch_moments.batch_state`), then merged with Chan's parallel update

.. math::

    n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad \mu = \mu_a + \delta \frac{n_b}{n},
    \quad M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n}

which never subtracts two large sums, so a feature offset of 10^4 or 10^6 loses no digits. A
one-pass :math:`\sum x^2 - (\sum x)^2 / n` would lose :math:`\log_{10}(\text{offset}^2/\sigma^2)`
of them. Across ranks, :func:`all_reduce` gathers every rank's state and merges them in rank
order, the same way.
"""

import dataclasses

import torch
from jaxtyping import Bool, Float, Float64, Int64
from torch import Tensor

from sae_losses._accumulator import Accumulator, check_state_tensor, register_accumulator
from sae_losses._batch_moments import batch_state
from sae_losses._checks import check_activations, check_same_shape, shape_str
from sae_losses._masks import check_mask

__all__ = ["StreamingFVU"]


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
        return self.merge(self._trusted(*batch_state(decoded, source, mask)))

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
