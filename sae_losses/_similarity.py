"""Shrinkage and similarity per row: the cosine of x̂ and x, and the norm ratio ‖x̂‖ / ‖x‖.

Both are exact at any magnitude the inputs' dtype holds, where the textbook formulas overflow or
underflow: ``torch.nn.functional.cosine_similarity`` gives 0 for two equal float32 rows of
``1e20`` (their squares overflow) and ``2e-34`` for two equal rows of ``1e-25`` (they underflow),
where these give 1.

- The eager kernels and gradients compute float32 and half inputs in float64, a block of rows at
  a time: the square of any float32 value is finite and normal there.
- The formula (under ``torch.compile`` and ``torch.func``, and for float64 inputs) first divides
  each row by its largest absolute entry. Neither value depends on that positive scale, so it is
  detached, and the gradient is still exact.
"""

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from torch.linalg import vecdot, vector_norm

from sae_losses._checks import Reduce, check_pair
from sae_losses._penalties import Mask
from sae_losses._rowops import (
    EAGER,
    Gradients,
    RowOp,
    RowSpec,
    Tensors,
    formula_gradients,
    row_blocks,
    row_term,
)

__all__ = ["cosine_similarity", "l2_norm_ratio"]

# Per-row coefficients (a, b, c, e) of the gradients d a + s b (to decoded) and d c + s e (to
# source), from the float64 rows d, s, their norms and the upstream gradient g.
Coefficients = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, ...]]


def _scaled_rows(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``x / max_f |x_f|`` per row, that scale ``(batch, *component)``, and where it is 0."""
    x = x.to(dtype)
    scale = x.detach().abs().amax(-1)
    zero = scale == 0
    return x / torch.where(zero, 1, scale).unsqueeze(-1), scale, zero


def _wide_norms(decoded: Tensor, source: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d, s = decoded.to(torch.float64), source.to(torch.float64)
    return d, s, vector_norm(d, dim=-1), vector_norm(s, dim=-1)


def _pair_gradients(
    formula: Callable[..., Tensor], coefficients: Coefficients
) -> Callable[[Tensors, Tensor, torch.dtype, tuple[bool, ...]], Gradients]:
    """Blocked float64 gradients of a term of ``(decoded, source)`` from its coefficients."""
    plain = RowOp(formula)

    def gradients(
        inputs: Tensors, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
    ) -> Gradients:
        # float64 inputs have no wider dtype; a double backward needs differentiable gradients.
        if dtype == torch.float64 or torch.is_grad_enabled():
            return formula_gradients(RowSpec(plain, 2, dtype, {}, EAGER), inputs, grad_rows, needs)
        decoded, source = inputs
        assert decoded is not None
        assert source is not None
        grads = [
            torch.empty_like(x) if need else None
            for x, need in zip((decoded, source), needs, strict=True)
        ]
        for block in row_blocks(decoded):
            d, s, d_norm, s_norm = _wide_norms(decoded[block], source[block])
            g = grad_rows[block].to(torch.float64)
            a, b, c, e = (k.unsqueeze(-1) for k in coefficients(d, s, d_norm, s_norm, g))
            for grad, (k_d, k_s) in zip(grads, ((a, b), (c, e)), strict=True):
                if grad is not None:
                    grad[block] = d * k_d + s * k_s
        return tuple(grads)

    return gradients


def _cosine_formula(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    d, _, d_zero = _scaled_rows(decoded, dtype)
    s, _, s_zero = _scaled_rows(source, dtype)
    undefined = d_zero | s_zero
    # Each scaled squared norm lies in [1, feature]: the product cannot overflow.
    norms = d.square().sum(-1) * s.square().sum(-1)
    cosine = (d * s).sum(-1) * torch.where(undefined, 1, norms).rsqrt()
    return torch.where(undefined, torch.nan, cosine)


def _cosine_rows(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float64:
        return _cosine_formula(decoded, source, dtype=dtype)
    d, s, d_norm, s_norm = _wide_norms(decoded, source)
    norms = d_norm * s_norm
    return torch.where(norms > 0, vecdot(d, s) / norms, torch.nan).to(dtype)


def _cosine_coefficients(
    d: Tensor, s: Tensor, d_norm: Tensor, s_norm: Tensor, g: Tensor
) -> tuple[Tensor, ...]:
    """d cos / d x̂ = x / (‖x̂‖‖x‖) - cos x̂ / ‖x̂‖², and symmetrically; 0 where cos is NaN."""
    defined = (d_norm > 0) & (s_norm > 0)
    d_norm, s_norm = torch.where(defined, d_norm, 1), torch.where(defined, s_norm, 1)
    unit = torch.where(defined, g / (d_norm * s_norm), 0)
    cosine = vecdot(d, s) * unit
    return -cosine / d_norm.square(), unit, unit, -cosine / s_norm.square()


def _norm_ratio_formula(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    d, d_scale, d_zero = _scaled_rows(decoded, dtype)
    s, s_scale, s_zero = _scaled_rows(source, dtype)
    either = d_zero | s_zero
    # Safe denominators and square roots: the branches where() leaves out still get gradients.
    squares = d.square().sum(-1) / torch.where(either, 1, s.square().sum(-1))
    ratio = d_scale / torch.where(either, 1, s_scale) * torch.where(either, 1, squares).sqrt()
    edge = torch.where(s_zero, torch.where(d_zero, torch.nan, torch.inf), 0.0)
    return torch.where(either, edge.to(dtype), ratio)


def _norm_ratio_rows(decoded: Tensor, source: Tensor, *, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float64:
        return _norm_ratio_formula(decoded, source, dtype=dtype)
    _, _, d_norm, s_norm = _wide_norms(decoded, source)
    # A row holding Inf is NaN, as in the formula (whose scale is then Inf).
    ratio = torch.where(d_norm.isinf() | s_norm.isinf(), torch.nan, d_norm / s_norm)
    return ratio.to(dtype)


def _norm_ratio_coefficients(
    d: Tensor, s: Tensor, d_norm: Tensor, s_norm: Tensor, g: Tensor
) -> tuple[Tensor, ...]:
    """d r / d x̂ = x̂ / (‖x̂‖‖x‖), d r / d x = -r x / ‖x‖²; 0 where a row is zero."""
    defined = (d_norm > 0) & (s_norm > 0)
    d_norm, s_norm = torch.where(defined, d_norm, 1), torch.where(defined, s_norm, 1)
    unit = torch.where(defined, g / (d_norm * s_norm), 0)
    zero = torch.zeros_like(unit)
    return unit, zero, zero, -unit * d_norm.square() / s_norm.square()


COSINE = RowOp(
    _cosine_formula, _cosine_rows, _pair_gradients(_cosine_formula, _cosine_coefficients)
)
NORM_RATIO = RowOp(
    _norm_ratio_formula,
    _norm_ratio_rows,
    _pair_gradients(_norm_ratio_formula, _norm_ratio_coefficients),
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
