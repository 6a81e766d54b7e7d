"""The row op and its eager strategy: what a row term is, and how its rows are computed eagerly.

A row op maps inputs shaped ``(batch, *component, feature)`` to one value per row,
``(batch, *component)``, in the accumulation dtype. It is described by a :class:`RowOp`: a plain
differentiable ``formula`` and, optionally, a faster eager ``fast_rows`` and hand-written
``gradients``. A :class:`RowSpec` bundles it with the dtype, the options and the
:class:`Strategy`. :data:`EAGER` runs the eager kernel in row blocks of about 2 MiB so the
``batch x feature`` temporary stays in cache (``_fused`` compiles instead), and computes the
gradient in the accumulation dtype (by ``gradients``, or by re-running the formula). The one
call a public term makes, :func:`sae_losses._row_term.row_term`, is in ``_row_term``.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "EAGER",
    "Gradients",
    "RowOp",
    "RowSpec",
    "Strategy",
    "Tensors",
    "batched_backward",
    "row_blocks",
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
    An op that ``blocks_itself`` gets the whole batch in ``fast_rows``, which loops over
    :func:`row_blocks` on its own (the pair terms, to reuse their float64 buffers).
    """

    formula: Callable[..., Tensor]
    fast_rows: Callable[..., Tensor] | None = None
    gradients: Callable[..., Gradients] | None = None
    differentiable: bool = True
    blocks_itself: bool = False


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


def row_blocks(x: Tensor, elements: int | None = None) -> list[slice]:
    """The row slices the eager path computes ``x`` in: one, or blocks of ``elements``
    (default ``BLOCK_ELEMENTS``).

    One call while ``x`` has at most ``ONE_CALL_BLOCKS`` blocks' elements.
    """
    elements = BLOCK_ELEMENTS if elements is None else elements
    if x.numel() <= ONE_CALL_BLOCKS * elements:
        return [slice(None)]
    size = max(1, elements // math.prod(x.shape[1:]))
    return [slice(start, start + size) for start in range(0, x.shape[0], size)]


def _blocked_rows(spec: RowSpec, inputs: Tensors) -> Tensor:
    kernel = spec.op.fast_rows or spec.op.formula
    batched, params = inputs[: spec.n_batched], inputs[spec.n_batched :]
    first = batched[0]
    assert first is not None
    blocks = [slice(None)] if spec.op.blocks_itself else row_blocks(first)
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


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def uses_plain_formula(tensors: Tensors) -> bool:
    """Whether the plain formula runs: under compile, torch.func, or for tensor subclasses."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    for t in tensors:  # noqa: SIM110 (a loop, not any() over a generator: it runs every call)
        if t is not None and type(t) not in _PLAIN_TYPES:
            return True
    return False
