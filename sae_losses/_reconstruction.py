"""The L2 reconstruction error: a formula, an eager kernel and its gradient, and one row term.

It takes ``decoded`` and ``source`` shaped ``(batch, *component, feature)``, identical shapes.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._checks import Reduce, check_pair
from sae_losses._row_term import row_term
from sae_losses._rowops import EAGER, Gradients, RowOp, Strategy, Tensors

__all__ = ["L2", "difference_in", "l2_loss", "l2_reconstruction"]


def difference_in(decoded: Tensor, source: Tensor, dtype: torch.dtype) -> Tensor:
    """``decoded - source`` computed in ``dtype`` (a fresh tensor the caller may modify)."""
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
    return difference_in(decoded, source, dtype).square_().mean(-1)


def _l2_gradients(
    inputs: Tensors, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Gradients:
    """d/d(decoded) = 2 (decoded - source) / F times the upstream, in the accumulation dtype."""
    decoded, source = inputs
    assert decoded is not None
    assert source is not None
    scale = grad_rows.unsqueeze(-1) * (2.0 / decoded.shape[-1])
    grad = difference_in(decoded, source, dtype).mul_(scale)
    return (
        grad.to(decoded.dtype) if needs[0] else None,
        grad.neg().to(source.dtype) if needs[1] else None,
    )


L2 = RowOp(_l2_formula, _l2_kernel, _l2_gradients)


def l2_loss(
    decoded: object, source: object, reduce: object, mask: object, strategy: Strategy = EAGER
) -> Tensor:
    """The checked per-row L2 through the shared mechanism, eager or fused (``strategy``).

    The arguments are typed ``object`` because this is where unchecked input is checked.
    """
    decoded, source = check_pair(decoded, source)
    return row_term(L2, (decoded, source), reduce=reduce, mask=mask, strategy=strategy)


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
          when they hold NaN or Inf. Weights are used as given, signs included: ``"mean"``
          divides by their sum, and is NaN whenever that sum is 0. The mask gets no gradient.
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
