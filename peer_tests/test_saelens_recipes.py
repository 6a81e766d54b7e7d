"""The recipes of docs/recipes.md against SAELens, the real package: sae-lens 6.54.12.

Files cited are inside the installed package, ``site-packages/sae_lens/``:

- ``saes/gated_sae.py``, ``GatedTrainingSAE.calculate_aux_loss``: ``pi_gate = (sae_in - b_dec *
  apply_b_dec_to_input) @ W_enc + b_gate``, ``via_gate_reconstruction = relu(pi_gate) @ W_dec +
  b_dec`` (not detached; SAELens issue #539), ``auxiliary_reconstruction_loss =
  (via_gate_reconstruction - sae_in).pow(2).sum(dim=-1).mean()``.
- ``saes/jumprelu_sae.py``, ``calculate_pre_act_loss``: ``coefficient * ((threshold -
  hidden_pre).relu() * dead_neuron_mask * W_dec_norm).sum(dim=-1).mean()``, or 0 when no latent
  is dead; ``calculate_aux_loss`` in "quadratic" mode: ``l0_coefficient * mean(2 / target_l0 *
  (l0 - target_l0) ** 2)``; ``Step.backward`` with ``jumprelu_ste_to_input=True`` also sends
  ``ste`` to the pre-activations.

Run with ``.peer-venvs/saelens/bin/python -m pytest peer_tests/test_saelens_recipes.py``.
"""

