"""The Multi-TopK recipe of docs/recipes.md against sparsify, the real package: eai-sparsify
1.3.3 (peers/sparsify.txt).

``sparse_coder.py``, ``SparseCoder.forward`` with ``multi_topk=True``: ``top_acts, top_indices =
pre_acts.topk(4 * self.cfg.k, sorted=False)``, ``sae_out = self.decode(top_acts, top_indices)``
(``decoder_impl(...) + b_dec``), ``multi_topk_fvu = (sae_out - y).pow(2).sum() /
total_variance`` with ``total_variance = (y - y.mean(0)).pow(2).sum()``; ``trainer.py`` adds
``out.multi_topk_fvu / 8``. ``fused_encoder.py``, ``FusedEncoder.backward`` ignores
``grad_preacts``: the term trains the decoder only.

Run with ``.peer-venvs/sparsify/bin/python -m pytest peer_tests/test_sparsify_recipes.py``.
"""

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from sparsify import SparseCoder, SparseCoderConfig

from peer_support import F64, close, close_grads, differ, grads, randn
from sae_losses import fraction_of_variance_unexplained

D_IN, LATENTS, K = 8, 32, 3


def multi_topk(pre_acts, w_dec, b_dec, x):
    """The recipe: the FVU of the top-4k decode, weight 1/8."""
    top = pre_acts.topk(4 * K, sorted=False)
    decoded = F.embedding_bag(top.indices, w_dec, per_sample_weights=top.values, mode="sum")
    return fraction_of_variance_unexplained(decoded + b_dec, x) / 8


def test_multi_topk_fvu_over_8_is_fvu_of_the_4k_decode():
    torch.manual_seed(0)
    sae = SparseCoder(
        D_IN, SparseCoderConfig(num_latents=LATENTS, k=K, multi_topk=True), dtype=torch.float64
    )
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * randn(D_IN, seed=1))
    x = randn(64, D_IN, seed=2) + 0.5 * randn(D_IN, seed=3)
    out = sae(x)
    peer = out.multi_topk_fvu / 8
    # With sparsify's own encoder (which drops the pre-activations' gradient) and with ours,
    # detached: the same value, and gradients to the decoder only.
    _, _, pre_acts = sae.encode(x)
    ours = multi_topk(pre_acts, sae.W_dec, sae.b_dec, x)
    close(ours, peer, F64)
    close_grads(ours, peer, sae.parameters(), F64)
    own_pre_acts = F.relu(F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
    detached = multi_topk(own_pre_acts.detach(), sae.W_dec, sae.b_dec, x)
    close(detached, peer, F64)
    close_grads(detached, peer, sae.parameters(), F64)
    (encoder_grad,) = grads(peer, [sae.encoder.weight])
    assert torch.equal(encoder_grad, torch.zeros_like(encoder_grad))
    # Not detached, the recipe trains the encoder too: what sparsify's fused encoder drops.
    attached = multi_topk(own_pre_acts, sae.W_dec, sae.b_dec, x)
    differ(grads(attached, [sae.encoder.weight])[0].abs().sum(), 0)
