r"""The relative reconstruction bias over a whole evaluation set, streamed exactly.

A ratio of two sums over every kept row, :math:`\sum \lVert \hat{x} \rVert^2 / \sum \langle
x, \hat{x} \rangle`, so an accumulator that :func:`all_reduce` combines with every other metric.
"""

import dataclasses

import torch
from jaxtyping import Bool, Float, Float64, Int64
from torch import Tensor

from sae_losses._accumulator import Accumulator, check_state_tensor, register_accumulator
from sae_losses._accumulator_fields import kept_rows, one_device
from sae_losses._checks import check_activations, check_same_shape, shape_str
from sae_losses._masks import check_mask
from sae_losses._row_term import row_term
from sae_losses._rowops import RowOp

__all__ = ["StreamingReconstructionBias"]


def _squared_norm_formula(decoded: Tensor, *, dtype: torch.dtype) -> Tensor:
    return decoded.to(dtype).square().sum(-1)


def _inner_product_formula(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    return (decoded.to(dtype) * source.to(dtype)).sum(-1)


SQUARED_NORM = RowOp(_squared_norm_formula, differentiable=False)
INNER_PRODUCT = RowOp(_inner_product_formula, differentiable=False)


@register_accumulator
@dataclasses.dataclass(frozen=True, eq=False)
class StreamingReconstructionBias(Accumulator):
    r"""The relative reconstruction bias over a whole set (Rajamanoharan et al. 2024, eq. 10).

    .. math::

        \gamma_c = \frac{\mathbb{E}_b \lVert \hat{x}_{b,c} \rVert_2^2}
                        {\mathbb{E}_b \langle x_{b,c}, \hat{x}_{b,c} \rangle}
                 = \frac{\sum_b \lVert \hat{x}_{b,c} \rVert_2^2}
                        {\sum_b \langle x_{b,c}, \hat{x}_{b,c} \rangle}

    over every kept row of the set: the scale :math:`\gamma` that minimises
    :math:`\mathbb{E} \lVert \hat{x} / \gamma - x \rVert^2`, so below 1 means the SAE shrinks
    its reconstructions. SAELens, SAEBench and dictionary_learning report the mean over
    batches of each batch's ratio instead (``docs/evaluation.md`` shows that recipe).

    Each row's two values are computed in the accumulation dtype (float32 for half inputs)
    and summed over rows in float64.

    Fields:
        squared_norm: ``(*component)`` float64, :math:`\sum_b \lVert \hat{x}_b \rVert^2`.
        inner_product: ``(*component)`` float64, :math:`\sum_b \langle x_b, \hat{x}_b \rangle`.
        count: ``()`` int64, rows seen.

    Laws: as :class:`StreamingMean`.

    Example:
        >>> import torch
        >>> from sae_losses import StreamingReconstructionBias
        >>> source = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
        >>> decoded = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # (1 + 9) / (2 + 12)
        >>> bias = StreamingReconstructionBias.empty()
        >>> bias = bias.update(decoded[:1], source[:1]).update(decoded[1:], source[1:])
        >>> bias.compute()  # the mean of the per-batch ratios would be (1/2 + 9/12) / 2
        tensor(0.7143, dtype=torch.float64)
    """

    squared_norm: Float64[Tensor, "*component"]
    inner_product: Float64[Tensor, "*component"]
    count: Int64[Tensor, ""]

    def _check_metadata(self) -> None:
        squared_norm = check_state_tensor("squared_norm", self.squared_norm, torch.float64, None)
        inner = check_state_tensor("inner_product", self.inner_product, torch.float64, None)
        check_state_tensor("count", self.count, torch.int64, 0)
        if squared_norm.shape != inner.shape:
            raise ValueError(
                "`squared_norm` and `inner_product` must have one shape, "
                f"got {shape_str(squared_norm)} and {shape_str(inner)}."
            )
        one_device(self, (squared_norm, inner, self.count))

    @classmethod
    def empty(
        cls, shape: tuple[int, ...] = (), *, device: torch.device | str | None = None
    ) -> "StreamingReconstructionBias":
        """An accumulator that has seen no rows, for inputs shaped ``(batch, *shape, feature)``."""
        zeros = torch.zeros(shape, dtype=torch.float64, device=device)
        return cls._trusted(zeros, zeros.clone(), torch.zeros((), dtype=torch.int64, device=device))

    def update(
        self,
        decoded: Float[Tensor, "batch *component feature"],
        source: Float[Tensor, "batch *component feature"],
        *,
        mask: Bool[Tensor, " batch"] | None = None,
    ) -> "StreamingReconstructionBias":
        """Add a batch of rows (detached); return a new accumulator.

        With a bool ``mask`` only the rows it keeps count; dropped rows may hold NaN.

        Raises:
            TypeError: an input is not a floating-point tensor, or ``mask`` is not bool.
            ValueError: the shapes differ, are not ``(batch, *shape, feature)`` for this
                accumulator's ``shape``, or ``mask`` is not ``(batch,)`` on the inputs' device.
        """
        decoded = check_activations("decoded", decoded)
        source = check_activations("source", source)
        check_same_shape("`decoded` and `source`", decoded, source)
        if source.shape[1:-1] != self.squared_norm.shape:
            raise ValueError(
                f"`source` must have shape (batch, *{shape_str(self.squared_norm)}, feature), "
                f"got {shape_str(source)}."
            )
        keep = check_mask(mask, source, weights_allowed=False)
        squares = row_term(SQUARED_NORM, (decoded,), reduce="none", mask=keep)
        inner = row_term(INNER_PRODUCT, (decoded, source), reduce="none", mask=keep)
        return self._trusted(
            self.squared_norm + squares.sum(0, dtype=torch.float64),
            self.inner_product + inner.sum(0, dtype=torch.float64),
            self.count + kept_rows(keep, source),
        )

    def merge(self, other: "StreamingReconstructionBias") -> "StreamingReconstructionBias":
        """Combine two accumulators; return a new one.

        Raises:
            TypeError: ``other`` is not a StreamingReconstructionBias.
            ValueError: the two shapes differ, or the two are on different devices.
        """
        self._check_mergeable(other)
        if other.squared_norm.shape != self.squared_norm.shape:
            raise ValueError(
                "cannot merge accumulators of different shapes, "
                f"got {shape_str(self.squared_norm)} and {shape_str(other.squared_norm)}."
            )
        return self._trusted(
            self.squared_norm + other.squared_norm,
            self.inner_product + other.inner_product,
            self.count + other.count,
        )

    def compute(self) -> Float64[Tensor, "*component"]:
        """:math:`\\gamma` over every row seen, float64 ``(*component)``; NaN before any row."""
        return self.squared_norm / self.inner_product
