"""The one mechanism every row term shares: per-row values, autograd, mask and batch reduce.

A row op maps inputs shaped ``(batch, *component, feature)`` to one value per row,
``(batch, *component)``, in the accumulation dtype. It is described by a :class:`RowOp`: a plain
differentiable ``formula`` and, optionally, a faster eager ``fast_rows`` and hand-written
``gradients``. A public term checks its inputs and makes one call, :func:`row_term`, which picks
the path and then applies the mask and the reduce:

- **plain formula** under ``torch.compile`` (inductor fuses it), under ``torch.func`` transforms
  (``grad``, ``vmap``, ``jacrev``) and for tensor subclasses such as ``DTensor`` (which shard it);
- otherwise the :class:`Strategy`: :data:`EAGER` runs the eager kernel in row blocks of about
  2 MiB so the ``batch x feature`` temporary stays in cache (``_fused`` compiles instead), inside
  an autograd function that saves only the inputs and computes the gradient in the accumulation
  dtype (by ``gradients``, or by re-running the formula in backward).

A mask never adds a pass over the inputs in the forward: it selects or weights the per-row
values. Masked rows are inert even when they hold NaN or Inf: the forward replaces their values
with 0 (``torch.where``, not a product), and the backward zeroes their rows of the inputs before
computing the gradient, so no ``0 * NaN`` can reach any gradient.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from sae_losses._checks import accumulation_dtype, check_reduce
from sae_losses._masks import check_mask, keep_of, row_view

__all__ = [
    "EAGER",
    "Gradients",
    "RowOp",
    "RowSpec",
    "Strategy",
    "Tensors",
    "batched_backward",
    "row_blocks",
    "row_term",
    "uses_plain_formula",
]

# Elements per block of rows: 2 MiB of float32, which 2 threads split into one 1 MiB L2 cache each.
BLOCK_ELEMENTS = 1 << 19
# Up to this many blocks' worth of elements, the temporary stays in the L3 cache anyway: one call
# is cheaper. Both constants are read at call time, so a test can monkeypatch them.
ONE_CALL_BLOCKS = 4

Tensors = tuple[Tensor | None, ...]  # batched inputs, then params (an optional param may be None)
Gradients = tuple[Tensor | None, ...]  # one per input; None where none is needed


@dataclasses.dataclass(frozen=True)
class RowOp:
    """A per-row term: ``formula(*batched, *params, dtype=..., **options) -> (batch, *component)``.

    An op with several values per row returns them on a trailing axis, ``(batch, *component,
    k)``. ``batched`` inputs have the batch axis first (they are split into blocks and masked);
    ``params`` are shared by every row, such as a ``(feature,)`` weight. ``formula`` must be
    differentiable, safe (finite gradients where the term has a gradient of 0) and vmappable.
    ``fast_rows`` has the same signature and computes the values faster in eager mode;
    ``gradients(inputs, grad_rows, dtype, needs, **options)`` returns one gradient per input.
    Either may be None: the formula stands in. A non-``differentiable`` op detaches its inputs.
    """

    formula: Callable[..., Tensor]
    fast_rows: Callable[..., Tensor] | None = None
    gradients: Callable[..., Gradients] | None = None
    differentiable: bool = True


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How the eager path computes values and gradients: blocked eager ops, or compiled ones."""

    rows: Callable[["RowSpec", Tensors], Tensor]
    gradients: Callable[["RowSpec", Tensors, Tensor, tuple[bool, ...]], Gradients]


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Everything about one call that is not a tensor: the autograd function's one argument."""

    op: RowOp
    n_batched: int
    dtype: torch.dtype
    options: Mapping[str, Any]
    strategy: Strategy

    def formula(self, inputs: Tensors) -> Tensor:
        return self.op.formula(*inputs, dtype=self.dtype, **self.options)


