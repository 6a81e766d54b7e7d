"""The one mechanism every row op shares: per-row kernel, autograd, mask and batch reduce.

A row op maps inputs shaped ``(batch, *component, feature)`` to one value per row,
``(batch, *component)``, in the accumulation dtype. It is described by a :class:`RowOp`: a plain
differentiable ``formula`` and, optionally, a faster eager ``kernel`` and hand-written ``grads``.
:func:`row_values` then picks the path:

- **plain formula** under ``torch.compile`` (inductor fuses it), under ``torch.func`` transforms
  (``grad``, ``vmap``, ``jacrev``) and for tensor subclasses such as ``DTensor`` (which shard it);
- **eager kernel** otherwise, in row blocks of about 2 MiB so the ``batch x feature`` temporary
  stays in cache, inside an autograd function that saves only the inputs and computes the
  gradient in the accumulation dtype (by ``grads``, or by re-running the formula in backward).

A mask never adds a pass over the inputs in the forward: it selects or weights the per-row
values. Masked rows are inert even when they hold NaN or Inf: the forward replaces their values
with 0 (``torch.where``, not a product), and the backward zeroes their rows of the inputs before
computing the gradient, so no ``0 * NaN`` can reach any gradient.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sae_losses._checks import Reduce

__all__ = [
    "EAGER",
    "Grads",
    "Kernels",
    "Params",
    "RowOp",
    "Tensors",
    "reduce_rows",
    "row_values",
    "uses_plain_formula",
]

# Elements per block of rows: 2 MiB of float32, which 2 threads split into one 1 MiB L2 cache each.
BLOCK_ELEMENTS = 1 << 19


Tensors = tuple[Tensor, ...]
Params = tuple[Tensor | None, ...]
Grads = tuple[Tensor | None, ...]


@dataclasses.dataclass(frozen=True)
class RowOp:
    """A per-row term: ``formula(*batched, *params, dtype=..., **options) -> (batch, *component)``.

    ``batched`` inputs have the batch axis first (they are split into blocks and masked);
    ``params`` are shared by every row, such as a ``(feature,)`` weight. ``formula`` must be
    differentiable, safe (finite gradients where the term has a gradient of 0) and vmappable.
    ``kernel`` has the same signature and computes the values faster in eager mode; ``grads``
    computes the gradients ``(*batched, *params)`` from ``(tensors, grad_rows, dtype, needs,
    **options)``. Either may be None: the formula stands in.
    """

    name: str
    formula: Callable[..., Tensor]
    kernel: Callable[..., Tensor] | None = None
    grads: Callable[..., Grads] | None = None
    differentiable: bool = True


def _rows_per_block(x: Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // math.prod(x.shape[1:]))


def blocked_rows(
    op: RowOp, batched: Tensors, params: Params, dtype: torch.dtype, options: dict[str, Any]
) -> Tensor:
    """The eager per-row values, in cache-sized blocks of rows."""
    kernel = op.kernel or op.formula
    first = batched[0]
    # Up to 4 blocks' worth, the temporary stays in the L3 cache anyway: one call is cheaper.
    if first.numel() <= 4 * BLOCK_ELEMENTS:
        return kernel(*batched, *params, dtype=dtype, **options)
    size = _rows_per_block(first)
    rows = torch.empty(first.shape[:-1], dtype=dtype, device=first.device)
    for start in range(0, first.shape[0], size):
        block = tuple(t[start : start + size] for t in batched)
        rows[start : start + size] = kernel(*block, *params, dtype=dtype, **options)
    return rows


def formula_grads(
    op: RowOp,
    tensors: Params,
    grad_rows: Tensor,
    dtype: torch.dtype,
    needs: tuple[bool, ...],
    options: dict[str, Any],
) -> Grads:
    """Gradients by re-running the formula in backward: only the inputs were saved."""
    create_graph = torch.is_grad_enabled()  # a double backward is under way
    with torch.enable_grad():
        inputs = tuple(
            t if create_graph or t is None else t.detach().requires_grad_(need)
            for t, need in zip(tensors, needs, strict=True)
        )
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None]
        rows = op.formula(*inputs, dtype=dtype, **options)
        found = torch.autograd.grad(
            rows, wanted, grad_rows, create_graph=create_graph, allow_unused=True
        )
    found_iter = iter(found)
    return tuple(next(found_iter) if need else None for need in needs)


def eager_grads(
    op: RowOp,
    tensors: Params,
    grad_rows: Tensor,
    dtype: torch.dtype,
    needs: tuple[bool, ...],
    options: dict[str, Any],
) -> Grads:
    if op.grads is not None:
        return op.grads(tensors, grad_rows, dtype, needs, **options)
    return formula_grads(op, tensors, grad_rows, dtype, needs, options)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How the eager path computes values and gradients: blocked eager ops, or compiled ones."""

    rows: Callable[..., Tensor]
    grads: Callable[..., Grads]


