"""saprmarks/dictionary_learning, the real package: dictionary-learning 0.1.0
(peers/dictionary_learning.txt).

Files cited are inside the installed package, ``site-packages/dictionary_learning/``:

- ``trainers/standard.py``: ``StandardTrainer.loss`` (``recon_loss = (x - x_hat).pow(2)
  .sum(dim=-1).mean()``, ``l1_loss = f.norm(p=1, dim=-1).mean()``, logged ``l2_loss =
  t.linalg.norm(x - x_hat, dim=-1).mean()``) and ``StandardTrainerAprilUpdate.loss`` (``l1_loss
  = (f * self.ae.decoder.weight.norm(p=2, dim=0)).sum(dim=-1).mean()``).
- ``trainers/p_anneal.py``: ``PAnnealTrainer.lp_norm``: ``norm_sq = f.pow(p).sum(dim=-1)``, then
  ``norm_sq.mean()`` ("Lp^p") or ``norm_sq.pow(1/p).mean()`` ("Lp").
- ``trainers/jumprelu.py``: ``StepFunction`` (``(x > threshold).float()``, a zero gradient to x,
  ``-(1/bandwidth) * RectangleFunction.apply((x - threshold) / bandwidth) * grad_output`` to
  the threshold) and ``JumpReluTrainer.loss``: ``l0 = StepFunction.apply(f, threshold,
  bandwidth).sum(dim=-1).mean()`` on ``f = JumpReLUFunction.apply(pre_jump, ...)``, after the
  jump; ``sparsity_loss = coefficient * ((l0 / target_l0) - 1).pow(2) * sparsity_scale``.
- ``trainers/gdm.py``, ``trainers/gated_anneal.py``, ``trainers/top_k.py``,
  ``trainers/batch_top_k.py``: the same
  ``(x - x_hat).pow(2).sum(dim=-1).mean()`` reconstruction term (logged as ``mse_loss`` or, in
  the TopK trainers, as ``l2_loss``).
- ``evaluation.py``: ``evaluate``: per batch ``l2_loss``, ``l1_loss``, ``l0 = (f != 0).float()
  .sum(dim=-1).mean()`` and ``frac_variance_explained = 1 - t.var(x - x_hat, dim=0).sum() /
  t.var(x, dim=0).sum()``, each added up and divided by ``n_batches``.

Run with ``make test-peers`` (this file needs the .peer-venvs/dictionary_learning venv).
"""

from importlib.metadata import version

import pytest
import torch
from dictionary_learning.evaluation import evaluate
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
from dictionary_learning.trainers.gated_anneal import GatedAnnealTrainer
from dictionary_learning.trainers.gdm import GatedSAETrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer, StepFunction
from dictionary_learning.trainers.p_anneal import PAnnealTrainer
from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate
from dictionary_learning.trainers.top_k import TopKTrainer

from peer_support import F64, close, close_grads, differ, grads, randn
from sae_losses import (
    fraction_of_variance_unexplained,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
)

D_IN, D_SAE = 8, 32
COMMON = {"steps": 100, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 0, "lm_name": "-"}
# float32 rounding of a count's mean: exact integers, then one or two float32 roundings.
F32_COUNT = {"rtol": 1e-6, "atol": 0}


def test_the_installed_version_is_the_pinned_one():
    # docs/peer_conventions.md states every row for this version (peers/*.txt pins it).
    assert version("dictionary-learning") == "0.1.0"


def trainer(cls, seed=0, **options):
    """A real trainer on CPU, its dictionary in float64 with a randomised encoder bias."""
    made = cls(**COMMON, device="cpu", seed=seed, **{"warmup_steps": 0, **options})
    made.ae.double()
    with torch.no_grad():
        for name, parameter in made.ae.named_parameters():
            if name.endswith("bias") or name.startswith("b_"):
                parameter.copy_(0.1 * randn(*parameter.shape, seed=seed + 50))
    return made


def activations(rows=64, seed=0):
    return randn(rows, D_IN, seed=seed) + 0.3 * randn(D_IN, seed=seed + 1)


# === training terms ==========================================================================


