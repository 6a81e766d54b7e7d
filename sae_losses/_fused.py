"""The compiled strategy behind the fused twins of the terms, and the twins of L2 and L1.

``fused_<name>`` is ``<name>`` with its per-row values (and their gradients) computed by kernels
that ``torch.compile`` generates from the term's formula: one inductor kernel (C++ on the CPU,
Triton on CUDA) that reads each input once, where the eager kernels need extra passes over
cached temporaries. The checks, errors, masks, dtype policy and results are the eager term's.
The other twins are in ``_fused_terms``; ``docs/compiled.md`` says when to use them.

Each kind of input gets its own compiled function, and a kind that cannot be compiled runs the
eager kernels, with the same numbers: see ``sae_losses._compile_cache``.

Backward runs the op's hand-written gradients compiled or, for an op without them, the compiled
vector-Jacobian product of its formula (``torch.func.vjp``). A double backward
(``create_graph=True``) runs the eager gradient formulas, which are differentiable; compiled
backward kernels are not meant to be differentiated again.
"""

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._checks import Reduce
from sae_losses._compile_cache import run_compiled
from sae_losses._penalties import l1_loss
from sae_losses._reconstruction import l2_loss
from sae_losses._rowops import EAGER, Gradients, RowOp, RowSpec, Strategy, Tensors, batched_backward

__all__ = ["FUSED", "fused_l1_absolute", "fused_l2_reconstruction"]


def _formula_rows(op: RowOp, dtype: torch.dtype, options: dict[str, Any], *inputs: Any) -> Tensor:
    return op.formula(*inputs, dtype=dtype, **options)


def _hand_written_gradients(
    op: RowOp,
    dtype: torch.dtype,
    options: dict[str, Any],
    inputs: Tensors,
    grad_rows: Tensor,
    needs: tuple[bool, ...],
) -> Gradients:
    assert op.gradients is not None
    return op.gradients(inputs, grad_rows, dtype, needs, **options)


def _formula_gradients(
    op: RowOp,
    dtype: torch.dtype,
    options: dict[str, Any],
    inputs: Tensors,
    grad_rows: Tensor,
    needs: tuple[bool, ...],
) -> Gradients:
    """The formula's vector-Jacobian product, for an op with no hand-written gradients: inductor
    fuses the formula and its derivative into the backward kernels (autograd.grad would not
    trace)."""
    wanted = [i for i, need in enumerate(needs) if need]

    def of_wanted(*values: Tensor) -> Tensor:
        full = list(inputs)
        for i, value in zip(wanted, values, strict=True):
            full[i] = value
        return op.formula(*full, dtype=dtype, **options)

    _, vjp, *_ = torch.func.vjp(of_wanted, *(inputs[i] for i in wanted))
    found = iter(vjp(grad_rows))
    return tuple(next(found) if need else None for need in needs)


def _fused_rows(spec: RowSpec, inputs: Tensors) -> Tensor:
    # The compiled functions take the spec's fields, not the spec: a fresh object per call would
    # be a new constant to dynamo's guards.
    rows: Tensor = run_compiled(
        lambda *_: EAGER.rows(spec, inputs),
        _formula_rows,
        spec.op,
        spec.dtype,
        dict(spec.options),
        *inputs,
    )
    return rows


def _fused_gradients(
    spec: RowSpec, inputs: Tensors, grad_rows: Tensor, needs: tuple[bool, ...]
) -> Gradients:
    if batched_backward(grad_rows):
        return EAGER.gradients(spec, inputs, grad_rows, needs)
    grads: Gradients = run_compiled(
        lambda *_: EAGER.gradients(spec, inputs, grad_rows, needs),
        _hand_written_gradients if spec.op.gradients else _formula_gradients,
        spec.op,
        spec.dtype,
        dict(spec.options),
        inputs,
        grad_rows,
        needs,
    )
    return grads


FUSED = Strategy(rows=_fused_rows, gradients=_fused_gradients)


def fused_l2_reconstruction(
    decoded: Float[Tensor, "batch *component feature"],
    source: Float[Tensor, "batch *component feature"],
    *,
    reduce: Reduce = "mean",
    mask: Bool[Tensor, " batch"] | Float[Tensor, " batch"] | None = None,
) -> Float[Tensor, "..."]:
    r""":func:`l2_reconstruction`, with the per-row values computed by one generated kernel.

    .. math::

        \ell_{b,c} = \frac{1}{F} \sum_{f=1}^{F} (\hat{x}_{b,c,f} - x_{b,c,f})^2,
        \text{ then ``mask`` and ``reduce`` over } b

    Same formula, shapes, mask, dtype policy, errors and gradients as :func:`l2_reconstruction`;
    the inputs are checked before the compiled kernel runs, so errors are the same too.

    Example:
        >>> import torch
        >>> from sae_losses import fused_l2_reconstruction
        >>> source = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])
        >>> decoded = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
        >>> fused_l2_reconstruction(decoded, source)  # the first call compiles: seconds
        tensor([3.])
    """
    return l2_loss(decoded, source, reduce, mask, FUSED)


def fused_l1_absolute(
    learned: Float[Tensor, "batch *component feature"],
    *,
    weight: Float[Tensor, " feature"] | None = None,
    reduce: Reduce = "mean",
    mask: Bool[Tensor, " batch"] | Float[Tensor, " batch"] | None = None,
) -> Float[Tensor, "..."]:
    r""":func:`l1_absolute`, with the per-row values computed by one generated kernel.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} w_f |z_{b,c,f}|, \text{ then ``mask`` and ``reduce`` over } b

    Same formula, shapes, weight, mask, dtype policy, errors and gradients as
    :func:`l1_absolute`.

    Example:
        >>> import torch
        >>> from sae_losses import fused_l1_absolute
        >>> fused_l1_absolute(torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, -1.0, 0.0]]]))
        tensor([1.5000])
    """
    return l1_loss(learned, weight, reduce, mask, FUSED)
