"""sparsify's AuxK against this library's recipe (docs/topk_terms.md), with the dead mask given.

The real package, eai-sparsify 1.3.3 (peers/sparsify.txt). ``site-packages/sparsify/
sparse_coder.py``, ``SparseCoder.forward`` with a ``dead_mask``: ``k_aux = y.shape[-1] // 2``,
``scale = min(num_dead / k_aux, 1)``, the top ``min(k_aux, num_dead)`` dead latents of
``pre_acts`` (the fused encoder's post-ReLU pre-activations), ``e_hat = decoder_impl(...)``
with no bias, and ``auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance``,
the variance of the input ``y``. ``fused_encoder.py``, ``FusedEncoder.backward`` ignores
``grad_preacts``: AuxK trains only ``W_dec``.

Not run by ``make test-peers`` (which runs ``peer_tests/test_sparsify.py`` only); run it with
``.peer-venvs/sparsify/bin/python -m pytest peer_tests/test_sparsify_auxk.py``.
"""

import pytest
import torch
from sparsify import SparseCoder, SparseCoderConfig

from peer_support import F64, close, close_grads, grads, randn
from sae_losses import auxk_reconstruction, fraction_of_variance_unexplained

D_IN, LATENTS, K = 8, 32, 4


def coder(seed):
    torch.manual_seed(seed)
    return SparseCoder(D_IN, SparseCoderConfig(num_latents=LATENTS, k=K), dtype=torch.float64)


def activations(rows, seed):
    return randn(rows, D_IN, seed=seed) + 0.5 * randn(D_IN, seed=seed + 1)


def recipe(sae, x, sae_out, dead, pre_acts=None):
    """docs/topk_terms.md, sparsify: the FVU of x_hat + e_hat against the input, times scale."""
    k_aux = x.shape[-1] // 2
    if pre_acts is None:
        pre_acts = sae.encode(x).pre_acts.detach()
    e_hat = auxk_reconstruction(pre_acts, dead, sae.W_dec, k_aux=k_aux)
    scale = (dead.sum() / k_aux).clamp(max=1)
    return scale * fraction_of_variance_unexplained(sae_out.detach() + e_hat, x)


@pytest.mark.parametrize("dead_every", [3, 16])  # 11 dead (scale 1), 2 dead (scale 1/2)
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradients_equal_sparsify(dead_every, seed):
    sae = coder(seed)
    x = activations(64, seed)
    dead = torch.arange(LATENTS) % dead_every == 0
    out = sae(x, dead_mask=dead)
    ours = recipe(sae, x, out.sae_out, dead)
    close(ours, out.auxk_loss, F64)
    close_grads(ours, out.auxk_loss, sae.parameters(), F64)
    assert grads(out.auxk_loss, [sae.W_dec])[0].abs().sum() > 0


def test_nothing_dead_is_zero_on_both_sides():
    sae = coder(2)
    x = activations(16, 2)
    dead = torch.zeros(LATENTS, dtype=torch.bool)
    out = sae(x, dead_mask=dead)
    ours = recipe(sae, x, out.sae_out, dead)
    assert out.auxk_loss.item() == 0.0
    assert ours.item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads(ours, sae.parameters()))


def test_sparsify_sends_no_gradient_to_the_encoder():
    # The difference the docs state: from pre-activations with a gradient (the same values,
    # through a plain encoder), our AuxK trains the encoder too; sparsify's fused one does not.
    sae = coder(3)
    x = activations(32, 3)
    dead = torch.arange(LATENTS) % 2 == 0
    out = sae(x, dead_mask=dead)
    peer_grad = grads(out.auxk_loss, [sae.encoder.weight])[0]
    pre_acts = torch.relu(sae.encoder(x - sae.b_dec))
    ours = recipe(sae, x, out.sae_out, dead, pre_acts)
    close(ours, out.auxk_loss, F64)
    assert peer_grad.abs().sum() == 0
    assert grads(ours, [sae.encoder.weight])[0].abs().sum() > 0
