"""Cross-entropy of logits against integer targets: per token, exact, in blocks of rows.

The formula, an eager kernel and blocked gradients; :func:`sae_losses._logits.vocab_row_term`
does the rest (autograd saving only the inputs, the mask, the reduce).
"""

import torch
from jaxtyping import Float, Int64
from torch import Tensor

from sae_losses._checks import Reduce, shape_str
from sae_losses._logits import (
    check_logits,
    double_backward,
    flat_rows,
    gradient_rows,
    kept_rows,
    log_partition,
    shifted,
    vocab_blocks,
    vocab_row_term,
)
from sae_losses._masks import Mask, check_mask, keep_of, row_view
from sae_losses._rowops import Gradients, RowOp, Tensors

__all__ = ["cross_entropy"]


def _minus_log_probability(picked: Tensor, picked_exp: Tensor, rest: Tensor) -> Tensor:
    r""":math:`-\log p_t` from :math:`s_t = z_t - m`, :math:`e^{s_t}` and
    :math:`r = \sum_{v \ne t} e^{z_v - m}`, each ``(rows, 1)``.

    A confident prediction (:math:`s_t > -1`) takes :math:`\mathrm{log1p}(r / e^{s_t})`, which
    keeps the relative precision of a small loss that :math:`\log(e^{s_t} + r)` rounds away;
    otherwise :math:`\log(e^{s_t} + r) - s_t`, a sum of two non-negative terms (at least 1.3).
    """
    confident = picked > -1
    safe = torch.where(confident, picked_exp, 1)  # no 0 / 0 in the branch not taken
    return torch.where(confident, (rest / safe).log1p(), (picked_exp + rest).log() - picked)


def _ce_formula(
    logits: Tensor, targets: Tensor, keep: Tensor | None = None, *, dtype: torch.dtype
) -> Tensor:
    if keep is not None:
        logits = torch.where(row_view(keep, logits), logits, 0)
    difference, exponentials = log_partition(logits, dtype)
    index = targets.unsqueeze(-1)
    rest = exponentials.scatter(-1, index, 0).sum(-1, keepdim=True)
    picked, picked_exp = difference.gather(-1, index), exponentials.gather(-1, index)
    # The vocab axis is squeezed last: a DTensor sharded over the vocabulary gathers into a
    # partial value whose reduction (torch 2.13) fails on the squeezed shape.
    return _minus_log_probability(picked, picked_exp, rest).squeeze(-1)


def _ce_rows(
    logits: Tensor, targets: Tensor, keep: Tensor | None = None, *, dtype: torch.dtype
) -> Tensor:
    rows = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
    out, all_targets = rows.view(-1), flat_rows(targets).unsqueeze(-1)
    for block, (x,) in vocab_blocks(logits):
        index = all_targets[block]
        difference = shifted(x, dtype)
        picked = difference.gather(-1, index)
        exponentials = difference.exp_()
        picked_exp = exponentials.gather(-1, index)
        rest = exponentials.scatter_(-1, index, 0).sum(-1, keepdim=True)
        out[block] = _minus_log_probability(picked, picked_exp, rest).squeeze(-1)
    return rows


def _ce_gradients(
    inputs: Tensors, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Gradients:
    """d/d(logits) = (softmax(logits) - onehot(target)) g, block by block into the gradient."""
    if torch.is_grad_enabled():
        return double_backward(CROSS_ENTROPY, inputs, grad_rows, dtype, needs)
    logits, targets, *keep = inputs
    assert logits is not None
    assert targets is not None
    grad = gradient_rows(logits)
    all_targets, all_grads = flat_rows(targets).unsqueeze(-1), flat_rows(grad_rows).unsqueeze(-1)
    kept = kept_rows(keep, targets)
    for block, (x,) in vocab_blocks(logits):
        probabilities = torch.softmax(x.to(dtype), -1)  # converted first: see shifted
        target = all_targets[block]
        # Subtracted in float32 before the rounding to the logits' dtype: 1 - p can be tiny.
        probabilities.scatter_(-1, target, probabilities.gather(-1, target) - 1)
        probabilities.mul_(all_grads[block])
        if kept is not None:  # a dropped row may hold NaN: 0 * NaN is not 0
            probabilities.masked_fill_(~kept[block], 0)
        grad[block] = probabilities
    return grad.view(logits.shape), *(None for _ in inputs[1:])


CROSS_ENTROPY = RowOp(_ce_formula, _ce_rows, _ce_gradients)


def _check_targets(targets: object, logits: Tensor) -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"`targets` must be a torch.Tensor, got {type(targets).__name__}.")
    if targets.dtype != torch.int64:
        raise TypeError(
            f"`targets` must be an int64 tensor of vocabulary indices, got dtype {targets.dtype}."
        )
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            "`targets` must have the shape of `logits` without its vocab axis, "
            f"{shape_str(logits.shape[:-1])}, got {shape_str(targets)}."
        )
    if targets.device != logits.device:
        raise ValueError(f"`targets` is on {targets.device} but `logits` is on {logits.device}.")
    return targets


