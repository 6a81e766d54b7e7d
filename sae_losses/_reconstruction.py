"""Reconstruction terms: the L2 reconstruction error and the batch fraction of variance unexplained.

Both take ``decoded`` and ``source`` shaped ``(batch, *component, feature)``, identical shapes,
and run through the shared row-op mechanism of :mod:`sae_losses._rowops`.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._checks import (
    Reduce,
    accumulation_dtype,
    check_activations,
    check_reduce,
    check_same_shape,
)
from sae_losses._masks import check_mask
from sae_losses._rowops import EAGER, Grads, Kernels, Params, RowOp, reduce_rows, row_values

__all__ = ["L2", "fraction_of_variance_unexplained", "l2_loss", "l2_reconstruction"]


def _difference(decoded: Tensor, source: Tensor, dtype: torch.dtype) -> Tensor:
    # If either input already has the accumulation dtype, torch's promotion computes in it.
    if dtype in (decoded.dtype, source.dtype):
        return torch.sub(decoded, source)
    # Two half-precision inputs are subtracted in float32, not rounded to half first.
    return decoded.to(dtype).sub_(source)


def _l2_formula(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    return (decoded.to(dtype) - source.to(dtype)).square().mean(-1)


_NO_REDUCTION = 0  # torch's enum value for reduction="none"


def _l2_kernel(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    # mse_loss squares while it subtracts: one pass fewer than sub, square, mean. The mean is a
    # cascade sum, accurate to ~1e-8 relative at 2^20 features (vector_norm's sum is not). The
    # aten op is called directly: F.mse_loss's Python wrapper costs more than 8 x 16 inputs.
    if decoded.dtype == source.dtype == dtype:
        return torch._C._nn.mse_loss(decoded, source, _NO_REDUCTION).mean(-1)  # type: ignore[arg-type]
    return _difference(decoded, source, dtype).square_().mean(-1)


def _l2_grads(
    tensors: Params, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Grads:
    """d/d(decoded) = 2 (decoded - source) / F times the upstream, in the accumulation dtype."""
    decoded, source = tensors
    assert decoded is not None
    assert source is not None
    scale = grad_rows.unsqueeze(-1) * (2.0 / decoded.shape[-1])
    grad = _difference(decoded, source, dtype).mul_(scale)
    return (
        grad.to(decoded.dtype) if needs[0] else None,
        grad.neg().to(source.dtype) if needs[1] else None,
    )


L2 = RowOp("l2_reconstruction", _l2_formula, _l2_kernel, _l2_grads)


def _squared_deviation(source: Tensor, mean: Tensor, *, dtype: torch.dtype) -> Tensor:
    return (source.to(dtype) - mean).square().sum(-1)


SQUARED_DEVIATION = RowOp("squared_deviation", _squared_deviation)


def l2_loss(
    decoded: object,
    source: object,
    reduce: object,
    mask: object,
    kernels: Kernels = EAGER,
) -> Tensor:
    """Check the arguments, then the per-row L2 through the shared mechanism (eager or fused).

    The arguments are typed ``object`` because this is where unchecked input is checked.
    """
    decoded = check_activations("decoded", decoded)
    source = check_activations("source", source)
    check_same_shape("`decoded` and `source`", decoded, source)
    reduce = check_reduce(reduce)
    mask = check_mask(mask, decoded)
    dtype = accumulation_dtype(decoded.dtype, source.dtype)
    rows = row_values(L2, (decoded, source), dtype=dtype, mask=mask, kernels=kernels)
    return reduce_rows(rows, reduce, mask)


def l2_reconstruction(
    decoded: Float[Tensor, "batch *component feature"],
    source: Float[Tensor, "batch *component feature"],
    *,
    reduce: Reduce = "mean",
    mask: Bool[Tensor, " batch"] | Float[Tensor, " batch"] | None = None,
) -> Float[Tensor, "..."]:
    r"""Reconstruction error: the mean over features of the squared error, per row.

    .. math::

        \ell_{b,c} = \frac{1}{F} \sum_{f=1}^{F} (\hat{x}_{b,c,f} - x_{b,c,f})^2

    and then ``reduce`` over the batch axis ``b`` only, with row weights :math:`w_b` from
    ``mask`` (1 without one): ``"none"`` returns :math:`w_b \ell_{b,c}`, ``"sum"`` returns
    :math:`\sum_b w_b \ell_{b,c}` and ``"mean"`` returns
    :math:`\sum_b w_b \ell_{b,c} / \sum_b w_b`. (``reduce`` is a string here; in ``torch.nn``
    losses the string option is called ``reduction``.)

    This is the mean over features, as in the ``sparse_autoencoder`` library. SAELens and
    ``dictionary_learning`` sum over features instead; multiply by ``decoded.shape[-1]`` to get
    that convention.

    Shapes:
        - ``decoded``, ``source``: ``(batch, *component, feature)``, identical shapes.
        - ``mask``: ``(batch,)``, bool (rows to keep) or floating (row weights). Rows with weight
          0 are exactly 0 in ``"none"`` and contribute nothing to any value or gradient, even
          when they hold NaN or Inf. The mask gets no gradient.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise
          (a 0-d tensor for 2-D inputs).

    Half-precision inputs are accumulated in float32 and give a float32 result; float32 and
    float64 stay as they are. An empty batch (or a mask with weights summing to 0) gives an
    empty ``"none"`` result, zeros for ``"sum"`` and NaN for ``"mean"``, like ``torch.mean``.

    Raises:
        TypeError: an input is not a floating-point tensor, or ``mask`` is neither bool nor
            floating.
        ValueError: the shapes differ (there is no broadcasting), an input has fewer than 2
            dimensions or no features, ``reduce`` is not one of the three modes, or ``mask``
            is not ``(batch,)`` on the inputs' device.

    Example:
        >>> import torch
        >>> from sae_losses import l2_reconstruction
        >>> source = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])  # (batch=2, component=1, feature=2)
        >>> decoded = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
        >>> l2_reconstruction(decoded, source, reduce="none")  # (4 + 4) / 2 and (4 + 0) / 2
        tensor([[4.],
                [2.]])
        >>> l2_reconstruction(decoded, source)
        tensor([3.])
        >>> l2_reconstruction(decoded, source, mask=torch.tensor([True, False]))
        tensor([4.])
    """
    return l2_loss(decoded, source, reduce, mask)


def _masked_mean(source: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    if keep is None:
        return source.sum(0, dtype=dtype) / source.shape[0]
    view = keep.reshape(keep.shape + (1,) * (source.ndim - 1))
    return torch.where(view, source, 0).sum(0, dtype=dtype) / keep.sum(dtype=dtype)


def fraction_of_variance_unexplained(
    decoded: Float[Tensor, "batch *component feature"],
    source: Float[Tensor, "batch *component feature"],
    *,
    mask: Bool[Tensor, " batch"] | None = None,
) -> Float[Tensor, "*component"]:
    r"""The batch's fraction of variance unexplained (FVU), per component.

    .. math::

        \text{FVU}_c = \frac{\sum_b \sum_f (\hat{x}_{b,c,f} - x_{b,c,f})^2}
                            {\sum_b \sum_f (x_{b,c,f} - \bar{x}_{c,f})^2},
        \qquad \bar{x}_{c,f} = \frac{1}{B} \sum_b x_{b,c,f}

    over the rows ``mask`` keeps (all rows without one). Explained variance is ``1 - FVU``. The
    variance is taken about this batch's mean, in two passes (mean first), so a large offset
    such as a massive-activation dimension does not cancel. For the FVU of a whole evaluation
    set, stream it with :class:`StreamingFVU`, which uses the mean of every row.

    It is differentiable in ``decoded`` and ``source`` (sparsify trains on this loss; AuxK losses
    normalise by it), and saves nothing of size ``batch x feature`` beyond the inputs.

    Shapes:
        - ``decoded``, ``source``: ``(batch, *component, feature)``, identical shapes.
        - ``mask``: ``(batch,)`` bool; masked rows may hold NaN.
        - result: ``(*component)``, in the accumulation dtype (float32 for half inputs).

    Edge cases: NaN when fewer than 2 rows count; ``+inf`` when the source has zero variance but
    the error is positive (and NaN when both are 0).

    Raises:
        TypeError: an input is not a floating-point tensor, or ``mask`` is not bool.
        ValueError: the shapes differ, an input has fewer than 2 dimensions or no features,
            or ``mask`` is not ``(batch,)`` on the inputs' device.

    Example:
        >>> import torch
        >>> from sae_losses import fraction_of_variance_unexplained
        >>> source = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # mean (2, 2): variance 1+4+1+4 = 10
        >>> decoded = torch.tensor([[1.0, 1.0], [3.0, 3.0]])  # squared error 1 + 1 = 2
        >>> fraction_of_variance_unexplained(decoded, source)
        tensor(0.2000)
    """
    check_activations("decoded", decoded)
    check_activations("source", source)
    check_same_shape("`decoded` and `source`", decoded, source)
    mask = check_mask(mask, decoded, weights_allowed=False)
    dtype = accumulation_dtype(decoded.dtype, source.dtype)
    keep = None if mask is None else mask.detach()
    error = reduce_rows(row_values(L2, (decoded, source), dtype=dtype, mask=keep), "sum", keep)
    mean = _masked_mean(source, keep, dtype)
    deviation = row_values(SQUARED_DEVIATION, (source,), (mean,), dtype=dtype, mask=keep)
    variance = reduce_rows(deviation, "sum", keep)
    rows = torch.ones_like(source[:, ..., 0], dtype=dtype) if keep is None else keep.to(dtype)
    enough = rows.sum(0) >= 2
    return torch.where(enough, error * source.shape[-1] / variance, torch.nan)
