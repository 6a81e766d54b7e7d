"""cross_entropy and kl_divergence at the edges of floating point.

bfloat16 logits near 1e4 keep float32 precision; -inf logits (a zero-probability entry, a target
of probability 0, a row that is no distribution); a NaN or +inf logit in a kept row gives NaN,
not a silent number; a vocabulary of one.
"""

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

from helpers import randn
from logits_cases import ce_rows, draw, kl_rows, targets_for
from sae_losses import _rowops, cross_entropy, kl_divergence


def large_logits(seed):
    """bfloat16 logits at +-1e4, where bfloat16's spacing is 64: each row's largest logits tie
    or sit 64 or more apart."""
    sign = torch.where(randn(64, 300, seed=seed) > 0, 1.0, -1.0)
    return (1e4 * sign + 60 * randn(64, 300, seed=seed + 1)).to(torch.bfloat16)


def test_bfloat16_logits_near_1e4_keep_float32_precision():
    logits = large_logits(20)
    top = logits.float().argmax(-1)
    for targets in (top, top.roll(1)):  # CE = log(ties) or ~0; and large values
        ce = cross_entropy(logits, targets, reduce="none").double()
        expected = ce_rows(logits, targets)
        torch.testing.assert_close(ce, expected, rtol=1e-6, atol=1e-7)
    # The plain float32 form, logsumexp - z_t, rounds logsumexp ~ 1e4 to ulp(1e4) = 2^-10.
    naive = torch.logsumexp(logits.float(), -1) - logits.float().gather(-1, top[:, None])[:, 0]
    assert (naive.double() - ce_rows(logits, top)).abs().max() > 1e-4
    # The KL after moving each row's largest logit down one bfloat16 step: values of O(1) to
    # O(64), each from terms near 1e4.
    nudged = logits.clone()
    nudged[torch.arange(64), top] -= 64
    kl = kl_divergence(logits, nudged, reduce="none").double()
    expected = kl_rows(logits, nudged)
    assert expected.median() > 1
    torch.testing.assert_close(kl, expected, rtol=1e-6, atol=1e-7)


def test_minus_infinity_logits():
    inf = math.inf
    logits = torch.tensor([[0.0, -inf, 1.0], [0.0, -inf, 1.0], [-inf, -inf, -inf]]).requires_grad_()
    targets = torch.tensor([0, 1, 0])
    rows = cross_entropy(logits, targets, reduce="none")
    # log(1 + e) - 0; the target's logit is -inf: +inf; a row of -inf is no distribution: NaN.
    assert rows[0].item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert rows[1].item() == inf
    assert rows[2].isnan()
    (grad,) = torch.autograd.grad(rows[:2].sum(), logits)
    assert grad[:2].isfinite().all()
    p = torch.tensor([1.0, 0.0, math.e]) / (1 + math.e)
    torch.testing.assert_close(grad[0], p - torch.tensor([1.0, 0.0, 0.0]))
    assert grad[1, 1] == -1.0  # softmax 0, minus the one-hot


def test_kl_with_minus_infinity_logits():
    inf = math.inf
    # Row 0: -inf at the same entry of both: p_v = q_v = 0 contributes 0 (SAELens: NaN).
    # Row 1: p_v = 0 where q_v > 0: finite. Row 2: p_v > 0 where q_v = 0: +inf.
    reference = torch.tensor([[0.0, 0.0, -inf], [0.0, 1.0, -inf], [0.0, 0.0, 1.0]])
    logits = torch.tensor([[0.0, 1.0, -inf], [0.0, 0.0, 2.0], [0.0, 0.0, -inf]])
    reference, logits = reference.requires_grad_(), logits.requires_grad_()
    rows = kl_divergence(reference, logits, reduce="none")
    torch.testing.assert_close(rows[:2].double(), kl_rows(reference[:2], logits[:2]))
    assert rows[:2].isfinite().all()
    assert rows[2].item() == inf
    saelens = F.kl_div(F.log_softmax(logits, -1), F.softmax(reference, -1), reduction="none")
    assert saelens.sum(-1)[0].isnan()
    # Gradients of the first two rows (the third's +inf would send NaN to the reference).
    first_two = kl_divergence(reference[:2], logits[:2], reduce="sum")
    grads = torch.autograd.grad(first_two, [reference, logits])
    for grad in grads:
        assert grad.isfinite().all()
    assert grads[0][0, 2] == 0
    assert grads[0][1, 2] == 0
    torch.testing.assert_close(
        grads[1][:2], (logits.detach().softmax(-1) - reference.detach().softmax(-1))[:2]
    )
    # Where the value is +inf, the gradient to the logits stays finite.
    (grad_logits,) = torch.autograd.grad(rows[2], logits)
    assert grad_logits.isfinite().all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("blocked", [False, True])
def test_a_nan_or_plus_inf_logit_in_a_kept_row_gives_nan(monkeypatch, bad, blocked):
    # Not a silent number: the KL kernel zeroes its 0 * inf terms, but never a NaN row.
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 10)
    reference, logits = draw((6, 5), seed=32), draw((6, 5), seed=33)
    targets = targets_for(logits, seed=34)
    spoiled = [t.clone() for t in (reference, logits)]
    spoiled[0][1, 2] = bad
    spoiled[1][4, 0] = bad
    spoiled[0][5] = -math.inf  # a row of -inf logits is no distribution either
    kl = kl_divergence(*spoiled, reduce="none")
    ce = cross_entropy(spoiled[1], targets, reduce="none")
    ce_reference = cross_entropy(spoiled[0], targets, reduce="none")
    assert kl[[1, 4, 5]].isnan().all()
    assert kl[[0, 2, 3]].isfinite().all()
    assert ce[4].isnan()
    assert ce_reference[[1, 5]].isnan().all()


def test_vocabulary_of_one():
    for dtype in (torch.float64, torch.bfloat16):
        logits = draw((4, 2, 1), dtype, seed=30).requires_grad_()
        reference = draw((4, 2, 1), dtype, seed=31).requires_grad_()
        zeros = torch.zeros(4, 2, dtype=torch.int64)
        ce = cross_entropy(logits, zeros, reduce="none")
        kl = kl_divergence(reference, logits, reduce="none")
        assert torch.equal(ce, torch.zeros_like(ce))
        assert torch.equal(kl, torch.zeros_like(kl))
        for grad in torch.autograd.grad(ce.sum() + kl.sum(), [logits, reference]):
            assert torch.equal(grad, torch.zeros_like(grad))
