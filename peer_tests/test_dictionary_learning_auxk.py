"""dictionary_learning's AuxK and dead-latent counter against this library's, dead mask given.

The real package, dictionary-learning 0.1.0 (peers/dictionary_learning.txt).
``site-packages/dictionary_learning/trainers/top_k.py``, ``TopKTrainer``: ``top_k_aux =
activation_dim // 2``; ``get_auxiliary_loss(residual_BD, post_relu_acts_BF)`` scatters the top
``min(top_k_aux, n_dead)`` dead post-ReLU activations into a dense ``(batch, dict_size)`` buffer,
decodes it with ``self.ae.decoder`` (no bias), and divides ``sum_d mean_b`` of the squared error
by the same of the residual's deviations from its mean, in float32, then ``nan_to_num(0.0)``;
dead means ``num_tokens_since_fired >= dead_feature_threshold``. ``loss`` adds ``x.size(0)`` to
every counter and zeroes those of the top-k indices, before the AuxK term.

Not run by ``make test-peers`` (which runs ``peer_tests/test_dictionary_learning.py`` only);
run it with ``.peer-venvs/dictionary_learning/bin/python -m pytest
peer_tests/test_dictionary_learning_auxk.py``.
"""

import pytest
import torch
from dictionary_learning.trainers.top_k import TopKTrainer

from peer_support import F32, close, close_grads, randn
from sae_losses import TokensSinceFired, auxk_loss

D_IN, LATENTS, K = 8, 32, 4


def trainer(seed=0):
    return TopKTrainer(
        steps=2000,
        activation_dim=D_IN,
        dict_size=LATENTS,
        k=K,
        layer=0,
        lm_name="none",
        device="cpu",
        seed=seed,
    )


@pytest.mark.parametrize("dead_every", [3, 16])  # 11 dead (k_aux 4), 2 dead (fewer than k_aux)
def test_auxiliary_loss_value_and_gradients(dead_every):
    peer = trainer(dead_every)
    x = randn(64, D_IN, seed=dead_every, dtype=torch.float32)
    dead = torch.arange(LATENTS) % dead_every == 0
    peer.num_tokens_since_fired[dead] = peer.dead_feature_threshold
    _, _, _, post_relu = peer.ae.encode(x, return_topk=True)
    residual = (x - peer.ae.decode(peer.ae.encode(x))).detach()
    theirs = peer.get_auxiliary_loss(residual, post_relu)
    ours = auxk_loss(post_relu, dead, peer.ae.decoder.weight.T, residual, k_aux=D_IN // 2)
    close(ours, theirs, F32)
    close_grads(ours, theirs, list(peer.ae.parameters()), F32)


def test_nothing_dead_is_zero_on_both_sides():
    peer = trainer(1)
    x = randn(16, D_IN, seed=1, dtype=torch.float32)
    _, _, _, post_relu = peer.ae.encode(x, return_topk=True)
    residual = (x - peer.ae.decode(peer.ae.encode(x))).detach()
    dead = torch.zeros(LATENTS, dtype=torch.bool)
    assert peer.get_auxiliary_loss(residual, post_relu).item() == 0.0
    assert auxk_loss(post_relu, dead, peer.ae.decoder.weight.T, residual, k_aux=4).item() == 0.0


def test_tokens_since_fired_is_num_tokens_since_fired():
    # TopKTrainer.loss updates the counter from the top-k indices; ours from the latents that
    # are nonzero, the same latents here (the selected post-ReLU values are all positive).
    peer = trainer(2)
    peer.dead_feature_threshold = 40
    tracker = TokensSinceFired.empty(LATENTS)
    for step, rows in enumerate((16, 9, 30, 1, 12)):
        x = randn(rows, D_IN, seed=100 + step, dtype=torch.float32)
        latents = peer.ae.encode(x)
        assert (latents.topk(K).values > 0).all()
        peer.loss(x, step=step)
        tracker = tracker.update(latents)
        assert torch.equal(tracker.since_fired, peer.num_tokens_since_fired)
        # dictionary_learning's >= is dead(threshold=t - 1).
        peer_dead = peer.num_tokens_since_fired >= peer.dead_feature_threshold
        assert torch.equal(tracker.dead(threshold=peer.dead_feature_threshold - 1), peer_dead)
