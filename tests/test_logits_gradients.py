"""The gradients of cross_entropy and kl_divergence.

gradcheck of every row and of the mean under masks, on the one-call and the blocked path;
next-token views and double backward; the KL's gradient q - p, which sparsify's CE form shares;
half-precision gradients in the input dtype, one rounding from the float64 ones.
"""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

from logits_cases import draw, kl_rows, make_mask, targets_for
from sae_losses import _rowops, cross_entropy, kl_divergence


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("blocked", [False, True])
def test_gradcheck(monkeypatch, mask_kind, blocked):
    if blocked:  # blocks of 2 rows of 5: the hand-written blocked gradients
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 10)
    logits = draw((4, 2, 5), seed=3).requires_grad_()
    reference = draw((4, 2, 5), seed=4).requires_grad_()
    targets = targets_for(logits, seed=5)
    mask = None if mask_kind == "none" else make_mask(mask_kind, 4)
    # "none" checks every row's gradient; "mean" the reduce and the mask's weights on top.
    for reduce in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda z, reduce=reduce: cross_entropy(z, targets, reduce=reduce, mask=mask), (logits,)
        )
        assert torch.autograd.gradcheck(
            lambda r, z, reduce=reduce: kl_divergence(r, z, reduce=reduce, mask=mask),
            (reference, logits),
        )


def test_gradcheck_of_next_token_views_and_double_backward(monkeypatch):
    # logits[:, :-1] cannot be flattened without a copy: the blocks walk it row by row.
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 6)
    logits = draw((3, 4, 3), seed=6).requires_grad_()
    reference = draw((3, 4, 3), seed=7).requires_grad_()
    tokens = targets_for(logits, seed=8)

    def ce(z):
        return cross_entropy(z[:, :-1], tokens[:, 1:], reduce="none")

    def kl(r, z):
        return kl_divergence(r[:, :-1], z[:, :-1], mask=torch.tensor([True, False, True]))

    assert torch.autograd.gradcheck(ce, (logits,))
    assert torch.autograd.gradcheck(kl, (reference, logits))
    assert torch.autograd.gradgradcheck(ce, (logits,))
    assert torch.autograd.gradgradcheck(kl, (reference, logits))


def test_kl_gradient_to_logits_is_q_minus_p_and_sparsify_cross_entropy_matches_it():
    reference, logits = draw((4, 6), seed=9), draw((4, 6), seed=10).requires_grad_()
    (grad,) = torch.autograd.grad(kl_divergence(reference, logits, reduce="sum"), logits)
    torch.testing.assert_close(grad, logits.detach().softmax(-1) - reference.softmax(-1))
    # sparsify's kl loss, -sum p log q (trainer.py), has the same gradient to the logits.
    cross = -(reference.softmax(-1) * logits.log_softmax(-1)).sum()
    (sparsify_grad,) = torch.autograd.grad(cross, logits)
    torch.testing.assert_close(grad, sparsify_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gradients_have_the_input_dtype_and_one_rounding(dtype):
    logits = draw((6, 9), dtype, seed=11).requires_grad_()
    reference = draw((6, 9), dtype, seed=12).requires_grad_()
    targets = targets_for(logits, seed=13)
    grads = torch.autograd.grad(cross_entropy(logits, targets, reduce="sum"), logits)
    grads += torch.autograd.grad(
        kl_divergence(reference, logits, reduce="sum"), [reference, logits]
    )
    r64, z64 = (t.detach().double().requires_grad_() for t in (reference, logits))
    exact = [z64.detach().softmax(-1) - F.one_hot(targets, 9).double()]
    exact += torch.autograd.grad(kl_rows(r64, z64).sum(), [r64, z64])
    for got, want in zip(grads, exact, strict=True):
        assert got.dtype == dtype
        # float32 arithmetic, then one rounding to the dtype (none for float32).
        torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-6)
