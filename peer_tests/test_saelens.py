"""SAELens, the real package: sae-lens 6.54.12 (peers/saelens.txt).

Files cited are inside the installed package, ``site-packages/sae_lens/``:

- ``saes/sae.py``: ``TrainingSAE.training_forward_pass``: ``per_item_mse_loss =
  self.mse_loss_fn(sae_out, sae_in)`` (``F.mse_loss(..., reduction="none")``), ``mse_loss =
  per_item_mse_loss.sum(dim=-1).mean()``.
- ``saes/standard_sae.py``: ``StandardTrainingSAE.calculate_aux_loss``:
  ``(feature_acts * self.W_dec.norm(dim=1)).norm(p=self.cfg.lp_norm, dim=-1)``, then ``.mean()``.
- ``saes/jumprelu_sae.py``: ``Step`` (rectangle-kernel STE, threshold gradient ``torch.sum(-ste,
  dim=0)``, ``x_grad = ste if ctx.ste_to_input else None``); ``JumpReLUTrainingSAE
  .training_forward_pass`` clamps ``self.threshold.data`` to ``>= 0`` in place, under
  ``no_grad``, and there is no ``relu`` on the threshold in the graph; ``calculate_aux_loss``:
  ``l0 = torch.sum(Step.apply(hidden_pre, threshold, bandwidth, ste_to_input), dim=-1)``, with
  ``per_item_l0_loss = 2 / target_l0 * (l0 - target_l0) ** 2`` in "quadratic" mode.
- ``evals.py``: ``ExplainedVarianceCalculator`` and ``get_sparsity_and_variance_metrics``.
- ``training/sae_trainer.py``: ``SAETrainer.build_train_step_log_dict``.

Run with ``make test-peers`` (this file needs the .peer-venvs/saelens venv).
"""

from importlib.metadata import version

import pytest
import torch
from sae_lens.evals import ExplainedVarianceCalculator, get_sparsity_and_variance_metrics
from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.jumprelu_sae import Step
from sae_lens.saes.sae import SAEMetadata, TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler

from peer_support import F32, F64, close, close_grads, differ, grads, randn
from sae_losses import (
    StreamingFVU,
    StreamingMean,
    fraction_of_variance_unexplained,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
)

D_IN, D_SAE = 8, 32

ARCHITECTURES = {
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig, {}),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": 4}),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": 4}),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {"jumprelu_bandwidth": 0.2}),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, {}),
    "matryoshka": (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        {"k": 4, "matryoshka_widths": [8, 32]},
    ),
}


def test_the_installed_version_is_the_pinned_one():
    # docs/peer_conventions.md states every row for this version (peers/*.txt pins it).
    assert version("sae-lens") == "6.54.12"


def build(architecture, seed=0, **overrides):
    """A float64 training SAE on CPU, its encoder randomised so activations are varied."""
    sae_class, config_class, options = ARCHITECTURES[architecture]
    config = config_class(d_in=D_IN, d_sae=D_SAE, dtype="float64", **{**options, **overrides})
    torch.manual_seed(seed)
    sae = sae_class(config)
    with torch.no_grad():
        sae.W_enc.copy_(randn(D_IN, D_SAE, seed=seed + 10) * 0.5)
        sae.W_dec.copy_(randn(D_SAE, D_IN, seed=seed + 11) * 0.3)
    return sae


