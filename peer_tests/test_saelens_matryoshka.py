"""SAELens's Matryoshka loss, the real package: sae-lens 6.54.12 (peers/saelens.txt).

``saes/matryoshka_batchtopk_sae.py``, ``MatryoshkaBatchTopKTrainingSAE``:
``_validate_matryoshka_config`` appends ``d_sae`` to ``matryoshka_widths`` when the last width is
smaller; ``training_forward_pass`` adds one ``inner_mse_loss_{width}`` per inner width,
``mse_loss_fn(inner_reconstruction, sae_in).sum(dim=-1).mean()``, to the base SAE's
``mse_loss`` (the full reconstruction); ``_iterable_decode`` multiplies the latents by
``1 / W_dec.norm(dim=-1)`` under ``rescale_acts_by_decoder_norm`` (True by default in the TopK
family, ``saes/topk_sae.py``). The recipe of docs/matryoshka.md:
``(matryoshka_l2(feature_acts, W_dec / W_dec.norm(dim=1, keepdim=True), sae_in, widths=...,
decoder_bias=b_dec) * d_in).sum()``, value and gradient to every parameter.

Run with ``.peer-venvs/saelens/bin/python -m pytest peer_tests/test_saelens_matryoshka.py``.
"""

import warnings

import pytest
import torch
from sae_lens.saes import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from peer_support import F64, close, close_grads, differ, randn
from sae_losses import matryoshka_l2

D_IN, D_SAE = 8, 32


def build(widths, seed=0, **overrides):
    """A float64 Matryoshka BatchTopK SAE, its encoder and decoder randomised."""
    config = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=6, matryoshka_widths=list(widths), dtype="float64", **overrides
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that d_sae is appended
        sae = MatryoshkaBatchTopKTrainingSAE(config)
    with torch.no_grad():
        sae.W_enc.copy_(randn(D_IN, D_SAE, seed=seed + 10) * 0.5)
        sae.W_dec.copy_(randn(D_SAE, D_IN, seed=seed + 11) * 0.3)
        sae.b_dec.copy_(0.1 * randn(D_IN, seed=seed + 12))
    return sae


def forward(sae, x):
    step = TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    return sae.training_forward_pass(step)


def reconstruction_losses(out):
    """The peer's mse_loss plus every inner_mse_loss_{width}: the Matryoshka reconstruction."""
    names = ["mse_loss", *(n for n in out.losses if n.startswith("inner_mse_loss_"))]
    return sum(out.losses[n] for n in names), names


def ours(sae, out, x, widths, rescale):
    w_dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True) if rescale else sae.W_dec
    if widths[-1] < D_SAE:  # what _validate_matryoshka_config does
        widths = [*widths, D_SAE]
    rows = matryoshka_l2(out.feature_acts, w_dec, x, widths=widths, decoder_bias=sae.b_dec)
    return (rows * D_IN).sum()


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("widths", [[4, 12, 32], [8, 16], [3]], ids=str)
def test_the_recipe_is_the_sum_of_its_reconstruction_losses(widths, rescale):
    sae = build(widths, seed=len(widths), rescale_acts_by_decoder_norm=rescale)
    x = randn(64, D_IN, seed=1) + 0.3 * randn(D_IN, seed=2)
    out = forward(sae, x)
    peer, names = reconstruction_losses(out)
    assert len(names) == len([*widths, D_SAE] if widths[-1] < D_SAE else widths)
    mine = ours(sae, out, x, widths, rescale)
    close(mine, peer, F64)
    close_grads(mine, peer, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], F64)
    assert (out.feature_acts == 0).any()
    assert (out.feature_acts[:, : widths[0]] != 0).any()


def test_the_default_rescale_is_not_optional():
    # With the default rescale_acts_by_decoder_norm=True, the raw decoder gives another number.
    sae = build([8, 32], seed=5)
    with torch.no_grad():
        sae.W_dec.mul_(1 + torch.arange(D_SAE, dtype=torch.float64)[:, None] / D_SAE)
    x = randn(64, D_IN, seed=3)
    out = forward(sae, x)
    peer, _ = reconstruction_losses(out)
    close(ours(sae, out, x, [8, 32], rescale=True), peer, F64)
    differ(ours(sae, out, x, [8, 32], rescale=False), peer)
