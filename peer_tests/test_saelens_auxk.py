"""SAELens's TopK AuxK against this library's recipe (docs/topk_terms.md), with the dead mask.

The real package, sae-lens 6.54.12 (peers/saelens.txt). ``site-packages/sae_lens/saes/
topk_sae.py``: ``TopKTrainingSAE.calculate_topk_aux_loss``: ``k_aux = sae_in.shape[-1] // 2``,
``scale = min(num_dead / k_aux, 1)``, ``calculate_topk_aux_acts`` scatters the top
``min(k_aux, num_dead)`` dead ``hidden_pre`` values (no ReLU) into a dense buffer,
``act_times_W_dec(auxk_acts, W_dec, rescale_acts_by_decoder_norm)`` divides them by
``W_dec.norm(dim=-1)`` first, and the loss is ``aux_loss_coefficient * scale *
(recons - residual).pow(2).sum(dim=-1).mean()``, unnormalised. ``TopKTrainingSAEConfig``
defaults to ``rescale_acts_by_decoder_norm=True``, and then ``encode_with_hidden_pre``
multiplies ``hidden_pre`` by ``W_dec.norm(dim=-1)``.

Not run by ``make test-peers`` (which runs ``peer_tests/test_saelens.py`` only); run it with
``.peer-venvs/saelens/bin/python -m pytest peer_tests/test_saelens_auxk.py``.
"""

import pytest
import torch
from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig

from peer_support import F64, close, close_grads, differ, randn
from sae_losses import auxk_reconstruction, l2_reconstruction

D_IN, D_SAE, K = 8, 32, 4


def build(seed, rescale=True, dead_shift=0.0, dead=None):
    config = TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, dtype="float64", rescale_acts_by_decoder_norm=rescale
    )
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(config)
    with torch.no_grad():
        sae.W_enc.copy_(randn(D_IN, D_SAE, seed=seed + 10) * 0.5)
        sae.W_dec.copy_(randn(D_SAE, D_IN, seed=seed + 11) * 0.3)
        if dead is not None:  # push the dead latents' pre-activations up (or not)
            sae.b_enc.copy_(torch.where(dead, dead_shift, 0.0))
    return sae


def recipe(sae, hidden_pre, residual, dead):
    """docs/topk_terms.md, SAELens: the unnormalised L2 of the rescaled decode, times scale."""
    k_aux = D_IN // 2
    weight = sae.W_dec
    if sae.cfg.rescale_acts_by_decoder_norm:
        weight = weight / weight.norm(dim=1, keepdim=True)
    e_hat = auxk_reconstruction(hidden_pre, dead, weight, k_aux=k_aux)
    scale = (dead.sum() / k_aux).clamp(max=1)
    coefficient = sae.cfg.aux_loss_coefficient
    return coefficient * scale * l2_reconstruction(e_hat, residual.detach()) * D_IN


def both(sae, dead, seed):
    x = randn(64, D_IN, seed=seed) + 0.3 * randn(D_IN, seed=seed + 1)
    feature_acts, hidden_pre = sae.encode_with_hidden_pre(x)
    sae_out = sae.decode(feature_acts)
    theirs = sae.calculate_topk_aux_loss(x, sae_out, hidden_pre, dead)
    return recipe(sae, hidden_pre, x - sae_out, dead), theirs, hidden_pre


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("dead_every", [3, 16])  # 11 dead (scale 1), 2 dead (scale 1/2)
def test_equal_when_the_selected_pre_activations_are_non_negative(rescale, dead_every):
    dead = torch.arange(D_SAE) % dead_every == 0
    sae = build(dead_every, rescale, dead_shift=10.0, dead=dead)  # every dead pre > 0
    ours, theirs, hidden_pre = both(sae, dead, dead_every)
    assert (hidden_pre[:, dead] > 0).all()
    close(ours, theirs, F64)
    close_grads(ours, theirs, list(sae.parameters()), F64)


def test_negative_selected_pre_activations_differ():
    # SAELens decodes the selected negative pre-activations; the recipe's ReLU drops them.
    dead = torch.arange(D_SAE) % 3 == 0
    sae = build(4, dead_shift=-10.0, dead=dead)  # every dead pre < 0
    ours, theirs, hidden_pre = both(sae, dead, 4)
    assert (hidden_pre[:, dead] < 0).all()
    differ(ours, theirs)


def test_nothing_dead_is_zero_on_both_sides():
    sae = build(5)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    ours, theirs, _ = both(sae, dead, 5)
    assert theirs.item() == 0.0
    assert ours.item() == 0.0
