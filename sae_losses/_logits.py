"""What the terms over a vocabulary share: the logits check, blocks of token rows, and the mask.

Logits are ``(batch, *component, vocab)``; each ``(batch, *component)`` position is a row (a
token), and a row's temporaries are ``vocab`` long, so a float32 copy of a whole batch of logits
(1.6 GB at 8192 tokens x 50257) must never exist. :func:`vocab_blocks` cuts the flattened rows
into blocks of about ``_rowops.BLOCK_ELEMENTS`` elements, as views: ``logits[:, :-1]``, whose
leading axes do not merge, is walked one batch row at a time instead of being copied.

:func:`vocab_row_term` is :func:`sae_losses._row_term.row_term` for such terms. ``row_term``'s
backward zeroes the dropped rows of every batched input with ``torch.where`` before computing the
gradient: here that would be a full copy of the logits. Instead the rows' ``keep`` is handed to
the op as its last batched input, and the op's gradients apply it block by block.
"""

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from sae_losses._checks import check_activations, check_reduce
from sae_losses._masks import check_mask, keep_of, row_view
from sae_losses._row_term import reduce_rows, row_term
from sae_losses._rowops import (
    EAGER,
    Gradients,
    RowOp,
    RowSpec,
    Tensors,
    formula_gradients,
    row_blocks,
)

__all__ = [
    "block_softmax",
    "check_logits",
    "double_backward",
    "flat_rows",
    "gradient_rows",
    "kept_rows",
    "log_partition",
    "shifted",
    "vocab_blocks",
    "vocab_row_term",
]


def check_logits(name: str, x: object) -> Tensor:
    """A floating tensor shaped ``(batch, *component, vocab)`` with a non-empty vocabulary."""
    return check_activations(name, x, last="vocab")


def vocab_row_term(
    op: RowOp, batched: tuple[Tensor, ...], *, reduce: object, mask: object
) -> Tensor:
    """``row_term`` with the mask applied inside the op's blocks: ``op`` takes ``keep`` last.

    ``keep`` is a batched input only when there is a mask (``row_term`` takes no None there). The
    formula and the gradients must make the rows ``keep`` drops inert (``torch.where``); the
    eager forward kernel may ignore it, since the dropped rows' values are replaced by 0 here.
    """
    reduce = check_reduce(reduce)
    checked = check_mask(mask, batched[0])
    keep = keep_of(checked)
    with_keep = batched if keep is None else (*batched, keep)
    return reduce_rows(row_term(op, with_keep, reduce="none", mask=None), reduce, checked)


def double_backward(
    op: RowOp, inputs: Tensors, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Gradients:
    """Gradients that can be differentiated again, from the formula: the blocked ones work in
    place on their temporaries, which autograd cannot differentiate."""
    spec = RowSpec(op, len(inputs), dtype, {}, EAGER)
    return formula_gradients(spec, inputs, grad_rows, needs)


def flat_rows(per_row: Tensor, like: Tensor | None = None) -> Tensor:
    """A ``(batch, *component)`` tensor as ``(rows,)``; a ``(batch,)`` one is first broadcast to
    ``like``'s ``(batch, *component)``. Small tensors: a copy is fine."""
    if like is not None:
        per_row = row_view(per_row, like).expand(like.shape)
    return per_row.reshape(-1)


def gradient_rows(x: Tensor) -> Tensor:
    """An uninitialised ``(rows, vocab)`` gradient of ``x``: contiguous, in ``x``'s dtype."""
    return torch.empty((math.prod(x.shape[:-1]), x.shape[-1]), dtype=x.dtype, device=x.device)


def kept_rows(keep: Sequence[Tensor | None], like: Tensor) -> Tensor | None:
    """The ``(rows, 1)`` bool keep of the flattened rows of ``like``, from an op's optional last
    batched input (``*keep`` after the others), or None without a mask."""
    return flat_rows(keep[0], like).unsqueeze(-1) if keep and keep[0] is not None else None


def vocab_blocks(*big: Tensor) -> Iterator[tuple[slice, tuple[Tensor, ...]]]:
    """Blocks of the rows of ``big`` (tensors of one shape): each block's slice of the flattened
    rows and its ``(rows, vocab)`` views, in order, in blocks of about ``BLOCK_ELEMENTS``."""
    yield from _blocks(big, 0)


def _blocks(big: tuple[Tensor, ...], start: int) -> Iterator[tuple[slice, tuple[Tensor, ...]]]:
    try:
        matrices = tuple(x.view(-1, x.shape[-1]) for x in big)
    except RuntimeError:  # the leading axes do not merge into one without a copy
        step = math.prod(big[0].shape[1:-1])
        for i in range(big[0].shape[0]):
            yield from _blocks(tuple(x[i] for x in big), start + i * step)
        return
    for block in row_blocks(matrices[0]):
        rows = range(start, start + matrices[0].shape[0])[block]
        yield slice(rows.start, rows.stop), tuple(m[block] for m in matrices)


def log_partition(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    r"""``(x - m, e^(x - m))`` per row of ``x``, in ``dtype``: differentiable, out of place.

    :math:`m` is the row's largest logit, detached (no value depends on it). Every
    log-probability is built as :math:`(x_v - m) - \log \sum_u e^{x_u - m}`: the first
    difference is exact for the logits near the maximum (within a factor 2 of it), so bfloat16
    logits near 1e4 keep float32's precision instead of an error of ``ulp(1e4)``.
    """
    top = x.detach().amax(-1, keepdim=True).to(dtype)
    difference = x.to(dtype) - top
    return difference, difference.exp()


def shifted(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An eager block's ``x - m``, a new tensor in ``dtype``. Half logits are converted first: on
    the CPU a subtraction that mixes bfloat16 and float32 is about 40x slower."""
    converted = x.to(dtype)
    top = converted.amax(-1, keepdim=True)
    return converted - top if converted is x else converted.sub_(top)


def block_softmax(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """An eager block's ``(x - m, softmax(x), sum_v e^(x_v - m))``, in new tensors."""
    difference = shifted(x, dtype)
    p = difference.exp()
    total = p.sum(-1, keepdim=True)
    return difference, p.div_(total), total
