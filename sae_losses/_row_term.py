"""The one call every row term makes: checks, the per-row values, autograd, mask and reduce.

A public term checks its inputs and calls :func:`row_term`, which picks the path and then
applies the mask and the reduce:

- **plain formula** under ``torch.compile`` (inductor fuses it), under ``torch.func`` transforms
  (``grad``, ``vmap``, ``jacrev``) and for tensor subclasses such as ``DTensor`` (which shard it);
- otherwise the spec's :class:`~sae_losses._rowops.Strategy` (eager blocks or compiled kernels),
  inside an autograd function that saves only the inputs.

A mask never adds a pass over the inputs in the forward: it selects or weights the per-row
values. Masked rows are inert even when they hold NaN or Inf: the forward replaces their values
with 0 (``torch.where``, not a product), and the backward zeroes their rows of the inputs before
computing the gradient, so no ``0 * NaN`` can reach any gradient.
"""

import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sae_losses._checks import accumulation_dtype, check_reduce
from sae_losses._masks import check_mask, keep_of, row_view
from sae_losses._rowops import EAGER, RowOp, RowSpec, Strategy, Tensors, uses_plain_formula

__all__ = ["reduce_rows", "row_term"]

_NO_OPTIONS: Mapping[str, Any] = types.MappingProxyType({})


def _zero_dropped_rows(keep: Tensor | None, batched: Tensors) -> Tensors:
    if keep is None:
        return batched
    return tuple(t if t is None else torch.where(row_view(keep, t), t, 0) for t in batched)


class _RowValues(torch.autograd.Function):
    """Per-row values that save only the inputs (and the mask) for backward."""

    @staticmethod
    def forward(spec: RowSpec, keep: Tensor | None, *inputs: Tensor | None) -> Tensor:
        return spec.strategy.rows(spec, inputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        spec, keep, *tensors = inputs
        ctx.save_for_backward(keep, *tensors)
        ctx.spec = spec

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        spec: RowSpec = ctx.spec
        keep, *tensors = ctx.saved_tensors
        n = spec.n_batched
        inputs = (*_zero_dropped_rows(keep, tuple(tensors[:n])), *tensors[n:])
        if keep is not None:
            grad_rows = torch.where(row_view(keep, grad_rows), grad_rows, 0)
        # A double backward differentiates the eager gradient formulas, not compiled kernels.
        strategy = EAGER if torch.is_grad_enabled() else spec.strategy
        grads = strategy.gradients(spec, inputs, grad_rows, ctx.needs_input_grad[2:])
        return None, None, *grads


def _row_values(spec: RowSpec, inputs: Tensors, keep: Tensor | None) -> Tensor:
    """The per-row values; rows that ``keep`` drops may hold anything until the reduce."""
    if uses_plain_formula(inputs):
        batched = _zero_dropped_rows(keep, inputs[: spec.n_batched])
        return spec.formula((*batched, *inputs[spec.n_batched :]))
    if spec.op.differentiable and torch.is_grad_enabled():
        for t in inputs:
            if t is not None and t.requires_grad:
                rows: Tensor = _RowValues.apply(spec, keep, *inputs)  # type: ignore[no-untyped-call]
                return rows
    return spec.strategy.rows(spec, inputs)


def reduce_rows(rows: Tensor, reduce: str, mask: Tensor | None) -> Tensor:
    r"""Mask the per-row values, then reduce over the batch axis.

    With row weights :math:`w` (a bool mask as 0/1): ``"none"`` gives :math:`w_b \ell_b`, exactly
    0 where :math:`w_b = 0`; ``"sum"`` gives :math:`\sum_b w_b \ell_b`; ``"mean"`` gives
    :math:`\sum_b w_b \ell_b / \sum_b w_b`, NaN when the weights sum to 0 (whatever their signs).
    """
    if mask is not None:
        view = row_view(mask, rows)
        if mask.dtype == torch.bool:
            rows = torch.where(view, rows, 0)
        else:
            rows = torch.where(view != 0, rows * view.to(rows.dtype), 0)
    if reduce == "none":
        return rows
    if reduce == "sum":
        return rows.sum(0)
    if mask is None:
        return rows.mean(0)
    total = mask.sum(dtype=rows.dtype)
    # A safe denominator: the unselected branch of a where still gets a gradient of 0 * (1 / 0).
    return torch.where(total != 0, rows.sum(0) / torch.where(total != 0, total, 1), torch.nan)


def row_term(
    op: RowOp,
    batched: tuple[Tensor, ...],
    params: Tensors = (),
    *,
    reduce: object,
    mask: object,
    options: Mapping[str, Any] | None = None,
    strategy: Strategy = EAGER,
    weights_allowed: bool = True,
) -> Tensor:
    """Check ``reduce`` and ``mask``, then the masked, reduced per-row values of ``op``.

    ``batched`` are the checked inputs with a batch axis, ``params`` the checked shared ones.
    The values are accumulated in the promoted dtype of every input, half precision in float32.
    """
    reduce = check_reduce(reduce)
    if mask is not None:
        mask = check_mask(mask, batched[0], weights_allowed=weights_allowed)
    if not op.differentiable:
        batched = tuple(t.detach() for t in batched)
        params = tuple(p if p is None else p.detach() for p in params)
    inputs = (*batched, *params)
    dtype = batched[0].dtype
    for t in inputs:  # the promoted dtype, without a comprehension's frame: this runs every call
        if t is not None and t.dtype is not dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    dtype = accumulation_dtype(dtype)
    spec = RowSpec(op, len(batched), dtype, options or _NO_OPTIONS, strategy)
    keep = None if mask is None else keep_of(mask)
    return reduce_rows(_row_values(spec, inputs, keep), reduce, mask)
