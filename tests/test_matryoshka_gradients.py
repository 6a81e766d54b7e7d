"""matryoshka_l2's gradients: the incremental backward against plain autograd of the naive formula.

With and without masks, across widths; gradcheck and gradgradcheck of every input; no bias and a
retained graph; torch.func's grad, jacrev (to second order) and vmap; forward mode is a clear
error. Latents and decoder rows beyond the last width get exactly 0.
"""

import pytest
import torch
from torch.func import grad, jacrev, vmap

from helpers import randn
from matryoshka_cases import BATCH, WIDTHS, call, inputs, naive_grads, naive_rows

GRAD_WIDTHS = [WIDTHS, [12], [4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 10]]


@pytest.mark.parametrize("widths", GRAD_WIDTHS, ids=str)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_incremental_backward_equals_autograd_of_the_naive_formula(widths, mask_kind):
    tensors = inputs(seed=4)
    mask = {None: None, "bool": torch.arange(BATCH) % 3 != 1}.get(mask_kind)
    if mask_kind == "float":
        mask = torch.linspace(0.5, 2.0, BATCH, dtype=torch.float64) * (torch.arange(BATCH) % 3 != 1)
    cotangent = randn(BATCH, len(widths), dtype=torch.float64, seed=5)
    rows = call(*tensors, widths, reduce="none", mask=mask)
    found = torch.autograd.grad(rows, tensors, cotangent)
    for got, want in zip(found, naive_grads(tensors, widths, cotangent, mask), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # Latents and decoder rows beyond the last width get exactly 0.
    assert torch.equal(found[0][:, widths[-1] :], torch.zeros_like(found[0][:, widths[-1] :]))
    assert torch.equal(found[1][widths[-1] :], torch.zeros_like(found[1][widths[-1] :]))
    assert found[1][: widths[-1]].abs().sum() > 0


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("widths", [WIDTHS, [7]], ids=str)
def test_gradcheck_every_input(widths, mask_kind):
    tensors = inputs(batch=4, d_sae=8, d_model=3, seed=6)
    keep = torch.tensor([True, False, True, True])
    mask = {None: None, "bool": keep, "float": keep * torch.tensor([0.5, 1.0, 2.0, 1.5]).double()}[
        mask_kind
    ]
    widths = [w for w in widths if w <= 8] or [8]
    assert torch.autograd.gradcheck(lambda *t: call(*t, widths, reduce="none", mask=mask), tensors)
    assert torch.autograd.gradgradcheck(lambda *t: call(*t, widths, mask=mask), tensors)


def test_gradcheck_without_bias_and_in_a_retained_graph():
    z, w_dec, x, _ = inputs(batch=4, d_sae=8, d_model=3, seed=7)
    assert torch.autograd.gradcheck(lambda *t: call(*t, None, [2, 8], reduce="sum"), (z, w_dec, x))
    total = call(z, w_dec, x, None, [2, 8]).sum()
    first = torch.autograd.grad(total, (z, w_dec), retain_graph=True)
    second = torch.autograd.grad(total, (z, w_dec))  # the saved residuals were not overwritten
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_torch_func_grad_jacrev_and_vmap_match_eager():
    z, w_dec, x, b_dec = (t.detach() for t in inputs(seed=8))

    def loss(z, w_dec):
        return call(z, w_dec, x, b_dec).sum()

    found = grad(loss, argnums=(0, 1))(z, w_dec)
    expected = naive_grads(
        [z, w_dec, x, b_dec], WIDTHS, torch.ones(BATCH, 4, dtype=torch.float64) / BATCH
    )
    for got, want in zip(found, expected[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    jacobian = jacrev(lambda z: call(z, w_dec, x, b_dec, reduce="none"))(z)
    naive = jacrev(lambda z: naive_rows(z, w_dec, x, b_dec, WIDTHS))(z)
    torch.testing.assert_close(jacobian, naive, rtol=1e-12, atol=1e-14)
    hessian = jacrev(jacrev(lambda w: call(z, w, x, b_dec).sum()))(w_dec)
    naive = jacrev(jacrev(lambda w: naive_rows(z, w, x, b_dec, WIDTHS).mean(0).sum()))(w_dec)
    torch.testing.assert_close(hessian, naive, rtol=1e-12, atol=1e-14)
    stacked = torch.stack([z, z.flip(0)])
    batched = vmap(grad(loss))(stacked, w_dec.expand(2, *w_dec.shape))
    for i in range(2):
        torch.testing.assert_close(batched[i], grad(loss)(stacked[i], w_dec))


def test_forward_mode_is_a_clear_error():
    z, w_dec, x, b_dec = (t.detach() for t in inputs())
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda z: call(z, w_dec, x, b_dec), (z,), (torch.ones_like(z),))
