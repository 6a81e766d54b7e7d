"""The L0 norm: the number of features per row whose magnitude is above a threshold.

A formula, an eager counting kernel and a docstring; :func:`sae_losses._row_term.row_term` does the
rest (blocks, mask, reduce). The count has no gradient. ``l0_loss`` takes the strategy, for the
fused twin.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sae_losses._checks import Reduce, check_activations, check_non_negative_float
from sae_losses._masks import Mask
from sae_losses._row_term import row_term
from sae_losses._rowops import EAGER, RowOp, Strategy

__all__ = ["L0", "l0_loss", "l0_norm"]


def _l0_formula(learned: Tensor, *, dtype: torch.dtype, threshold: float) -> Tensor:
    return (learned.abs() > threshold).sum(-1, dtype=dtype)


def _l0_kernel(learned: Tensor, *, dtype: torch.dtype, threshold: float) -> Tensor:
    # The comparison writes 0/1 into the |z| block in place, and a float sum counts them: a bool
    # block and count_nonzero (or a bool sum) cost about 2.5x more on the CPU. NaN > t is false,
    # so NaN is not counted, as in the formula.
    return learned.abs().gt_(threshold).sum(-1, dtype=dtype)


L0 = RowOp(_l0_formula, _l0_kernel, differentiable=False)


def _largest_value_at_most(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value <= ``threshold``, so ``|z| > it`` holds iff ``|z| > threshold``.

    A Python threshold compared with a half tensor is rounded to half first: 0.3 becomes
    0.30078125 in bfloat16, and a bfloat16 0.30078125 would no longer count as above 0.3.
    """
    rounded = torch.tensor(threshold, dtype=dtype)
    if rounded.item() > threshold:
        rounded = torch.nextafter(rounded, torch.tensor(-float("inf"), dtype=dtype))
    return float(rounded.item())


def l0_loss(
    learned: object, threshold: object, reduce: object, mask: object, strategy: Strategy = EAGER
) -> Tensor:
    """The checked per-row L0 through the shared mechanism, eager or fused (``strategy``)."""
    learned = check_activations("learned", learned)
    threshold = check_non_negative_float("threshold", threshold)
    options = {"threshold": _largest_value_at_most(threshold, learned.dtype)}
    return row_term(L0, (learned,), reduce=reduce, mask=mask, options=options, strategy=strategy)


def l0_norm(
    learned: Float[Tensor, "batch *component feature"],
    *,
    threshold: float | int = 0.0,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""The number of active features per row: :math:`\#\{f : |z_f| > \text{threshold}\}`.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} \mathbb{1}\big[|z_{b,c,f}| > \text{threshold}\big]

    then ``mask`` and ``reduce`` as in :func:`l2_reconstruction`. The count is returned in the
    accumulation dtype (float32 for float32 and half inputs, float64 for float64), so it can be
    averaged and streamed. It has no gradient: the result does not require grad. For a
    trainable L0, use :func:`jumprelu_l0`.

    Shapes: as :func:`l1_absolute`, without ``weight``.

    Raises:
        ValueError: ``threshold`` is negative or not a Python number, and the errors of
            :func:`l1_absolute`.

    Example:
        >>> import torch
        >>> from sae_losses import l0_norm
        >>> learned = torch.tensor([[0.0, 0.5, -2.0], [0.0, 0.0, 0.1]])
        >>> l0_norm(learned, reduce="none")
        tensor([2., 1.])
        >>> l0_norm(learned, threshold=1.0, reduce="sum")
        tensor(1.)
    """
    return l0_loss(learned, threshold, reduce, mask)
