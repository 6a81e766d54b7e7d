"""Row norms of a (decoded, source) pair, exact at any magnitude, and the pair terms' gradients.

The cosine similarity and the norm ratio use them to stay exact at any magnitude the inputs'
dtype holds, where the textbook formulas overflow or underflow:
``torch.nn.functional.cosine_similarity`` gives 0 for two equal float32 rows of ``1e20`` (their
squares overflow) and ``2e-34`` for two equal rows of ``1e-25`` (they underflow), where these
give 1.

- The eager kernels and gradients compute float32 and half inputs in float64, a block of rows at
  a time (:func:`pair_rows`, :func:`pair_gradients`): the square of any float32 value is finite
  and normal there.
- The formula (under ``torch.compile`` and ``torch.func``, and for float64 inputs) first divides
  each row by its largest absolute entry (:func:`scaled_rows`). Neither value depends on that
  positive scale, so it is detached, and the gradient is still exact.
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.linalg import vector_norm

from sae_losses import _rowops
from sae_losses._rowops import (
    EAGER,
    Gradients,
    RowOp,
    RowSpec,
    Tensors,
    formula_gradients,
    row_blocks,
)

__all__ = ["Coefficients", "WideRows", "pair_gradients", "pair_rows", "scaled_rows"]

# Per-row coefficients (a, b, c, e) of the gradients d a + s b (to decoded) and d c + s e (to
# source), from the float64 rows d, s, their norms and the upstream gradient g.
Coefficients = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, ...]]


def scaled_rows(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``x / max_f |x_f|`` per row, that scale ``(batch, *component)``, and where it is 0."""
    x = x.to(dtype)
    scale = x.detach().abs().amax(-1)
    zero = scale == 0
    return x / torch.where(zero, 1, scale).unsqueeze(-1), scale, zero


def _wide_blocks(
    decoded: Tensor, source: Tensor
) -> Iterator[tuple[slice, Tensor, Tensor, Tensor, Tensor]]:
    """``(block, d, s, ‖d‖, ‖s‖)`` for each row block, ``d`` and ``s`` in float64.

    Every block is copied (``copy_`` converts in place) into the same two 2 MiB float64 buffers,
    made once a call: fresh block-sized float64 temporaries made glibc's malloc fault on each of
    their pages in some processes (a norm ratio of 8192 x 2304 float32 rows took 24x the read
    floor; 3x in the buffers). The caller may overwrite ``d`` and ``s``.
    """
    blocks = row_blocks(decoded, _rowops.BLOCK_ELEMENTS // 2)
    shape = (decoded[blocks[0]].shape[0], *decoded.shape[1:])
    buffers = [torch.empty(shape, dtype=torch.float64, device=decoded.device) for _ in range(2)]
    for block in blocks:
        n = decoded[block].shape[0]
        d = buffers[0][:n].copy_(decoded[block])
        s = buffers[1][:n].copy_(source[block])
        yield block, d, s, vector_norm(d, dim=-1), vector_norm(s, dim=-1)


WideRows = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def pair_rows(
    decoded: Tensor,
    source: Tensor,
    dtype: torch.dtype,
    formula: Callable[..., Tensor],
    wide_rows: WideRows,
) -> Tensor:
    """A pair term's rows in row blocks: ``formula`` for float64 inputs, otherwise
    ``wide_rows(d, s, ‖d‖, ‖s‖)`` of each block in float64 (which may overwrite ``d``, ``s``)."""
    if dtype == torch.float64:
        blocks = row_blocks(decoded, _rowops.BLOCK_ELEMENTS // 2)
        return torch.cat([formula(decoded[b], source[b], dtype=dtype) for b in blocks])
    rows = torch.empty(decoded.shape[:-1], dtype=dtype, device=decoded.device)
    for block, d, s, d_norm, s_norm in _wide_blocks(decoded, source):
        rows[block] = wide_rows(d, s, d_norm, s_norm)
    return rows


def pair_gradients(
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
        for block, d, s, d_norm, s_norm in _wide_blocks(decoded, source):
            g = grad_rows[block].to(torch.float64)
            a, b, c, e = (k.unsqueeze(-1) for k in coefficients(d, s, d_norm, s_norm, g))
            for grad, (k_d, k_s) in zip(grads, ((a, b), (c, e)), strict=True):
                if grad is not None:
                    grad[block] = d * k_d + s * k_s
        return tuple(grads)

    return gradients