def step_input(sae, sae_in):
    coefficients = {name: getattr(c, "value", c) for name, c in sae.get_coefficients().items()}
    return TrainStepInput(
        sae_in=sae_in,
        coefficients=coefficients,
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def activations(rows=64, seed=0):
    return randn(rows, D_IN, seed=seed) + 0.3 * randn(D_IN, seed=seed + 1)


# === training terms ==========================================================================


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_mse_loss_is_l2_times_features(architecture):
    # saes/sae.py training_forward_pass: F.mse_loss(sae_out, sae_in, reduction="none")
    # .sum(dim=-1).mean(), the same in every TrainingSAE subclass. Value and the gradient to
    # every parameter, through the real forward pass.
    sae = build(architecture)
    x = activations()
    out = sae.training_forward_pass(step_input(sae, x))
    ours = l2_reconstruction(out.sae_out, x) * D_IN
    close(ours, out.losses["mse_loss"], F64)
    close_grads(ours, out.losses["mse_loss"], sae.parameters(), F64)


@pytest.mark.parametrize("lp_norm", [1.0, 0.5, 2.0, 3.0])
def test_standard_sparsity_loss_is_decoder_weighted_lp(lp_norm):
    # saes/standard_sae.py calculate_aux_loss: (feature_acts * W_dec.norm(dim=1))
    # .norm(p=lp_norm, dim=-1), mean over rows: the rooted norm, the weight inside the power.
    # Gradients to W_enc, b_enc (through feature_acts) and W_dec (through the weight).
    sae = build("standard", lp_norm=lp_norm)
    x = activations(seed=1)
    out = sae.training_forward_pass(step_input(sae, x))
    weight = sae.W_dec.norm(dim=1)
    if lp_norm == 1.0:
        ours = l1_absolute(out.feature_acts, weight=weight)
    else:
        ours = lp_sparsity(out.feature_acts, p=lp_norm, weight=weight, root=True)
    close(ours, out.losses["l1_loss"], F64)
    assert (out.feature_acts == 0).any()  # ReLU zeros: the gradient at 0 is exercised
    close_grads(ours, out.losses["l1_loss"], sae.parameters(), F64)


# --- JumpReLU -------------------------------------------------------------------------------

BANDWIDTH = 0.2


def jumprelu_sae(seed=0, **overrides):
    """Thresholds around 0, half of them negative, and pre-activations near them."""
    sae = build("jumprelu", seed=seed, **overrides)
    with torch.no_grad():
        sae.threshold.copy_((0.15 * randn(D_SAE, seed=seed + 20)).float())
        sae.W_enc.mul_(0.3)
    return sae


def test_jumprelu_clamps_the_threshold_in_place_and_has_no_relu():
    # saes/jumprelu_sae.py training_forward_pass: `self.threshold.data.clamp_(min=0.0)` under
    # no_grad, then Step on hidden_pre and the clamped parameter itself. A latent clamped to 0
    # still gets the full STE gradient, -(1/eps) x (the share of rows in its window).
    sae = jumprelu_sae()
    negative = sae.threshold.detach() < 0
    assert negative.sum() >= 8
    x = activations(seed=2)
    out = sae.training_forward_pass(step_input(sae, x))
    assert (sae.threshold.detach()[negative] == 0).all()  # clamped in place
    assert (sae.threshold.detach() >= 0).all()
    (peer_grad,) = grads(out.losses["l0_loss"], [sae.threshold])
    pre = out.hidden_pre.detach()
    threshold = sae.threshold.detach().clone().requires_grad_()
    ours = jumprelu_l0(pre, threshold.to(pre.dtype), bandwidth=BANDWIDTH)
    close(ours, out.losses["l0_loss"], F64)
    (ours_grad,) = grads(ours, [threshold])
    # Both sum the window in float64 and round the gradient to the float32 parameter.
    close(ours_grad, peer_grad, F32)
    assert (peer_grad[negative] != 0).sum() >= 4
    # The recipe `jumprelu_l0(pre, threshold.relu(), ...)` would give those latents 0 instead.
    old = jumprelu_l0(pre, threshold.to(pre.dtype).relu(), bandwidth=BANDWIDTH)
    (old_grad,) = grads(old, [threshold])
    assert (old_grad[negative] == 0).all()
    differ((old_grad - peer_grad).abs().max(), 0)


def test_jumprelu_ste_to_input_sends_the_window_to_the_pre_activations():
    # saes/jumprelu_sae.py Step.backward with ste_to_input=True: x_grad = ste = (1/eps)
    # rectangle((x - threshold) / eps) g, and threshold_grad = sum(-ste, dim=0). There is no
    # option for it here, but H(pre - t) = H(0 - (t - pre)): one "row" of B x F features with
    # per-entry thresholds t - pre, at pre-activation 0, gives the count, and its gradient
    # reaches both pre (+) and t (-). Divided by B: the mean over rows.
    sae = jumprelu_sae(seed=1, jumprelu_ste_to_input=True)
    x = activations(seed=3)
    out = sae.training_forward_pass(step_input(sae, x))
    pre = out.hidden_pre
    per_entry = (sae.threshold.to(pre.dtype) - pre).reshape(1, -1)[0]
    zeros = torch.zeros(1, per_entry.numel(), dtype=pre.dtype)
    ours = jumprelu_l0(zeros, per_entry, bandwidth=BANDWIDTH) / pre.shape[0]
    close(ours, out.losses["l0_loss"], F64)
    # The STE now reaches W_enc and b_enc as well as the threshold.
    leaves = [sae.W_enc, sae.b_enc, sae.b_dec]
    close_grads(ours, out.losses["l0_loss"], leaves, F64)
    (peer_threshold_grad,) = grads(out.losses["l0_loss"], [sae.threshold])
    (ours_threshold_grad,) = grads(ours, [sae.threshold])
    close(ours_threshold_grad, peer_threshold_grad, F32)
    assert grads(out.losses["l0_loss"], [sae.W_enc])[0].abs().sum() > 0


def test_jumprelu_quadratic_target_l0():
    # saes/jumprelu_sae.py calculate_aux_loss, "quadratic" (Gemma Scope 2): per_item_l0_loss =
    # 2 / target_l0 * (l0 - target_l0) ** 2 with l0 the per-row Step count, then the mean.
    target = 6.0
    sae = jumprelu_sae(seed=2, jumprelu_sparsity_loss_mode="quadratic", target_l0=target)
    x = activations(seed=4)
    out = sae.training_forward_pass(step_input(sae, x))
    pre = out.hidden_pre.detach()
    threshold = sae.threshold
    rows = jumprelu_l0(pre, threshold.to(pre.dtype), bandwidth=BANDWIDTH, reduce="none")
    ours = (2 / target * (rows - target) ** 2).mean()
    close(ours, out.losses["l0_loss"], F64)
    (peer_grad,) = grads(out.losses["l0_loss"], [threshold])
    (ours_grad,) = grads(ours, [threshold])
    assert peer_grad.abs().sum() > 0
    close(ours_grad, peer_grad, F32)


def test_step_three_dimensional_and_one_dimensional_input():
    # saes/jumprelu_sae.py Step.backward sums the threshold gradient over dim=0 only. With
    # (batch, component, feature) input autograd sums the leftover axis, so it still matches;
    # 1-D input makes Step.backward return a 0-d gradient, which autograd rejects.
    pre = randn(20, 3, 8, seed=5)
    threshold = (0.5 * randn(8, seed=6)).abs().requires_grad_()
    peer = torch.sum(Step.apply(pre, threshold, 0.5, False), dim=-1).mean()
    ours = jumprelu_l0(pre, threshold, bandwidth=0.5).mean()
    close(ours, peer, F64)
    close_grads(ours, peer, [threshold], F64)
    flat = torch.sum(Step.apply(pre[0, 0], threshold, 0.5, False), dim=-1)
    with pytest.raises(RuntimeError, match="invalid gradient"):
        flat.backward()


# === evaluation ==============================================================================


def stream(decoded, source, split, mask=None):
    fvu = StreamingFVU.empty(source.shape[1:])
    masks = [None] * len(source.split(split)) if mask is None else mask.split(split)
    for d, x, m in zip(decoded.split(split), source.split(split), masks, strict=True):
        fvu = fvu.update(d, x, mask=m)
    return fvu


@pytest.mark.parametrize("split", [7, 16, 64])
def test_explained_variance_calculator_is_streamed_fvu(split):
    # evals.py ExplainedVarianceCalculator: float64 sums of x, ||x||^2 and ||x - x_hat||^2 over
    # every add_batch call; 1 - mse / (E||x||^2 - ||E x||^2): a ratio of sums, the global mean.
    source = activations(64, 7)
    decoded = source + 0.3 * randn(64, D_IN, seed=8)
    calculator = ExplainedVarianceCalculator()
    for d, x in zip(decoded.split(split), source.split(split), strict=True):
        calculator.add_batch(sae_output=d, hidden_acts=x)
    ours = stream(decoded, source, split).explained_variance()
    close(ours, calculator.compute(), {"rtol": 1e-12, "atol": 1e-12})
    close(1 - fraction_of_variance_unexplained(decoded, source), calculator.compute(), F64)


def test_explained_variance_calculator_edge_cases_differ():
    # evals.py ExplainedVarianceCalculator.compute: `if self.num_samples == 0 ...: return 0.0`;
    # `if total_variance < 1e-10: return 1.0 if mse < 1e-10 else 0.0`. Ours has no such cases:
    # NaN before 2 rows, NaN for 0 / 0, +inf FVU (so -inf explained variance) for error / 0.
    empty = ExplainedVarianceCalculator()
    assert empty.compute() == 0.0
    assert torch.isnan(StreamingFVU.empty((D_IN,)).explained_variance())
    constant = torch.full((16, D_IN), 3.0, dtype=torch.float64)
    exact = ExplainedVarianceCalculator()
    exact.add_batch(sae_output=constant, hidden_acts=constant)
    assert exact.compute() == 1.0
    assert torch.isnan(StreamingFVU.empty((D_IN,)).update(constant, constant).explained_variance())
    wrong = ExplainedVarianceCalculator()
    wrong.add_batch(sae_output=constant + 0.1, hidden_acts=constant)
    assert wrong.compute() == 0.0
    ours = StreamingFVU.empty((D_IN,)).update(constant + 0.1, constant).explained_variance()
    assert ours == -torch.inf


def test_explained_variance_calculator_cancels_at_large_offsets():
    # evals.py: "Cross-batch sums are accumulated on CPU in float64" and the variance is
    # E||x||^2 - ||E x||^2, one pass. At an offset of 1e6 (sigma 1) that subtraction loses
    # about 12 of float64's 16 digits; StreamingFVU (Chan's merge) keeps them.
    source = randn(256, 16, seed=9) + 1e6
    decoded = source + 0.3 * randn(256, 16, seed=10)
    calculator = ExplainedVarianceCalculator()
    for d, x in zip(decoded.split(32), source.split(32), strict=True):
        calculator.add_batch(sae_output=d, hidden_acts=x)
    ours = stream(decoded, source, 32).explained_variance()
    centred = source - source.mean(0)  # two passes in float64: the reference
    reference = 1 - (decoded - source).pow(2).sum() / centred.pow(2).sum()
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=0)
    differ(calculator.compute(), ours, by=1e-6)