TRAINERS = {
    "StandardTrainer": (StandardTrainer, {"sparsity_warmup_steps": None}, "mse_loss"),
    "StandardTrainerAprilUpdate": (
        StandardTrainerAprilUpdate,
        {"sparsity_warmup_steps": None},
        "mse_loss",
    ),
    "GatedSAETrainer": (GatedSAETrainer, {"sparsity_warmup_steps": None}, "mse_loss"),
    "GatedAnnealTrainer": (
        GatedAnnealTrainer,
        {"sparsity_warmup_steps": None, "anneal_start": 50},
        "mse_loss",
    ),
    "TopKTrainer": (TopKTrainer, {"k": 4}, "l2_loss"),
    "BatchTopKTrainer": (BatchTopKTrainer, {"k": 4}, "l2_loss"),
    "JumpReluTrainer": (JumpReluTrainer, {"sparsity_warmup_steps": None}, "l2_loss"),
}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_reconstruction_term_is_l2_times_features(name):
    # Every trainer's loss(): (x - x_hat).pow(2).sum(dim=-1).mean(), logged under the key
    # given in TRAINERS (TopK and JumpReLU trainers call the SQUARED error "l2_loss").
    cls, options, key = TRAINERS[name]
    peer = trainer(cls, **options)
    x = activations(seed=1)
    log = peer.loss(x, step=10, logging=True)
    x_hat = log[1]  # the LossLog namedtuple: (x, x_hat or recon, f, losses)
    close(l2_reconstruction(x_hat, x) * D_IN, log.losses[key], F64)


def test_standard_trainer_loss_and_gradients():
    # trainers/standard.py StandardTrainer.loss: recon_loss + l1_penalty * f.norm(p=1).mean();
    # the logged l2_loss is the UNSQUARED row norm. Gradients to every parameter of the real
    # AutoEncoder.
    peer = trainer(StandardTrainer, l1_penalty=0.3, sparsity_warmup_steps=None)
    x = activations(seed=2)
    log = peer.loss(x, step=10, logging=True)
    loss = peer.loss(x, step=10)
    x_hat, f = peer.ae(x, output_features=True)
    squared = l2_reconstruction(x_hat, x, reduce="none") * D_IN
    close(squared.sqrt().mean(), log.losses["l2_loss"], F64)
    differ(log.losses["l2_loss"] ** 2, squared.mean())
    close(l1_absolute(f), log.losses["sparsity_loss"], F64)
    ours = squared.mean() + 0.3 * l1_absolute(f)
    close(ours, loss, F64)
    close_grads(ours, loss, peer.ae.parameters(), F64)


def test_april_update_decoder_weighted_l1_and_gradients():
    # trainers/standard.py StandardTrainerAprilUpdate.loss: l1_loss = (f * decoder.weight
    # .norm(p=2, dim=0)).sum(dim=-1).mean(), decoder.weight (d_in, d_sae), no abs (f >= 0 after
    # the ReLU, so l1_absolute gives the same number). Gradients reach decoder.weight twice.
    peer = trainer(StandardTrainerAprilUpdate, l1_penalty=0.3, sparsity_warmup_steps=None)
    x = activations(seed=3)
    log = peer.loss(x, step=10, logging=True)
    loss = peer.loss(x, step=10)
    x_hat, f = peer.ae(x, output_features=True)
    weighted = l1_absolute(f, weight=peer.ae.decoder.weight.norm(dim=0))
    close(weighted, log.losses["sparsity_loss"], F64)
    ours = l2_reconstruction(x_hat, x) * D_IN + 0.3 * weighted
    close(ours, loss, F64)
    close_grads(ours, loss, peer.ae.parameters(), F64)
    # On signed activations (not a ReLU output) their sum lets signs cancel; ours takes |z|.
    signed = randn(16, D_SAE, seed=4)
    their_formula = peer.ae.decoder.weight.norm(p=2, dim=0)
    differ(
        (signed * their_formula).sum(dim=-1).mean(),
        l1_absolute(signed, weight=their_formula),
    )


# --- p-annealing: the trainer's own lp_norm ---------------------------------------------------


def p_anneal(sparsity_function):
    return trainer(
        PAnnealTrainer,
        sparsity_function=sparsity_function,
        anneal_start=50,
        sparsity_warmup_steps=None,
    )


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("sparsity_function", ["Lp^p", "Lp"])
def test_p_anneal_lp_norm_is_lp_sparsity_for_positive_z(sparsity_function, p):
    # trainers/p_anneal.py PAnnealTrainer.lp_norm(f, p): f.pow(p).sum(-1), then .mean() or
    # .pow(1/p).mean(). For f > 0 it is lp_sparsity, value and gradient.
    peer = p_anneal(sparsity_function)
    z = (randn(33, D_SAE, seed=5).abs() + 0.1).requires_grad_()
    theirs = peer.lp_norm(z, p)
    ours = lp_sparsity(z, p=p, root=sparsity_function == "Lp")
    close(ours, theirs, F64)
    close_grads(ours, theirs, [z], F64)


