"""Sparsity penalties: L1 (optionally decoder-norm weighted) and Lp (rooted or not).

Each is a formula, a kernel where the formula is slow, hand-written gradients where they pay, and
a docstring; :func:`sae_losses._row_term.row_term` does the rest (blocks, autograd, mask, reduce).
The ``Mask`` type and :func:`check_learned` here are shared with the other sparsity terms.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from sae_losses._checks import (
    Reduce,
    check_activations,
    check_feature_vector,
    check_positive_float,
)
from sae_losses._masks import Mask
from sae_losses._positive_power import positive_power
from sae_losses._row_term import row_term
from sae_losses._rowops import EAGER, Gradients, RowOp, Strategy, Tensors

__all__ = [
    "L1",
    "LP",
    "absolute_in",
    "check_learned",
    "l1_absolute",
    "l1_loss",
    "lp_sparsity",
]


def absolute_in(learned: Tensor, dtype: torch.dtype) -> Tensor:
    """``|learned|`` in ``dtype``, a fresh tensor the caller may modify."""
    return learned.abs() if learned.dtype == dtype else learned.to(dtype).abs_()


def _l1_formula(learned: Tensor, weight: Tensor | None, *, dtype: torch.dtype) -> Tensor:
    absolute = learned.to(dtype).abs()
    return (absolute if weight is None else absolute * weight.to(dtype)).sum(-1)


def _l1_kernel(learned: Tensor, weight: Tensor | None, *, dtype: torch.dtype) -> Tensor:
    if weight is None:
        return learned.abs().sum(-1, dtype=dtype)
    return absolute_in(learned, dtype).mul_(weight).sum(-1)


def _l1_gradients(
    inputs: Tensors, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Gradients:
    """d/dz = sign(z) w g (0 at z = 0); d/dw = sum over rows of g |z|."""
    learned, weight = inputs
    assert learned is not None
    grad_learned = grad_weight = None
    if needs[0]:
        grad = torch.sign(learned).to(dtype).mul_(grad_rows.unsqueeze(-1))
        grad_learned = (grad if weight is None else grad.mul_(weight)).to(learned.dtype)
    if weight is not None and needs[1]:
        features = learned.shape[-1]
        absolute = absolute_in(learned, dtype).reshape(-1, features)
        grad_weight = (grad_rows.reshape(-1) @ absolute).to(weight.dtype)
    return grad_learned, grad_weight


L1 = RowOp(_l1_formula, _l1_kernel, _l1_gradients)


def _lp_formula(
    learned: Tensor, weight: Tensor | None, *, dtype: torch.dtype, p: float, root: bool
) -> Tensor:
    scaled = learned.to(dtype) if weight is None else learned.to(dtype) * weight.to(dtype)
    total = positive_power(scaled.abs(), p).sum(-1)
    return positive_power(total, 1 / p) if root else total


def _lp_kernel(
    learned: Tensor, weight: Tensor | None, *, dtype: torch.dtype, p: float, root: bool
) -> Tensor:
    # In place on one fresh block: |z w| = |z| |w| exactly, and 0 ** p is 0 for p > 0.
    powers = absolute_in(learned, dtype)
    if weight is not None:
        powers.mul_(weight.to(dtype).abs())
    total = powers.pow_(p).sum(-1)
    return total.pow_(1 / p) if root else total


LP = RowOp(_lp_formula, _lp_kernel)


def check_learned(learned: object, weight: object) -> tuple[Tensor, Tensor | None]:
    """``learned`` activations and an optional ``(feature,)`` weight."""
    learned = check_activations("learned", learned)
    return learned, None if weight is None else check_feature_vector("weight", weight, learned)


def l1_loss(
    learned: object, weight: object, reduce: object, mask: object, strategy: Strategy = EAGER
) -> Tensor:
    """The checked per-row L1 through the shared mechanism, eager or fused (``strategy``).

    The arguments are typed ``object`` because this is where unchecked input is checked.
    """
    learned, weight = check_learned(learned, weight)
    return row_term(L1, (learned,), (weight,), reduce=reduce, mask=mask, strategy=strategy)


def l1_absolute(
    learned: Float[Tensor, "batch *component feature"],
    *,
    weight: Float[Tensor, " feature"] | None = None,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""Sparsity penalty: the (weighted) sum over features of the absolute activations, per row.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} w_f \, |z_{b,c,f}|

    with :math:`w = 1` when ``weight`` is None, then ``mask`` and ``reduce`` over the batch axis
    exactly as in :func:`l2_reconstruction`. Divide by ``learned.shape[-1]`` for the mean over
    features. ``weight=W_dec.norm(dim=1)`` gives the decoder-norm-weighted L1 of SAELens's
    standard SAE and of Anthropic's April 2024 training recipe. Gradients flow to ``learned``
    and to ``weight``; the gradient at :math:`z = 0` is 0.

    Shapes:
        - ``learned``: ``(batch, *component, feature)``, the SAE's hidden activations.
        - ``weight``: ``(feature,)``, broadcast over the batch and component axes only.
        - ``mask``: ``(batch,)``, bool or floating row weights, as in :func:`l2_reconstruction`.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise.

    The dtype policy and the empty-batch results are those of :func:`l2_reconstruction`.

    Raises:
        TypeError: ``learned`` or ``weight`` is not a floating-point tensor, or ``mask`` is
            neither bool nor floating.
        ValueError: ``learned`` has fewer than 2 dimensions or no features, ``weight`` is not
            ``(feature,)``, ``mask`` is not ``(batch,)``, or ``reduce`` is not one of the modes.

    Example:
        >>> import torch
        >>> from sae_losses import l1_absolute
        >>> learned = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, -1.0, 0.0]]])  # L1 of 2 and 1
        >>> l1_absolute(learned, reduce="none")
        tensor([[2.],
                [1.]])
        >>> l1_absolute(learned)
        tensor([1.5000])
        >>> l1_absolute(learned, weight=torch.tensor([1.0, 2.0, 3.0]), reduce="none")
        tensor([[4.],
                [2.]])
    """
    return l1_loss(learned, weight, reduce, mask)