EAGER = Kernels(rows=blocked_rows, grads=eager_grads)


def _row_view(keep: Tensor, like: Tensor) -> Tensor:
    return keep.reshape(keep.shape + (1,) * (like.ndim - 1))


def _zero_masked_rows(keep: Tensor | None, batched: Tensors) -> Tensors:
    if keep is None:
        return batched
    return tuple(torch.where(_row_view(keep, t), t, 0) for t in batched)


class _RowValues(torch.autograd.Function):
    """Per-row values that save only the inputs (and the mask) for backward."""

    @staticmethod
    def forward(
        kernels: Kernels,
        op: RowOp,
        dtype: torch.dtype,
        options: dict[str, Any],
        keep: Tensor | None,
        n_batched: int,
        *tensors: Tensor | None,
    ) -> Tensor:
        return kernels.rows(op, tensors[:n_batched], tensors[n_batched:], dtype, options)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        kernels, op, dtype, options, keep, n_batched, *tensors = inputs
        ctx.save_for_backward(keep, *tensors)
        ctx.kernels, ctx.op, ctx.dtype, ctx.options, ctx.n_batched = (
            kernels,
            op,
            dtype,
            options,
            n_batched,
        )

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, ...]:
        keep, *tensors = ctx.saved_tensors
        n = ctx.n_batched
        batched = _zero_masked_rows(keep, tuple(tensors[:n]))
        if keep is not None:
            grad_rows = torch.where(_row_view(keep, grad_rows), grad_rows, 0)
        needs = ctx.needs_input_grad[6:]
        kernels = ctx.kernels if not torch.is_grad_enabled() else EAGER
        grads = kernels.grads(
            ctx.op, (*batched, *tensors[n:]), grad_rows, ctx.dtype, needs, ctx.options
        )
        return None, None, None, None, None, None, *grads


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def uses_plain_formula(tensors: Params) -> bool:
    """Whether the plain formula runs: under compile, torch.func, or for tensor subclasses."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return any(t is not None and type(t) not in _PLAIN_TYPES for t in tensors)


def row_values(
    op: RowOp,
    batched: Tensors,
    params: Params = (),
    *,
    dtype: torch.dtype,
    mask: Tensor | None = None,
    options: dict[str, Any] | None = None,
    kernels: Kernels = EAGER,
) -> Tensor:
    """The per-row values of ``op``, unmasked: rows the mask drops may hold anything."""
    options = options or {}
    keep = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0).detach()
    if not op.differentiable:
        batched = tuple(t.detach() for t in batched)
        params = tuple(p if p is None else p.detach() for p in params)
    tensors = (*batched, *params)
    if uses_plain_formula(tensors):
        return op.formula(*_zero_masked_rows(keep, batched), *params, dtype=dtype, **options)
    if op.differentiable and torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                rows: Tensor = _RowValues.apply(  # type: ignore[no-untyped-call]
                    kernels, op, dtype, options, keep, len(batched), *tensors
                )
                return rows
    return kernels.rows(op, batched, params, dtype, options)


def reduce_rows(rows: Tensor, reduce: Reduce, mask: Tensor | None = None) -> Tensor:
    r"""Mask the per-row values, then reduce over the batch axis.

    With row weights :math:`w` (a bool mask as 0/1): ``"none"`` gives :math:`w_b \ell_b`, exactly
    0 where :math:`w_b = 0`; ``"sum"`` gives :math:`\sum_b w_b \ell_b`; ``"mean"`` gives
    :math:`\sum_b w_b \ell_b / \sum_b w_b`, NaN when the weights sum to 0.
    """
    if mask is not None:
        mask = mask.detach()
        view = _row_view(mask, rows)
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
    return rows.sum(0) / mask.sum(dtype=rows.dtype)