def test_p_anneal_loss_and_gradients():
    # trainers/p_anneal.py PAnnealTrainer.loss: recon_loss + lp_norm(f, p) * sparsity_coeff,
    # on the real AutoEncoder, at the trainer's current p (p_start = 1 before annealing).
    peer = p_anneal("Lp^p")
    x = activations(seed=6)
    loss = peer.loss(x, step=10)
    x_hat, f = peer.ae(x, output_features=True)
    ours = l2_reconstruction(x_hat, x) * D_IN + peer.sparsity_coeff * lp_sparsity(f, p=peer.p)
    close(ours, loss, F64)
    close_grads(ours, loss, peer.ae.parameters(), F64)


def test_p_anneal_lp_norm_differs_without_abs_and_at_zero():
    # trainers/p_anneal.py lp_norm has no abs, and f.pow(p) has torch's pow gradient at 0.
    peer = p_anneal("Lp^p")
    signed = randn(16, D_SAE, seed=7)
    assert torch.isnan(peer.lp_norm(signed, 0.5))  # fractional p on negative z
    assert torch.isfinite(lp_sparsity(signed, p=0.5))
    differ(peer.lp_norm(signed, 1.0), lp_sparsity(signed, p=1.0))  # a signed sum
    close(lp_sparsity(signed, p=1.0), peer.lp_norm(signed.abs(), 1.0), F64)
    # Exact zeros, as after a ReLU.
    z = randn(16, D_SAE, seed=8)
    z = torch.where(z > 0.3, z, 0.0).requires_grad_()
    zero = z.detach() == 0
    assert zero.any()
    # p < 1: pow's gradient p * 0**(p - 1) is inf; ours is 0.
    (theirs,) = grads(peer.lp_norm(z, 0.5), [z])
    (ours,) = grads(lp_sparsity(z, p=0.5), [z])
    assert torch.isinf(theirs[zero]).all()
    assert (ours[zero] == 0).all()
    close(ours[~zero], theirs[~zero], F64)
    # p = 1: pow's gradient 1 * 0**0 = 1, so every zero entry gets 1 per row (1/B after the
    # mean over rows); ours, the subgradient 0. Through a ReLU both become 0 (ReLU's gradient
    # at a zero output is 0), so training a ReLU SAE is unaffected.
    (theirs,) = grads(peer.lp_norm(z, 1.0), [z])
    (ours,) = grads(lp_sparsity(z, p=1.0), [z])
    close(theirs[zero], torch.full_like(theirs[zero], 1 / 16), F64)
    assert (ours[zero] == 0).all()
    close(ours[~zero], theirs[~zero], F64)


# --- JumpReLU -------------------------------------------------------------------------------


def test_step_function_on_pre_activations_is_jumprelu_l0_to_float32():
    # trainers/jumprelu.py StepFunction: forward (x > threshold).float() and a float32
    # rectangle, so on float64 input the count is float32 and its mean over rows is rounded to
    # float32, as is the threshold gradient before it is cast back.
    pre = randn(33, D_SAE, seed=9)
    threshold = (0.3 * randn(D_SAE, seed=10)).requires_grad_()
    theirs = StepFunction.apply(pre, threshold, 0.2).sum(dim=-1).mean()
    ours = jumprelu_l0(pre, threshold, bandwidth=0.2)
    assert theirs.dtype == torch.float32
    close(ours, theirs, F32_COUNT)
    close_grads(ours, theirs, [threshold], {"rtol": 1e-6, "atol": 1e-6})