def lp_sparsity(
    learned: Float[Tensor, "batch *component feature"],
    *,
    p: float | int,
    weight: Float[Tensor, " feature"] | None = None,
    root: bool = False,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""Lp sparsity penalty, per row: :math:`\sum_f (w_f |z_f|)^p`, or its p-th root.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} |w_f z_{b,c,f}|^p
        \quad\text{or, with ``root=True``,}\quad
        \Big(\sum_{f=1}^{F} |w_f z_{b,c,f}|^p\Big)^{1/p}

    ``root=False`` is dictionary_learning's "Lp^p" (used for p-annealing); ``root=True`` is
    SAELens's ``(z * w).norm(p)``. ``p = 1`` without a root equals :func:`l1_absolute`. The
    gradient at :math:`z = 0` is 0 for every ``p``, including ``p < 1``, where the naive formula
    gives inf or NaN; with ``root=True`` a row of zeros also has gradient 0. Then ``mask`` and
    ``reduce`` as in :func:`l2_reconstruction`.

    Shapes: as :func:`l1_absolute`.

    Raises:
        ValueError: ``p`` is not a positive Python number, and the errors of :func:`l1_absolute`.

    Example:
        >>> import torch
        >>> from sae_losses import lp_sparsity
        >>> learned = torch.tensor([[3.0, -4.0]])
        >>> lp_sparsity(learned, p=2.0)  # 9 + 16
        tensor(25.)
        >>> lp_sparsity(learned, p=2.0, root=True)  # the Euclidean norm
        tensor(5.)
    """
    learned, weight = check_learned(learned, weight)
    options = {"p": check_positive_float("p", p), "root": bool(root)}
    return row_term(LP, (learned,), (weight,), reduce=reduce, mask=mask, options=options)
