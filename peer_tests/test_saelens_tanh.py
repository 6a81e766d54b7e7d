"""tanh_sparsity against SAELens 6.54.12's JumpReLU "tanh" sparsity mode, values and gradients.

sae_lens/saes/jumprelu_sae.py, JumpReLUTrainingSAE.calculate_aux_loss with
``jumprelu_sparsity_loss_mode="tanh"``: ``torch.tanh(jumprelu_tanh_scale * feature_acts *
W_dec_norm).sum(dim=-1)``, times the l0 coefficient, mean over rows. feature_acts >= 0, so
|z| = z; its derivative at the latents the threshold switched off (z = 0) is scale * w, and the
JumpReLU straight-through estimator carries that to the threshold.
"""

import torch
from test_saelens import activations, jumprelu_sae, step_input

from peer_support import F64, close, close_grads, differ, grads
from sae_losses import l1_absolute, tanh_sparsity


def tanh_sae(seed=0):
    return jumprelu_sae(seed=seed, jumprelu_sparsity_loss_mode="tanh", jumprelu_tanh_scale=4.0)


def test_tanh_mode_value_and_every_gradient():
    sae = tanh_sae()
    out = sae.training_forward_pass(step_input(sae, activations(seed=4)))
    coefficient = step_input(sae, activations(seed=4)).coefficients["l0"]
    weight = sae.W_dec.norm(dim=1)
    ours = coefficient * tanh_sparsity(out.feature_acts, scale=4.0, weight=weight)
    peer = out.losses["l0_loss"]
    close(ours, peer, F64)
    close_grads(ours, peer, [sae.W_enc, sae.b_enc, sae.W_dec, sae.threshold], F64)


def test_the_threshold_gradient_needs_the_right_derivative_at_zero():
    # With L1's derivative (0 at z = 0) in place of tanh's, the straight-through gradient of
    # the latents just below their threshold is lost: the threshold gradient differs.
    sae = tanh_sae(seed=1)
    out = sae.training_forward_pass(step_input(sae, activations(seed=5)))
    weight = sae.W_dec.norm(dim=1).detach()
    (peer_grad,) = grads(out.losses["l0_loss"], [sae.threshold])
    acts = out.feature_acts
    # tanh(4 w z) and its L1 linearisation 4 w z agree to first order away from 0; at z = 0
    # only the right derivative of tanh_sparsity reaches the threshold.
    (tanh_grad,) = grads(tanh_sparsity(acts, scale=4.0, weight=weight), [sae.threshold])
    close(tanh_grad, peer_grad / sae.cfg.l0_coefficient, F64)
    zero_at_zero = l1_absolute(torch.where(acts > 0, torch.tanh(4.0 * acts * weight), 0))
    (l1_grad,) = grads(zero_at_zero, [sae.threshold])
    differ((l1_grad - tanh_grad).abs().max(), 0)