def cross_entropy(
    logits: Float[Tensor, "batch *component vocab"],
    targets: Int64[Tensor, " batch *component"],
    *,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""Cross-entropy per token: minus the log-probability that ``logits`` give the target.

    .. math::

        \ell_{b,c} = \log \sum_{v=1}^{V} e^{z_{b,c,v}} - z_{b,c,t}
                   = \mathrm{log1p}\Big(\sum_{v \ne t} e^{z_{b,c,v} - z_{b,c,t}}\Big),
        \qquad t = t_{b,c}

    then ``mask`` and ``reduce`` over the batch axis as in :func:`l2_reconstruction`. Each
    ``(batch, *component)`` position is a row: flatten ``(batch, seq)`` into rows first, so that
    ``mask`` selects tokens. The value is ``F.cross_entropy(logits.double(), targets,
    reduction="none")`` (TransformerLens's ``lm_cross_entropy_loss(..., per_token=True)`` for the
    next-token shift), computed in float32 for half logits and in float64 for float64, from the
    differences to the row's largest logit: the second form for a confident prediction, where
    the first would round a small loss away, else the first. So it keeps the compute dtype's
    relative precision, for logits near 1e4 too (``logsumexp(z) - z_t`` loses ``ulp(1e4)``).
    Rows are computed in blocks: nothing of size ``rows x vocab`` in float32 is made, and only
    the inputs are saved for backward. The gradient flows to ``logits``:
    :math:`(\mathrm{softmax}(z) - \mathrm{onehot}(t))` times the row's weight.

    Targets are never ignored: a target outside ``[0, vocab)`` in a kept row raises (torch's
    index error; a device-side assert on CUDA), where ``F.cross_entropy`` returns 0 for -100.
    The targets of rows that ``mask`` drops are not read, so -100 padding works with a mask.
    A logit of ``-inf`` at the target gives ``+inf``; a row of ``-inf`` (or with ``+inf``) NaN.

    Shapes:
        - ``logits``: ``(batch, *component, vocab)``, any floating dtype but float8.
        - ``targets``: ``(batch, *component)``, int64.
        - ``mask``: ``(batch,)``, bool or floating row weights, as in :func:`l2_reconstruction`.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise.

    Raises:
        TypeError: ``logits`` is not floating, ``targets`` is not int64, or ``mask`` is neither
            bool nor floating.
        ValueError: ``logits`` has fewer than 2 dimensions or an empty vocabulary, ``targets``
            does not have the shape of ``logits`` without its last axis, ``mask`` is not
            ``(batch,)``, or ``reduce`` is not one of the modes.
        RuntimeError: a kept row's target is outside ``[0, vocab)``.

    Example: the next-token loss of a ``(batch, seq, vocab)`` model output. The prediction at
    position ``s`` is scored against token ``s + 1``, so ``logits[:, :-1]`` meets ``tokens[:, 1:]``:

        >>> import torch
        >>> from sae_losses import cross_entropy
        >>> logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 1.0]]])
        >>> tokens = torch.tensor([[2, 0, 1]])  # (batch=1, seq=3), vocab 3
        >>> rows, next_tokens = logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
        >>> losses = cross_entropy(rows, next_tokens, reduce="none")
        >>> losses  # log(e^2 + 2) - 2 = 0.2395 and log(3)
        tensor([0.2395, 1.0986])
        >>> losses.mean()
        tensor(0.6691)

    Without the copy that ``flatten`` makes of ``logits[:, :-1]``: score every position
    against the next token and mask the last one, which has none (its target is never read):

        >>> scored = torch.ones_like(tokens, dtype=torch.bool)
        >>> scored[:, -1] = False
        >>> next_tokens = tokens.roll(-1, dims=1).flatten()  # the last position wraps around
        >>> cross_entropy(logits.flatten(0, 1), next_tokens, mask=scored.flatten())
        tensor(0.6691)
    """
    logits = check_logits("logits", logits)
    targets = _check_targets(targets, logits)
    keep = keep_of(check_mask(mask, logits))
    if keep is not None:
        targets = torch.where(row_view(keep, targets), targets, 0)
    return vocab_row_term(CROSS_ENTROPY, (logits, targets), reduce=reduce, mask=mask)
