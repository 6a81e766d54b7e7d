"""Shrinkage per row: the norm ratio ‖x̂‖ / ‖x‖, below 1 on average when an SAE shrinks.

It is exact at any magnitude the inputs' dtype holds, through the scaled rows and float64 norms
of :mod:`sae_losses._pair_norms`, as the cosine similarity is.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sae_losses._checks import Reduce, check_pair
from sae_losses._masks import Mask
from sae_losses._pair_norms import pair_gradients, pair_rows, scaled_rows
from sae_losses._row_term import row_term
from sae_losses._rowops import RowOp

__all__ = ["NORM_RATIO", "l2_norm_ratio"]


def _norm_ratio_formula(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    d, d_scale, d_zero = scaled_rows(decoded, dtype)
    s, s_scale, s_zero = scaled_rows(source, dtype)
    either = d_zero | s_zero
    # Safe denominators and square roots: the branches where() leaves out still get gradients.
    squares = d.square().sum(-1) / torch.where(either, 1, s.square().sum(-1))
    ratio = d_scale / torch.where(either, 1, s_scale) * torch.where(either, 1, squares).sqrt()
    edge = torch.where(s_zero, torch.where(d_zero, torch.nan, torch.inf), 0.0)
    return torch.where(either, edge.to(dtype), ratio)


def _wide_norm_ratio(d: Tensor, s: Tensor, d_norm: Tensor, s_norm: Tensor) -> Tensor:
    # A row holding Inf is NaN, as in the formula (whose scale is then Inf).
    return torch.where(d_norm.isinf() | s_norm.isinf(), torch.nan, d_norm / s_norm)


def _norm_ratio_rows(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    return pair_rows(decoded, source, dtype, _norm_ratio_formula, _wide_norm_ratio)


def _norm_ratio_coefficients(
    d: Tensor, s: Tensor, d_norm: Tensor, s_norm: Tensor, g: Tensor
) -> tuple[Tensor, ...]:
    """d r / d x̂ = x̂ / (‖x̂‖‖x‖), d r / d x = -r x / ‖x‖²; 0 where a row is zero."""
    defined = (d_norm > 0) & (s_norm > 0)
    d_norm, s_norm = torch.where(defined, d_norm, 1), torch.where(defined, s_norm, 1)
    unit = torch.where(defined, g / (d_norm * s_norm), 0)
    zero = torch.zeros_like(unit)
    return unit, zero, zero, -unit * d_norm.square() / s_norm.square()


NORM_RATIO = RowOp(
    _norm_ratio_formula,
    _norm_ratio_rows,
    pair_gradients(_norm_ratio_formula, _norm_ratio_coefficients),
    blocks_itself=True,
)


def l2_norm_ratio(
    decoded: Float[Tensor, "batch *component feature"],
    source: Float[Tensor, "batch *component feature"],
    *,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""Shrinkage per row: the norm of the reconstruction over the norm of its source.

    .. math::

        \ell_{b,c} = \frac{\lVert \hat{x}_{b,c} \rVert_2}{\lVert x_{b,c} \rVert_2}

    then ``mask`` and ``reduce`` as in :func:`l2_reconstruction`. Below 1 on average, the SAE
    shrinks its reconstructions (the L1 penalty's bias; Wright & Sharkey 2024, Rajamanoharan et
    al. 2024). A zero source row gives ``+inf``, or NaN when ``decoded`` is zero too; mask such
    rows out. SAELens's and SAEBench's ``l2_ratio`` instead divide by 1 where
    :math:`\lVert x \rVert < 10^{-4}`: see ``docs/evaluation.md`` for that recipe.
    dictionary_learning's ``l2_ratio`` is this value's mean per batch, averaged over batches.
    A kept row holding Inf or NaN gives NaN. Exact at any magnitude, as
    :func:`cosine_similarity`; gradients flow to both inputs.

    Shapes: as :func:`cosine_similarity`.

    Raises:
        TypeError, ValueError: as :func:`cosine_similarity`.

    Example:
        >>> import torch
        >>> from sae_losses import l2_norm_ratio
        >>> source = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
        >>> decoded = torch.tensor([[0.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
        >>> l2_norm_ratio(decoded, source, reduce="none")  # 4 / 5, 0 / 1, 1 / 0
        tensor([0.8000, 0.0000,    inf])
        >>> l2_norm_ratio(decoded, source, mask=torch.tensor([True, True, False]))
        tensor(0.4000)
    """
    decoded, source = check_pair(decoded, source)
    return row_term(NORM_RATIO, (decoded, source), reduce=reduce, mask=mask)
