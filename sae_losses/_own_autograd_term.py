"""``row_term`` for a formula that is its own autograd function: mask and reduce around it.

A module of its own because it is a sibling of :func:`sae_losses._row_term.row_term`, for terms
(such as ``matryoshka_l2``) whose kernel cannot be a row op: it checks ``reduce`` and ``mask``,
picks the accumulation dtype, and leaves the path choice to the formula.
"""

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from sae_losses._checks import accumulation_dtype, check_reduce
from sae_losses._masks import check_mask, keep_of
from sae_losses._row_term import reduce_rows
from sae_losses._rowops import Tensors

__all__ = ["own_autograd_term"]


def own_autograd_term(
    formula: Callable[..., Tensor],
    inputs: Tensors,
    *,
    reduce: object,
    mask: object,
    options: Mapping[str, Any],
) -> Tensor:
    """``row_term`` for a formula that is its own autograd function, on every path.

    ``formula(*inputs, keep, dtype=..., **options)`` gets the rows the mask keeps (or None) and
    must leave the other rows inert in its own backward; its rows are then masked and reduced.
    The first input has the batch axis.
    """
    reduce = check_reduce(reduce)
    first = inputs[0]
    assert first is not None
    checked = check_mask(mask, first, weights_allowed=True)
    dtype = accumulation_dtype(*(t.dtype for t in inputs if t is not None))
    rows = formula(*inputs, keep_of(checked), dtype=dtype, **options)
    return reduce_rows(rows, reduce, checked)
