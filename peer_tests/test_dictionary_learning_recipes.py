"""The gated SAE recipe of docs/recipes.md against dictionary_learning, the real package:
dictionary-learning 0.1.0 (peers/dictionary_learning.txt).

``trainers/gdm.py``, ``GatedSAETrainer.loss``: ``f, f_gate = self.ae.encode(x,
return_gate=True)`` (``f_gate = relu(pi_gate)``), ``x_hat_gate = f_gate @
self.ae.decoder.weight.detach().T + self.ae.decoder_bias.detach()``, ``L_aux = (x -
x_hat_gate).pow(2).sum(dim=-1).mean()``; ``loss = L_recon + l1_penalty * L_sparse *
sparsity_scale + L_aux`` with ``L_sparse = t.linalg.norm(f_gate, ord=1, dim=-1).mean()``.

Run with ``.peer-venvs/dictionary_learning/bin/python -m pytest
peer_tests/test_dictionary_learning_recipes.py``.
"""

import torch
from dictionary_learning.trainers.gdm import GatedSAETrainer

from peer_support import F64, close, close_grads, differ, randn
from sae_losses import l1_absolute, l2_reconstruction

D_IN, D_SAE = 8, 32


def test_gated_auxiliary_loss_detaches_the_decoder_as_ours_does():
    peer = GatedSAETrainer(
        steps=100,
        activation_dim=D_IN,
        dict_size=D_SAE,
        layer=0,
        lm_name="-",
        l1_penalty=0.3,
        sparsity_warmup_steps=None,
        warmup_steps=0,
        device="cpu",
        seed=0,
    )
    ae = peer.ae.double()
    with torch.no_grad():
        ae.gate_bias.copy_(0.2 * randn(D_SAE, seed=1))
        ae.mag_bias.copy_(0.1 * randn(D_SAE, seed=2))
        ae.decoder_bias.copy_(0.1 * randn(D_IN, seed=3))
    x = randn(64, D_IN, seed=4) + 0.3 * randn(D_IN, seed=5)
    log = peer.loss(x, step=10, logging=True)
    loss = peer.loss(x, step=10)
    f, f_gate = ae.encode(x, return_gate=True)
    w_dec, b_dec = ae.decoder.weight.T, ae.decoder_bias  # (d_sae, d_model), (d_model,)
    aux = l2_reconstruction(f_gate @ w_dec.detach() + b_dec.detach(), x) * D_IN
    close(aux, log.losses["aux_loss"], F64)
    # The whole loss, so the gradients check the detach: every parameter, the decoder included.
    recon = l2_reconstruction(ae.decode(f), x) * D_IN
    ours = recon + 0.3 * peer.sparsity_warmup_fn(10) * l1_absolute(f_gate) + aux
    close(ours, loss, F64)
    close_grads(ours, loss, ae.parameters(), F64)
    # Without the detach (SAELens's form) the decoder's gradient differs.
    attached = (
        recon + 0.3 * l1_absolute(f_gate) + l2_reconstruction(f_gate @ w_dec + b_dec, x) * D_IN
    )
    (peer_grad,) = torch.autograd.grad(loss, [ae.decoder.weight], retain_graph=True)
    (attached_grad,) = torch.autograd.grad(attached, [ae.decoder.weight])
    differ((peer_grad - attached_grad).abs().max(), 0)