def test_jumprelu_trainer_sparsity_term():
    # trainers/jumprelu.py JumpReluTrainer.loss: Step applied to f = JumpReLU(pre), AFTER the
    # jump (issue saprmarks/dictionary_learning#55). For positive thresholds the count equals
    # H(pre - threshold), but the window looks at f, which is 0 for every inactive entry: it
    # misses pre in (t - eps/2, t] and, when t < eps/2, counts every inactive entry. The call
    # that reproduces their gradient is jumprelu_l0 on f (post-jump) instead of pre.
    target, bandwidth = 6.0, 0.2
    peer = trainer(
        JumpReluTrainer, bandwidth=bandwidth, target_l0=target, sparsity_warmup_steps=None
    )
    ae = peer.ae
    with torch.no_grad():
        ae.W_enc.copy_(randn(D_IN, D_SAE, seed=11) * 0.3)
        threshold = 0.05 + 0.3 * randn(D_SAE, seed=12).abs()
        threshold[:8] = 0.05  # below eps / 2
        ae.threshold.copy_(threshold)
    x = activations(seed=13)
    loss = peer.loss(x, step=10)
    (with_sparsity,) = grads(loss, [ae.threshold])
    peer.sparsity_coefficient = 0.0
    (recon_only,) = grads(peer.loss(x, step=10), [ae.threshold])
    peer_grad = with_sparsity - recon_only  # the sparsity term's threshold gradient
    recon = peer.loss(x, step=10, logging=True).losses["l2_loss"]
    pre = (x @ ae.W_enc + ae.b_enc).detach()  # the trainer's own pre_jump
    f = pre * (pre > ae.threshold.detach())

    def quadratic(l0):
        return ((l0 / target) - 1).pow(2)

    on_f = quadratic(jumprelu_l0(f, ae.threshold, bandwidth=bandwidth))
    on_pre = quadratic(jumprelu_l0(pre, ae.threshold, bandwidth=bandwidth))
    close(on_pre, loss.detach() - recon, F32_COUNT)  # theirs sums a float32 count
    close(on_f, on_pre, F64)
    (ours_f,) = grads(on_f, [ae.threshold])
    (ours_pre,) = grads(on_pre, [ae.threshold])
    close(ours_f, peer_grad, {"rtol": 1e-6, "atol": 1e-6})
    differ((ours_pre - peer_grad).abs().max(), 0)


# === evaluation ==============================================================================


class Centred(torch.nn.Module):
    """The real AutoEncoder, its reconstruction shifted so each batch's mean residual is 0."""

    def __init__(self, ae):
        super().__init__()
        self.ae, self.dict_size, self.activation_dim = ae, ae.dict_size, ae.activation_dim

    def forward(self, x, output_features=False):
        x_hat, f = self.ae(x, output_features=True)
        return x_hat - (x_hat - x).mean(0), f


def test_evaluate_metrics():
    # evaluation.py evaluate(dictionary, activations, n_batches): per batch, then divided by
    # n_batches. Equal batches of 32 rows, so a mean per batch then over batches is the mean
    # over rows for the row metrics.
    ae = trainer(StandardTrainer, sparsity_warmup_steps=None).ae
    x = activations(96, 14) * torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64).repeat_interleave(
        32
    ).unsqueeze(-1)
    batches = list(x.split(32))
    out = evaluate(ae, iter(batches), n_batches=3, device="cpu")
    with torch.no_grad():
        x_hat, f = ae(x, output_features=True)
    rows = l2_reconstruction(x_hat, x, reduce="none") * D_IN
    close(rows.sqrt().mean(), out["l2_loss"], F64)  # the unsquared row norm
    close(l1_absolute(f), out["l1_loss"], F64)
    close(l0_norm(f), out["l0"], F32_COUNT)  # (f != 0).float(): float32 on their side
    # frac_variance_explained centres the residual: with the real reconstruction (a nonzero
    # mean residual) it exceeds every batch's 1 - FVU; with the residual centred in each batch
    # it is the mean over batches of 1 - FVU, not the explained variance of all rows.
    per_batch = [
        1 - fraction_of_variance_unexplained(d, s)
        for d, s in zip(x_hat.split(32), batches, strict=True)
    ]
    assert out["frac_variance_explained"] > max(per_batch) + 1e-3
    centred = evaluate(Centred(ae), iter(batches), n_batches=3, device="cpu")
    with torch.no_grad():
        shifted = [Centred(ae)(s)[0] for s in batches]
    per_batch = [
        1 - fraction_of_variance_unexplained(d, s) for d, s in zip(shifted, batches, strict=True)
    ]
    close(torch.stack(per_batch).mean(), centred["frac_variance_explained"], F64)
    everything = 1 - fraction_of_variance_unexplained(torch.cat(shifted), x)
    differ(centred["frac_variance_explained"], everything)