import pytest
import torch
from sae_lens.saes import (
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput
from torch.func import vmap

from peer_support import F32, F64, close, close_grads, differ, grads, randn
from sae_losses import jumprelu_l0, l1_absolute, l2_reconstruction

D_IN, D_SAE = 8, 32
BANDWIDTH = 0.2


def build(sae_class, config_class, seed=0, **options):
    config = config_class(d_in=D_IN, d_sae=D_SAE, dtype="float64", **options)
    torch.manual_seed(seed)
    sae = sae_class(config)
    with torch.no_grad():
        sae.W_enc.copy_(randn(D_IN, D_SAE, seed=seed + 10) * 0.5)
        sae.W_dec.copy_(randn(D_SAE, D_IN, seed=seed + 11) * 0.3)
        sae.b_dec.copy_(0.1 * randn(D_IN, seed=seed + 12))
    return sae


def forward(sae, x, dead=None):
    coefficients = {name: getattr(c, "value", c) for name, c in sae.get_coefficients().items()}
    step = TrainStepInput(
        sae_in=x,
        coefficients=coefficients,
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )
    return sae.training_forward_pass(step), coefficients


def activations(rows=64, seed=0):
    return randn(rows, D_IN, seed=seed) + 0.3 * randn(D_IN, seed=seed + 1)


# --- the gated SAE auxiliary loss --------------------------------------------------------------


def gated_aux(sae, x, detach):
    pi_gate = (x - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_gate
    w_dec, b_dec = (sae.W_dec.detach(), sae.b_dec.detach()) if detach else (sae.W_dec, sae.b_dec)
    return l2_reconstruction(torch.relu(pi_gate) @ w_dec + b_dec, x) * D_IN


def test_gated_auxiliary_loss_without_detach_is_saelens_and_ours_detaches_the_decoder():
    sae = build(GatedTrainingSAE, GatedTrainingSAEConfig, seed=1)
    with torch.no_grad():
        sae.b_gate.copy_(0.2 * randn(D_SAE, seed=20))
    x = activations(seed=2)
    out, _ = forward(sae, x)
    peer = out.losses["auxiliary_reconstruction_loss"]
    saelens_recipe = gated_aux(sae, x, detach=False)
    close(saelens_recipe, peer, F64)
    close_grads(saelens_recipe, peer, sae.parameters(), F64)
    # Ours (the paper's frozen decoder, dictionary_learning's): the same value and the same
    # gradient to the gate path, none to W_dec, and b_dec only through the centred input.
    ours = gated_aux(sae, x, detach=True)
    close(ours, peer, F64)
    gate = [sae.W_enc, sae.b_gate]
    close_grads(ours, peer, gate, F64)
    (w_dec_grad,) = grads(ours, [sae.W_dec])
    assert torch.equal(w_dec_grad, torch.zeros_like(w_dec_grad))
    differ(grads(peer, [sae.W_dec])[0].abs().sum(), 0)


# --- the pre-activation loss ------------------------------------------------------------------


def jumprelu(seed=0, **options):
    sae = build(
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        seed,
        jumprelu_bandwidth=BANDWIDTH,
        **options,
    )
    with torch.no_grad():
        sae.threshold.copy_((0.15 * randn(D_SAE, seed=seed + 20)).abs().float())
        sae.W_enc.mul_(0.3)
    return sae


def test_pre_activation_loss_is_a_weighted_l1():
    coefficient = 0.5  # large enough that the value is far above rounding
    sae = jumprelu(seed=3, pre_act_loss_coefficient=coefficient)
    x = activations(seed=4)
    dead = torch.arange(D_SAE) % 3 == 0
    out, _ = forward(sae, x, dead)
    peer = out.losses["pre_act_loss"]
    threshold = sae.threshold.to(out.hidden_pre.dtype)
    weight = dead * sae.W_dec.norm(dim=1)
    ours = coefficient * l1_absolute(torch.relu(threshold - out.hidden_pre), weight=weight)
    close(ours, peer, F64)
    close_grads(ours, peer, [sae.W_enc, sae.b_enc, sae.W_dec], F64)
    close_grads(ours, peer, [sae.threshold], F32)  # float32 threshold: one rounding each
    assert grads(peer, [sae.threshold])[0].abs().sum() > 0


def test_pre_activation_loss_with_no_dead_latent_is_zero_without_a_host_sync():
    sae = jumprelu(seed=5, pre_act_loss_coefficient=0.5)
    x = activations(seed=6)
    nobody = torch.zeros(D_SAE, dtype=torch.bool)
    out, _ = forward(sae, x, nobody)
    threshold = sae.threshold.to(out.hidden_pre.dtype)
    ours = 0.5 * l1_absolute(
        torch.relu(threshold - out.hidden_pre), weight=nobody * sae.W_dec.norm(dim=1)
    )
    close(ours, out.losses["pre_act_loss"], F64)  # SAELens: hidden_pre.new_tensor(0.0)
    for g in grads(ours, [sae.W_enc, sae.threshold, sae.W_dec]):
        assert torch.equal(g, torch.zeros_like(g))


# --- quadratic target_l0, with and without jumprelu_ste_to_input -------------------------------


def per_row_counts(pre, threshold, ste_to_input):
    if not ste_to_input:
        return jumprelu_l0(pre.detach(), threshold, bandwidth=BANDWIDTH, reduce="none")
    zeros = torch.zeros(1, pre.shape[1], dtype=pre.dtype)

    def count(per_entry):  # H(0 - (theta - pi)) = H(pi - theta), its gradient to both
        return jumprelu_l0(zeros, per_entry, bandwidth=BANDWIDTH, reduce="sum")

    return vmap(count)(threshold - pre)


@pytest.mark.parametrize("ste_to_input", [False, True])
@pytest.mark.parametrize("mode", ["step", "quadratic"])
def test_l0_modes_and_ste_to_input(mode, ste_to_input):
    target = 6.0
    options = {"target_l0": target} if mode == "quadratic" else {}
    sae = jumprelu(
        seed=7, jumprelu_sparsity_loss_mode=mode, jumprelu_ste_to_input=ste_to_input, **options
    )
    x = activations(seed=8)
    out, coefficients = forward(sae, x)
    peer = out.losses["l0_loss"]
    threshold = sae.threshold.to(out.hidden_pre.dtype)
    l0 = per_row_counts(out.hidden_pre, threshold, ste_to_input)
    rows = 2 / target * (l0 - target) ** 2 if mode == "quadratic" else l0
    ours = coefficients["l0"] * rows.mean()
    close(ours, peer, F64)
    encoder = [sae.W_enc, sae.b_enc]
    close_grads(ours, peer, encoder, F64)
    close_grads(ours, peer, [sae.threshold], F32)
    encoder_grad = grads(peer, [sae.W_enc])[0].abs().sum()
    assert (encoder_grad > 0) == ste_to_input  # the STE reaches the encoder only with the option
    assert grads(peer, [sae.threshold])[0].abs().sum() > 0