class TokenBatches:
    """The one ActivationsStore method get_sparsity_and_variance_metrics calls."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_batch_tokens(self, batch_size):
        batch = next(self.batches)
        assert batch.shape[0] == batch_size
        return batch


def tiny_model_and_sae():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(
        n_layers=1,
        d_model=D_IN,
        n_ctx=12,
        d_head=4,
        n_heads=2,
        d_vocab=40,
        act_fn="relu",
        dtype=torch.float64,
        seed=0,
    )
    model = HookedTransformer(config)
    sae = build("standard", seed=3)
    sae.cfg.metadata = SAEMetadata(hook_name="blocks.0.hook_resid_post", hook_head_index=None)
    with torch.no_grad():
        sae.b_enc.copy_(randn(D_SAE, seed=30) * 0.2 - 0.1)
    return model, sae


def test_evals_sparsity_and_variance_metrics():
    # evals.py get_sparsity_and_variance_metrics on a tiny HookedTransformer (built here, no
    # download) and a float64 StandardTrainingSAE: tokens in ignore_tokens are masked out;
    # l0 = (acts != 0).sum(-1).float(), l1 = acts.abs().sum(-1), mse = ||x - x_hat||^2 per
    # token, each concatenated over batches and averaged; explained_variance from the
    # ExplainedVarianceCalculator; explained_variance_legacy the mean of per-token ratios about
    # each batch's mean; feature_density = (acts != 0) summed over kept tokens, in a float32
    # buffer, divided by their number.
    model, sae = tiny_model_and_sae()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(40, (4, 12), generator=generator) for _ in range(3)]
    for batch in batches:
        batch[:, 0] = 0  # a "BOS" at every position 0, dropped below
        batch[batch == 5] = 1  # and some "padding" (token 1)
    metrics, feature_metrics = get_sparsity_and_variance_metrics(
        sae,
        model,
        TokenBatches(batches),
        ActivationScaler(),
        n_batches=3,
        compute_l2_norms=False,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=4,
        model_kwargs={},
        ignore_tokens=[0, 1],
    )
    # The same activations, run here; our calls take the kept tokens through mask=.
    sources, decodeds, latents, keeps = [], [], [], []
    with torch.no_grad():
        for batch in batches:
            _, cache = model.run_with_cache(batch, prepend_bos=False)
            x = cache["blocks.0.hook_resid_post"].flatten(0, 1)
            z = sae.encode(x)
            sources.append(x)
            latents.append(z)
            decodeds.append(sae.decode(z))
            keeps.append(~torch.isin(batch.flatten(), torch.tensor([0, 1])))
    x, x_hat, z, keep = (torch.cat(t) for t in (sources, decodeds, latents, keeps))
    assert 0 < keep.sum() < len(keep)
    # float64 on both sides
    close(l2_reconstruction(x_hat, x, mask=keep) * D_IN, metrics["mse"], F64)
    close(l1_absolute(z, mask=keep), metrics["l1"], F64)
    fvu = StreamingFVU.empty((D_IN,))
    for d, s, m in zip(decodeds, sources, keeps, strict=True):
        fvu = fvu.update(d, s, mask=m)
    close(fvu.explained_variance(), metrics["explained_variance"], {"rtol": 1e-10, "atol": 1e-10})
    differ(metrics["explained_variance_legacy"], metrics["explained_variance"])
    # float32 on theirs: `.float()` counts and a float32 density buffer; exact integers, but the
    # means are rounded to float32 (relative error below 2**-23 per operation).
    f32_rounding = {"rtol": 1e-6, "atol": 0}
    close(l0_norm(z, mask=keep), metrics["l0"], f32_rounding)
    density = StreamingMean.empty((D_SAE,))
    for latent, m in zip(latents, keeps, strict=True):
        density = density.update((latent != 0).double(), mask=m)
    close(density.compute(), feature_metrics["feature_density"], f32_rounding)


def test_trainer_train_step_log_dict():
    # training/sae_trainer.py SAETrainer.build_train_step_log_dict, the dict it sends to wandb:
    # "losses/mse_loss" (the training term), "metrics/explained_variance" = 1 -
    # per_token_l2_loss.mean() / total_variance.mean() with the batch's own mean (so 1 - the
    # batch FVU), "metrics/l0" = feature_acts.bool().float().sum(-1).mean() (float32), and
    # "metrics/explained_variance_legacy", the mean of per-token ratios.
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = build("standard", seed=4)
    x = activations(64, 11)
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=640, train_batch_size_samples=64, lr_end=3e-4),
        sae,
        data_provider=iter(()),
    )
    out = sae.training_forward_pass(step_input(sae, x))
    log = trainer.build_train_step_log_dict(output=out, n_training_samples=64)
    close(l2_reconstruction(out.sae_out, x) * D_IN, log["losses/mse_loss"], F64)
    ours = 1 - fraction_of_variance_unexplained(out.sae_out.detach(), x)
    close(ours, log["metrics/explained_variance"], F64)
    close(l0_norm(out.feature_acts.detach()), log["metrics/l0"], {"rtol": 1e-6, "atol": 0})
    differ(log["metrics/explained_variance_legacy"], log["metrics/explained_variance"])
