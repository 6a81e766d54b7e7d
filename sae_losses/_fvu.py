"""The fraction of variance unexplained of a batch, and the masked sums other ratio terms share.

The batch FVU is a ratio of two sums over the kept rows: the squared error over the squared
deviation about the kept rows' mean (:func:`sae_losses._batch_moments.kept_mean`). It reads
``source`` twice: once for the mean, then once for both sums, one
:func:`sae_losses._row_term.row_term` with two values per row, so it saves only the inputs for
backward.
Other ratio terms (the AuxK loss normalises by the same variance) reuse :func:`fvu_sums` and
:func:`ratio_of_sums`.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._batch_moments import kept_mean
from sae_losses._checks import accumulation_dtype, check_pair
from sae_losses._masks import check_mask
from sae_losses._reconstruction import difference_in
from sae_losses._row_term import row_term
from sae_losses._rowops import EAGER, Gradients, RowOp, Strategy, Tensors

__all__ = [
    "ERROR_AND_DEVIATION",
    "fraction_of_variance_unexplained",
    "fvu_sums",
    "ratio_of_sums",
]


def _error_and_deviation(
    decoded: Tensor, source: Tensor, mean: Tensor, *, dtype: torch.dtype
) -> Tensor:
    s = source.to(dtype)
    error = (decoded.to(dtype) - s).square().sum(-1)
    return torch.stack((error, (s - mean).square().sum(-1)), -1)


_NO_REDUCTION = 0  # torch's enum value for reduction="none"


def _squares_into(out: Tensor, input: Tensor, target: Tensor) -> Tensor:
    """``(input - target)^2`` written into ``out``: mse_loss squares while it subtracts."""
    mse = torch._C._nn.mse_loss
    return mse(input, target, _NO_REDUCTION, out=out)  # type: ignore[arg-type, call-arg]


def _error_and_deviation_kernel(
    decoded: Tensor, source: Tensor, mean: Tensor, *, dtype: torch.dtype
) -> Tensor:
    # Both squares go through one temporary per block of rows.
    if decoded.dtype == source.dtype == dtype:
        squares = torch.empty_like(source)
        error = _squares_into(squares, decoded, source).sum(-1)
        deviation = _squares_into(squares, source, mean.expand_as(source)).sum(-1)
        return torch.stack((error, deviation), -1)
    squares = difference_in(decoded, source, dtype)
    error = squares.square_().sum(-1)
    return torch.stack((error, torch.sub(source, mean, out=squares).square_().sum(-1)), -1)


def _error_and_deviation_gradients(
    inputs: Tensors, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Gradients:
    """d/d(decoded) = 2 (d - s) g_e; d/d(source) = 2 (s - mean) g_v - 2 (d - s) g_e."""
    decoded, source, mean = inputs
    assert decoded is not None
    assert source is not None
    assert mean is not None
    error_scale, deviation_scale = (2 * grad_rows).unsqueeze(-2).unbind(-1)
    # Nothing autograd saved is modified in place, so a double backward can run through this.
    scaled = difference_in(decoded, source, dtype).mul_(error_scale)
    grad_source = None
    if needs[1]:
        grad_source = torch.sub(source, mean).mul_(deviation_scale).sub_(scaled)
        grad_source = grad_source.to(source.dtype)
    return scaled.to(decoded.dtype) if needs[0] else None, grad_source, None


# Per row: the squared error and the squared deviation about a given (detached) mean, in one
# pass over ``decoded`` and ``source``.
ERROR_AND_DEVIATION = RowOp(
    _error_and_deviation, _error_and_deviation_kernel, _error_and_deviation_gradients
)


def fvu_sums(
    decoded: Tensor, source: Tensor, mask: object, *, strategy: Strategy = EAGER
) -> tuple[Tensor, Tensor, Tensor | int]:
    """The FVU's numerator and denominator, ``(*component)``, and the number of kept rows.

    Two passes over ``source``: the mean of the kept rows, then the squared error and the
    squared deviations about that mean together (one row term). The mean is detached: the
    derivative of the sum of squared deviations with respect to the mean is exactly 0 (the
    deviations sum to 0), so it sends no gradient. ``strategy`` is the row term's: eager or
    fused.
    """
    checked = check_mask(mask, decoded, weights_allowed=False)
    dtype = accumulation_dtype(decoded.dtype, source.dtype)
    mean = kept_mean(source, checked, dtype)
    sums = row_term(
        ERROR_AND_DEVIATION,
        (decoded, source),
        (mean,),
        reduce="sum",
        mask=checked,
        strategy=strategy,
    )
    count = source.shape[0] if checked is None else checked.sum()
    return sums[..., 0], sums[..., 1], count


def ratio_of_sums(
    numerator: Tensor, denominator: Tensor, count: Tensor | int, *, at_least: int = 2
) -> Tensor:
    """``numerator / denominator`` where ``count >= at_least`` rows count, NaN elsewhere.

    The denominator is replaced by 1 where the result is NaN, so no ``0 * inf`` gradient leaks.
    """
    if isinstance(count, int):
        if count >= at_least:
            return numerator / denominator
        # NaN, but still a function of the inputs: backward gives them 0, not an error.
        never = torch.zeros((), dtype=torch.bool, device=numerator.device)
        return torch.where(never, numerator, torch.nan)
    enough = count >= at_least
    return torch.where(enough, numerator / torch.where(enough, denominator, 1), torch.nan)


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
    decoded, source = check_pair(decoded, source)
    error, variance, count = fvu_sums(decoded, source, mask)
    return ratio_of_sums(error, variance, count)
