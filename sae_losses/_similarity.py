"""Similarity per row: the cosine of the angle between x̂ and x.

It is exact at any magnitude the inputs' dtype holds, through the scaled rows and float64 norms
of :mod:`sae_losses._pair_norms` (whose docs say how): ``torch.nn.functional.cosine_similarity``
gives 0 for two equal float32 rows of ``1e20`` and ``2e-34`` for two equal rows of ``1e-25``,
where this gives 1.
"""

import torch
from jaxtyping import Float
from torch import Tensor
from torch.linalg import vecdot

from sae_losses._checks import Reduce, check_pair
from sae_losses._masks import Mask
from sae_losses._pair_norms import pair_gradients, pair_rows, scaled_rows
from sae_losses._row_term import row_term
from sae_losses._rowops import RowOp

__all__ = ["COSINE", "cosine_similarity"]


def _cosine_formula(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    d, _, d_zero = scaled_rows(decoded, dtype)
    s, _, s_zero = scaled_rows(source, dtype)
    undefined = d_zero | s_zero
    # Each scaled squared norm lies in [1, feature]: the product cannot overflow.
    norms = d.square().sum(-1) * s.square().sum(-1)
    cosine = (d * s).sum(-1) * torch.where(undefined, 1, norms).rsqrt()
    return torch.where(undefined, torch.nan, cosine)


def _wide_cosine(d: Tensor, s: Tensor, d_norm: Tensor, s_norm: Tensor) -> Tensor:
    norms = d_norm * s_norm
    return torch.where(norms > 0, d.mul_(s).sum(-1) / norms, torch.nan)


def _cosine_rows(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    return pair_rows(decoded, source, dtype, _cosine_formula, _wide_cosine)


def _cosine_coefficients(
    d: Tensor, s: Tensor, d_norm: Tensor, s_norm: Tensor, g: Tensor
) -> tuple[Tensor, ...]:
    """d cos / d x̂ = x / (‖x̂‖‖x‖) - cos x̂ / ‖x̂‖², and symmetrically; 0 where cos is NaN."""
    defined = (d_norm > 0) & (s_norm > 0)
    d_norm, s_norm = torch.where(defined, d_norm, 1), torch.where(defined, s_norm, 1)
    unit = torch.where(defined, g / (d_norm * s_norm), 0)
    cosine = vecdot(d, s) * unit
    return -cosine / d_norm.square(), unit, unit, -cosine / s_norm.square()


COSINE = RowOp(
    _cosine_formula,
    _cosine_rows,
    pair_gradients(_cosine_formula, _cosine_coefficients),
    blocks_itself=True,
)


def cosine_similarity(
    decoded: Float[Tensor, "batch *component feature"],
    source: Float[Tensor, "batch *component feature"],
    *,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""The cosine of the angle between each reconstruction and its source row.

    .. math::

        \ell_{b,c} = \frac{\langle \hat{x}_{b,c}, x_{b,c} \rangle}
                          {\lVert \hat{x}_{b,c} \rVert_2 \, \lVert x_{b,c} \rVert_2}

    then ``mask`` and ``reduce`` over the batch axis as in :func:`l2_reconstruction`. SAELens's
    and SAEBench's ``cossim`` is this value's mean over every kept token of the evaluation set:
    stream ``reduce="none"`` into a :class:`StreamingMean`. dictionary_learning's ``cossim`` is
    the mean over batches of each batch's mean.

    A zero row (of ``decoded`` or of ``source``) has no angle: its value is NaN, as in the peers.
    Mask such rows out (``mask=source.abs().amax(-1) > 0``); masked rows are inert even when
    they hold NaN or Inf. A kept row holding Inf or NaN gives NaN. The value and its gradients
    are exact at any magnitude (see the module docs), and only the inputs are saved for
    backward. Gradients flow to both inputs.

    Shapes:
        - ``decoded``, ``source``: ``(batch, *component, feature)``, identical shapes.
        - ``mask``: ``(batch,)``, bool or floating row weights, as in :func:`l2_reconstruction`.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise, in the
          accumulation dtype (float32 for half inputs).

    Raises:
        TypeError: an input is not a floating-point tensor, or ``mask`` is neither bool nor
            floating.
        ValueError: the shapes differ, an input has fewer than 2 dimensions or no features,
            ``mask`` is not ``(batch,)``, or ``reduce`` is not one of the modes.

    Example:
        >>> import torch
        >>> from sae_losses import cosine_similarity
        >>> source = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
        >>> decoded = torch.tensor([[2.0, 0.0], [4.0, -3.0], [1.0, 1.0]])
        >>> cosine_similarity(decoded, source, reduce="none")  # parallel, orthogonal, undefined
        tensor([1., 0., nan])
        >>> cosine_similarity(decoded, source, mask=source.abs().amax(-1) > 0)
        tensor(0.5000)
    """
    decoded, source = check_pair(decoded, source)
    return row_term(COSINE, (decoded, source), reduce=reduce, mask=mask)
