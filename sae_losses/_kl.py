"""The KL divergence between the next-token distributions of two sets of logits, per token.

The formula, an eager kernel and blocked gradients to both inputs;
:func:`sae_losses._logits.vocab_row_term` does the rest (autograd saving only the inputs, the
mask, the reduce).
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from sae_losses._checks import Reduce, check_same_shape
from sae_losses._logits import (
    block_softmax,
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
from sae_losses._masks import Mask, row_view
from sae_losses._rowops import Gradients, RowOp, Tensors

__all__ = ["kl_divergence"]


def _kl_formula(
    reference: Tensor, logits: Tensor, keep: Tensor | None = None, *, dtype: torch.dtype
) -> Tensor:
    if keep is not None:
        view = row_view(keep, logits)
        reference, logits = torch.where(view, reference, 0), torch.where(view, logits, 0)
    reference_difference, exponentials = log_partition(reference, dtype)
    reference_total = exponentials.sum(-1, keepdim=True)
    p = exponentials / reference_total
    difference, logits_exponentials = log_partition(logits, dtype)
    offset = reference_total.log() - logits_exponentials.sum(-1, keepdim=True).log()
    log_ratio = (reference_difference - difference) - offset  # log p - log q
    positive = p > 0  # 0 log 0 = 0, and no 0 * inf in the gradient
    return torch.where(positive, p * torch.where(positive, log_ratio, 0), 0).sum(-1)


def _kl_rows(
    reference: Tensor, logits: Tensor, keep: Tensor | None = None, *, dtype: torch.dtype
) -> Tensor:
    rows = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
    out = rows.view(-1)
    for block, (r, z) in vocab_blocks(reference, logits):
        log_ratio, p, reference_total = block_softmax(r, dtype)
        difference = shifted(z, dtype)
        log_ratio.sub_(difference)
        offset = reference_total.log_().sub_(difference.exp_().sum(-1, keepdim=True).log_())
        terms = log_ratio.sub_(offset).mul_(p)
        # Where p = 0 meets an infinite log-ratio (a -inf logit), the product is NaN and the term
        # is 0: nan_to_num is a third of the cost of a p == 0 mask. A row with NaN or +inf
        # logits has a NaN offset (the sums are NaN), and keeps its NaN through 0 * offset.
        terms.nan_to_num_(0.0, math.inf, -math.inf)
        out[block] = terms.sum(-1).add_(offset.squeeze(-1), alpha=0)
    return rows


def _kl_gradients(
    inputs: Tensors, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Gradients:
    r"""d/dz = (q - p) g and d/dr = p (log p - log q - KL) g, block by block; 0 where p = 0."""
    if torch.is_grad_enabled():
        return double_backward(KL_DIVERGENCE, inputs, grad_rows, dtype, needs)
    reference, logits, *keep = inputs
    assert reference is not None
    assert logits is not None
    grad_reference = gradient_rows(reference) if needs[0] else None
    grad_logits = gradient_rows(logits) if needs[1] else None
    all_grads = flat_rows(grad_rows).unsqueeze(-1)
    kept = kept_rows(keep, grad_rows)
    for block, (r, z) in vocab_blocks(reference, logits):
        g = all_grads[block]
        log_ratio, p, reference_total = block_softmax(r, dtype)
        difference, q, total = block_softmax(z, dtype)
        if grad_reference is not None:
            dropped = p == 0
            log_ratio.sub_(difference).sub_(reference_total.log_().sub_(total.log_()))
            log_ratio.masked_fill_(dropped, 0)
            divergence = (log_ratio * p).sum(-1, keepdim=True)
            grad = log_ratio.sub_(divergence).mul_(p).masked_fill_(dropped, 0).mul_(g)
            grad_reference[block] = grad if kept is None else grad.masked_fill_(~kept[block], 0)
        if grad_logits is not None:
            grad = q.sub_(p).mul_(g)
            grad_logits[block] = grad if kept is None else grad.masked_fill_(~kept[block], 0)
    return (
        None if grad_reference is None else grad_reference.view(reference.shape),
        None if grad_logits is None else grad_logits.view(logits.shape),
        *(None for _ in inputs[2:]),
    )


KL_DIVERGENCE = RowOp(_kl_formula, _kl_rows, _kl_gradients)


def kl_divergence(
    reference_logits: Float[Tensor, "batch *component vocab"],
    logits: Float[Tensor, "batch *component vocab"],
    *,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""KL divergence per token from the reference distribution to the one ``logits`` give.

    .. math::

        \ell_{b,c} = \mathrm{KL}(p \,\|\, q) = \sum_{v=1}^{V} p_v (\log p_v - \log q_v),
        \qquad p = \mathrm{softmax}(r_{b,c}), \quad q = \mathrm{softmax}(z_{b,c})

    with :math:`r` = ``reference_logits`` (the clean model's) and :math:`z` = ``logits`` (with
    the SAE spliced in), then ``mask`` and ``reduce`` over the batch axis as in
    :func:`l2_reconstruction`. Each ``(batch, *component)`` position is a row: flatten
    ``(batch, seq)`` into rows first, so that ``mask`` selects tokens. This is SAELens's
    ``kl_div_with_sae`` per token, ``F.kl_div(log_softmax(z), softmax(r)).sum(-1)``.

    The log-probabilities come from the differences to each row's largest logit,
    :math:`\log p_v = (r_v - m) - \log \sum_u e^{r_u - m}`, never from ``log(softmax)``, and the
    two are subtracted in that form, so logits near 1e4 lose nothing to ``ulp(1e4)``; the KL of
    identical inputs is exactly 0. Terms with :math:`p_v = 0` (in the compute dtype) are 0,
    ``-inf`` logits included; :math:`p_v > 0` with :math:`q_v = 0` gives ``+inf``; a row with a
    NaN or ``+inf`` logit, or only ``-inf`` ones, gives NaN. It is computed in float32 for half
    logits and in float64 for float64, in blocks of rows: nothing of size ``rows x vocab`` in
    float32 is made, and only the inputs are saved for backward. Its terms have both signs, so
    its rounding is that of terms of size 1, not relative to a small KL.

    Gradients flow to both inputs: :math:`(q - p)\,g` to ``logits`` and
    :math:`p \odot (\log p - \log q - \mathrm{KL})\,g` to ``reference_logits``, 0 where
    :math:`p_v = 0`. Where the value is ``+inf``, the gradient to ``reference_logits`` is NaN.
    sparsify's ``kl`` loss, :math:`H(p, q) = -\sum_v p_v \log q_v`, is this plus the entropy
    :math:`H(p)`: the same gradient to ``logits``, a larger value.

    Shapes:
        - ``reference_logits``, ``logits``: ``(batch, *component, vocab)``, identical shapes.
        - ``mask``: ``(batch,)``, bool or floating row weights, as in :func:`l2_reconstruction`.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise.

    Raises:
        TypeError: an input is not floating, or ``mask`` is neither bool nor floating.
        ValueError: the shapes differ, an input has fewer than 2 dimensions or an empty
            vocabulary, ``mask`` is not ``(batch,)``, or ``reduce`` is not one of the modes.

    Example:
        >>> import math, torch
        >>> from sae_losses import kl_divergence
        >>> reference = torch.tensor([[0.0, 0.0], [0.0, -math.inf]])  # p: (1/2, 1/2), (1, 0)
        >>> logits = torch.tensor([[0.0, math.log(3.0)], [0.0, -math.inf]])  # (1/4, 3/4), (1, 0)
        >>> kl_divergence(reference, logits, reduce="none")  # log(4/3) / 2 and 0 (not NaN)
        tensor([0.1438, 0.0000])
    """
    reference = check_logits("reference_logits", reference_logits)
    logits = check_logits("logits", logits)
    check_same_shape("`reference_logits` and `logits`", reference, logits)
    return vocab_row_term(KL_DIVERGENCE, (reference, logits), reduce=reduce, mask=mask)