def row_blocks(x: Tensor) -> list[slice]:
    """The row slices the eager path computes ``x`` in: one, or blocks of ``BLOCK_ELEMENTS``.

    One call while ``x`` has at most ``ONE_CALL_BLOCKS * BLOCK_ELEMENTS`` elements.
    """
    if x.numel() <= ONE_CALL_BLOCKS * BLOCK_ELEMENTS:
        return [slice(None)]
    size = max(1, BLOCK_ELEMENTS // math.prod(x.shape[1:]))
    return [slice(start, start + size) for start in range(0, x.shape[0], size)]


def _blocked_rows(spec: RowSpec, inputs: Tensors) -> Tensor:
    kernel = spec.op.fast_rows or spec.op.formula
    batched, params = inputs[: spec.n_batched], inputs[spec.n_batched :]
    first = batched[0]
    assert first is not None
    blocks = row_blocks(first)
    if len(blocks) == 1:
        return kernel(*inputs, dtype=spec.dtype, **spec.options)
    rows: Tensor | None = None
    for block in blocks:
        part = (t if t is None else t[block] for t in batched)
        values = kernel(*part, *params, dtype=spec.dtype, **spec.options)
        if rows is None:  # (batch, *component), plus any trailing axis of values per row
            rows = values.new_empty((first.shape[0], *values.shape[1:]))
        rows[block] = values
    assert rows is not None
    return rows


def formula_gradients(
    spec: RowSpec, inputs: Tensors, grad_rows: Tensor, needs: tuple[bool, ...]
) -> Gradients:
    """Gradients by re-running the formula in backward: only the inputs were saved."""
    create_graph = torch.is_grad_enabled()  # a double backward is under way
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # A batched vector-Jacobian product (is_grads_batched, vectorized jacobian): torch.func.
        wanted = [i for i, need in enumerate(needs) if need]

        def of_wanted(*values: Tensor) -> Tensor:
            full = list(inputs)
            for i, value in zip(wanted, values, strict=True):
                full[i] = value
            return spec.formula(tuple(full))

        _, vjp, *_ = torch.func.vjp(of_wanted, *(inputs[i] for i in wanted))
        found_iter = iter(vjp(grad_rows))
        return tuple(next(found_iter) if need else None for need in needs)
    with torch.enable_grad():
        leaves = tuple(
            t if create_graph or t is None else t.detach().requires_grad_(need)
            for t, need in zip(inputs, needs, strict=True)
        )
        wanted_leaves = [t for t, need in zip(leaves, needs, strict=True) if need and t is not None]
        rows = spec.formula(leaves)
        found = torch.autograd.grad(
            rows, wanted_leaves, grad_rows, create_graph=create_graph, allow_unused=True
        )
    found_iter = iter(found)
    return tuple(next(found_iter) if need else None for need in needs)


def batched_backward(grad_rows: Tensor) -> bool:
    """A batched vector-Jacobian product: ``is_grads_batched``, a vectorized jacobian, vmap.

    The hand-written gradients work in place on unbatched temporaries, which vmap rejects.
    """
    functorch = torch._C._functorch
    return functorch.peek_interpreter_stack() is not None or functorch.is_legacy_batchedtensor(
        grad_rows
    )


def _eager_gradients(
    spec: RowSpec, inputs: Tensors, grad_rows: Tensor, needs: tuple[bool, ...]
) -> Gradients:
    hand_written = spec.op.gradients
    if hand_written is None or batched_backward(grad_rows):
        return formula_gradients(spec, inputs, grad_rows, needs)
    return hand_written(inputs, grad_rows, spec.dtype, needs, **spec.options)


EAGER = Strategy(rows=_blocked_rows, gradients=_eager_gradients)


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


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def uses_plain_formula(tensors: Tensors) -> bool:
    """Whether the plain formula runs: under compile, torch.func, or for tensor subclasses."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return any(t is not None and type(t) not in _PLAIN_TYPES for t in tensors)


def _row_values(spec: RowSpec, inputs: Tensors, keep: Tensor | None) -> Tensor:
    """The per-row values; rows that ``keep`` drops may hold anything until the reduce."""
    if uses_plain_formula(inputs):
        batched = _zero_dropped_rows(keep, inputs[: spec.n_batched])
        return spec.formula((*batched, *inputs[spec.n_batched :]))
    needs_grad = any(t is not None and t.requires_grad for t in inputs)
    if spec.op.differentiable and torch.is_grad_enabled() and needs_grad:
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
    mask = check_mask(mask, batched[0], weights_allowed=weights_allowed)
    if not op.differentiable:
        batched = tuple(t.detach() for t in batched)
        params = tuple(p if p is None else p.detach() for p in params)
    inputs = (*batched, *params)
    dtype = accumulation_dtype(*(t.dtype for t in inputs if t is not None))
    spec = RowSpec(op, len(batched), dtype, options or {}, strategy)
    return reduce_rows(_row_values(spec, inputs, keep_of(mask)), reduce, mask)
