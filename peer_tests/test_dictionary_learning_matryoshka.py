"""dictionary_learning's Matryoshka loss, the real package: dictionary-learning 0.1.0
(peers/dictionary_learning.txt).

``trainers/matryoshka_batch_top_k.py``, ``MatryoshkaBatchTopKTrainer``: ``group_sizes =
[int(f * dict_size) for f in group_fractions[:-1]]`` plus the remainder; default
``group_weights = [1 / G] * G``; ``loss``: one running ``x_reconstruct`` over ``t.split`` chunks,
``l2_loss = (x - x_reconstruct).pow(2).sum(dim=-1).mean() * group_weights[i]`` per group, and
``loss = l2_losses.mean() + auxk_alpha * auxk_loss`` (the AuxK term is 0 while no latent is
dead, as in a fresh trainer). The recipe of docs/matryoshka.md: widths are the running sums of
the group sizes, ``(matryoshka_l2(f, W_dec, x, widths=..., decoder_bias=b_dec) * d_in *
group_weights).mean()``, value and gradient to every parameter.

Run with ``.peer-venvs/dictionary_learning/bin/python -m pytest
peer_tests/test_dictionary_learning_matryoshka.py``.
"""

import itertools

import pytest
import torch
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

from peer_support import F64, close, close_grads, randn
from sae_losses import matryoshka_l2

D_IN, D_SAE = 8, 30


def trainer(fractions, weights=None, seed=0):
    made = MatryoshkaBatchTopKTrainer(
        steps=100,
        activation_dim=D_IN,
        dict_size=D_SAE,
        k=6,
        layer=0,
        lm_name="-",
        group_fractions=fractions,
        group_weights=weights,
        device="cpu",
        seed=seed,
        warmup_steps=0,
    )
    made.ae.double()
    with torch.no_grad():
        made.ae.b_enc.copy_(0.1 * randn(D_SAE, seed=seed + 50))
        made.ae.b_dec.copy_(0.1 * randn(D_IN, seed=seed + 51))
    return made


def widths_of(fractions):
    """The recipe: int(f * dict_size) for every group but the last, which takes the rest."""
    sizes = [int(f * D_SAE) for f in fractions[:-1]]
    sizes.append(D_SAE - sum(sizes))
    return list(itertools.accumulate(sizes))


@pytest.mark.parametrize(
    ("fractions", "weights"),
    [
        ([0.25, 0.25, 0.5], None),  # the default weights 1/G: a total of sum_i L_i / G^2
        ([0.1, 0.2, 0.3, 0.4], None),  # int() truncates: sizes 3, 6, 9 and the remaining 12
        ([0.5, 0.5], [2.0, 0.5]),
        ([1.0], None),
    ],
    ids=str,
)
def test_the_recipe_is_the_trainers_loss(fractions, weights):
    peer = trainer(fractions, weights, seed=len(fractions))
    widths = widths_of(fractions)
    assert widths == list(itertools.accumulate(peer.group_sizes))
    x = randn(64, D_IN, seed=1) + 0.3 * randn(D_IN, seed=2)
    loss = peer.loss(x, step=0)
    f, _, _ = peer.ae.encode(x, return_active=True, use_threshold=False)
    group_weights = torch.tensor(peer.group_weights, dtype=torch.float64)
    rows = matryoshka_l2(f, peer.ae.W_dec, x, widths=widths, decoder_bias=peer.ae.b_dec)
    ours = (rows * D_IN * group_weights).mean()
    close(ours, loss, F64)
    close_grads(ours, loss, peer.ae.parameters(), F64)
    if weights is None:  # spelled out: the weighted mean of the default weights is sum / G^2
        close(ours, (rows * D_IN).sum() / len(widths) ** 2, F64)
