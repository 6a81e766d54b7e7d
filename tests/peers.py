"""Float64 transcriptions of how peer SAE libraries compute each term (coefficients set to 1).

Inputs are 2-D ``(batch, feature)``. Sources were read through the stored-repository index;
``@`` is the commit read. docs/peer_conventions.md compares them with this library.
"""

import torch
from torch import Tensor


def _f64(*xs: Tensor) -> list[Tensor]:
    return [x.double() for x in xs]


def _batches(decoded: Tensor, source: Tensor, split: int | None):
    """Consecutive batches of ``split`` rows (default: one batch), as separate peer calls."""
    size = split or len(source)
    return zip(decoded.split(size), source.split(size), strict=True)


def _rectangle(x: Tensor) -> Tensor:
    # Both SAELens and dictionary_learning: ((x > -0.5) & (x < 0.5)), an open window.
    return ((x > -0.5) & (x < 0.5)).to(x)


# --- SAELens: decoderesearch/SAELens (formerly jbloomAus/SAELens) ---------------------------


def saelens_mse(decoded: Tensor, source: Tensor) -> Tensor:
    """Sum over features, mean over rows. sae_lens/saes/sae.py @ 00a0bb39: ``mse_loss(preds,
    target, reduction="none")``; ``mse_loss = per_item_mse_loss.sum(dim=-1).mean()``.
    dictionary_learning's ``(x - x_hat).pow(2).sum(dim=-1).mean()`` is the same number."""
    decoded, source = _f64(decoded, source)
    return torch.nn.functional.mse_loss(decoded, source, reduction="none").sum(dim=-1).mean()


def saelens_lp(learned: Tensor, w_dec: Tensor, p: float = 1.0) -> Tensor:
    """Rooted Lp norm of decoder-norm-weighted acts, mean over rows; ``w_dec`` is (d_sae, d_in).
    sae_lens/saes/standard_sae.py @ 55d9a345: ``weighted_feature_acts = feature_acts *
    self.W_dec.norm(dim=1)``; ``sparsity = weighted_feature_acts.norm(p=self.cfg.lp_norm,
    dim=-1)``; ``l1_loss = (step_input.coefficients["l1"] * sparsity).mean()``.
    torch's norm takes |.| and the 1/p root: (sum_f |w_f z_f|^p)^(1/p)."""
    learned, w_dec = _f64(learned, w_dec)
    return (learned * w_dec.norm(dim=1)).norm(p=p, dim=-1).mean()


def saelens_l1_decoder_weighted(learned: Tensor, w_dec: Tensor) -> Tensor:
    """``saelens_lp`` at the default ``lp_norm = 1.0``: mean_b sum_f |z_bf| ||W_dec[f]||."""
    return saelens_lp(learned, w_dec, 1.0)


class SaelensStep(torch.autograd.Function):
    """``Step``, sae_lens/saes/jumprelu_sae.py @ 19f954ec. Backward: ``torch.sum(-(1.0 /
    bandwidth) * rectangle((x - threshold) / bandwidth) * grad_output, dim=0)`` to the threshold,
    ``None`` to x. 3-D x still works (autograd sums the leftover axis); 1-D x raises."""

    @staticmethod
    def forward(x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        return (x > threshold).to(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, threshold, bandwidth = inputs
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        window = _rectangle((x - threshold) / ctx.bandwidth)
        return None, torch.sum(-(1.0 / ctx.bandwidth) * window * grad_output, dim=0), None


def saelens_jumprelu_l0(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Step L0 on the PRE-activations, mean over rows. jumprelu_sae.py @ 19f954ec: ``threshold
    = self.threshold.relu()``; ``l0 = torch.sum(Step.apply(hidden_pre, threshold,
    self.bandwidth), dim=-1)``; ``l0_loss = (step_input.coefficients["l0"] * l0).mean()``.
    Older @ 9c0140a7: ``threshold = exp(log_threshold)``, no ``relu``."""
    pre, threshold = _f64(pre, threshold)
    return torch.sum(SaelensStep.apply(pre, threshold.relu(), bandwidth), dim=-1).mean()


def saelens_explained_variance(decoded: Tensor, source: Tensor, split=None) -> float:
    """``ExplainedVarianceCalculator``, sae_lens/evals.py @ 191d44eb: sums of x, ||x||^2 and
    ||x - x_hat||^2 over all rows of all ``add_batch`` calls; ``total_variance =
    mean_squared_norm - mean_x.pow(2).sum().item()``; ``1.0 - mse / total_variance``; and
    ``if total_variance < 1e-10: return 1.0 if mse < 1e-10 else 0.0``."""
    decoded, source = _f64(decoded, source)
    n, sum_x, sum_sq, sum_res = 0, 0.0, 0.0, 0.0
    for d, x in _batches(decoded, source, split):
        sum_x = sum_x + x.sum(dim=0)
        sum_sq += x.pow(2).sum().item()
        sum_res += (x - d).pow(2).sum().item()
        n += x.shape[0]
    total_variance = sum_sq / n - (sum_x / n).pow(2).sum().item()
    mse = sum_res / n
    if total_variance < 1e-10:
        return 1.0 if mse < 1e-10 else 0.0
    return 1.0 - mse / total_variance


def saelens_explained_variance_legacy(decoded: Tensor, source: Tensor, split=None) -> float:
    """Per-row ratio about each batch's own mean, then the mean over all rows. evals.py
    @ 191d44eb: ``batched_variance_sum = (flattened_sae_input - flattened_sae_input.mean(dim=0))
    .pow(2).sum(dim=-1)``; ``1 - resid_sum_of_squares / batched_variance_sum``; cat, mean."""
    decoded, source = _f64(decoded, source)
    rows = []
    for d, x in _batches(decoded, source, split):
        rows.append(1 - (x - d).pow(2).sum(dim=-1) / (x - x.mean(dim=0)).pow(2).sum(dim=-1))
    return torch.cat(rows).mean().item()


# --- EleutherAI/sparsify -------------------------------------------------------------------


def sparsify_fvu(decoded: Tensor, source: Tensor) -> Tensor:
    """One forward call: ratio of sums about the call's own row mean. sparsify/sparse_coder.py
    @ 1b3ae1de: ``total_variance = (y - y.mean(0)).pow(2).sum()``; ``e = y - sae_out``;
    ``l2_loss = e.pow(2).sum()``; ``fvu = l2_loss / total_variance``."""
    decoded, source = _f64(decoded, source)
    return (source - decoded).pow(2).sum() / (source - source.mean(0)).pow(2).sum()


def sparsify_logged_fvu(decoded: Tensor, source: Tensor, chunks: int, variance="chunk") -> Tensor:
    """Batch cut into ``chunks`` micro-batches (ranks: same arithmetic). trainer.py: ``avg_fvu
    += float(self.maybe_all_reduce(out.fvu.detach()) / denom)``, a MEAN of per-chunk FVUs.
    ``variance``: "chunk" = each chunk's own (sparse_coder.py @ 1b3ae1de; always so per rank);
    "batch" = trainer.py @ 001d98eb ``total_variance = (outputs - outputs.mean(0)).pow(2).sum()``
    passed unscaled to every chunk (yields FVU / chunks); "share" = that times ``c.shape[0] /
    y.shape[0]`` (tests/test_micro_acc_steps.py @ b769a181; equal chunks give the batch FVU)."""
    decoded, source = _f64(decoded, source)
    full = (source - source.mean(0)).pow(2).sum()
    fvus = []
    for d, y in zip(decoded.chunk(chunks), source.chunk(chunks), strict=True):
        share = full * (y.shape[0] / source.shape[0])
        denom = {"chunk": (y - y.mean(0)).pow(2).sum(), "batch": full, "share": share}[variance]
        fvus.append((y - d).pow(2).sum() / denom)
    return torch.stack(fvus).mean()


def sparsify_auxk_loss(e_hat: Tensor, residual: Tensor, source: Tensor, num_dead: int) -> Tensor:
    """sparse_coder.py @ 1b3ae1de (``residual`` is ``e = y - sae_out``): ``k_aux = y.shape[-1]
    // 2``; ``scale = min(num_dead / k_aux, 1.0)``; ``scale * (e_hat - e.detach()).pow(2).sum()
    / total_variance``."""
    e_hat, residual, source = _f64(e_hat, residual, source)
    scale = min(num_dead / (source.shape[-1] // 2), 1.0)
    total_variance = (source - source.mean(0)).pow(2).sum()
    return scale * (e_hat - residual.detach()).pow(2).sum() / total_variance


# --- saprmarks/dictionary_learning ---------------------------------------------------------


def dictionary_learning_frac_variance_explained(decoded, source, split=None) -> float:
    """Per batch 1 - sum_f var(x - x_hat) / sum_f var(x) (unbiased; n-1 cancels), RESIDUAL
    centred too, then the mean over ``n_batches``. evaluation.py @ 067bf7b0: ``total_variance =
    t.var(x, dim=0).sum()``; ``residual_variance = t.var(x - x_hat, dim=0).sum()``."""
    decoded, source = _f64(decoded, source)
    values = []
    for d, x in _batches(decoded, source, split):
        values.append((1 - torch.var(x - d, dim=0).sum() / torch.var(x, dim=0).sum()).item())
    return sum(values) / len(values)


def dictionary_learning_l2_loss(decoded: Tensor, source: Tensor) -> Tensor:
    """UNSQUARED row norm, mean over rows: ``l2_loss = t.linalg.norm(x - x_hat, dim=-1).mean()``
    (evaluation.py; the loss of the pre-2025 StandardTrainer, trainers/standard.py)."""
    decoded, source = _f64(decoded, source)
    return torch.linalg.norm(source - decoded, dim=-1).mean()


def dictionary_learning_l1_decoder_weighted(learned: Tensor, decoder_weight: Tensor) -> Tensor:
    """StandardTrainerAprilUpdate, trainers/standard.py @ cfb36fff; ``decoder_weight`` is
    (d_in, d_sae): ``(f * self.ae.decoder.weight.norm(p=2, dim=0)).sum(dim=-1).mean()``.
    No abs (assumes ReLU f >= 0)."""
    learned, decoder_weight = _f64(learned, decoder_weight)
    return (learned * decoder_weight.norm(p=2, dim=0)).sum(dim=-1).mean()


def dictionary_learning_lp(learned: Tensor, p: float, root: bool = False) -> Tensor:
    """PAnnealTrainer.lp_norm, dictionary_learning/trainers/p_anneal.py @ 5ad595dd: ``norm_sq =
    f.pow(p).sum(dim=-1)``; 'Lp^p': ``norm_sq.mean()``; 'Lp': ``norm_sq.pow(1/p).mean()``.
    No abs, no decoder weights; negative f with fractional p gives NaN."""
    (learned,) = _f64(learned)
    norm_sq = learned.pow(p).sum(dim=-1)
    return norm_sq.pow(1 / p).mean() if root else norm_sq.mean()


class DictionaryLearningStep(torch.autograd.Function):
    """``StepFunction``, dictionary_learning/trainers/jumprelu.py @ 5ebe376d: ``x_grad =
    torch.zeros_like(x)``; ``threshold_grad = -(1.0 / bandwidth) * RectangleFunction.apply((x -
    threshold) / bandwidth) * grad_output``, element-wise (autograd sums it to the shape)."""

    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad_output):
        x, threshold = ctx.saved_tensors
        window = _rectangle((x - threshold) / ctx.bandwidth)
        return torch.zeros_like(x), -(1.0 / ctx.bandwidth) * window * grad_output, None


def dictionary_learning_jumprelu_l0(pre, threshold, bandwidth, target_l0=None) -> Tensor:
    """Step applied AFTER the jump (issue #55), mean over rows. jumprelu.py @ 5ebe376d: ``l0 =
    StepFunction.apply(f, self.ae.threshold, self.bandwidth).sum(dim=-1).mean()`` with ``f =
    JumpReLUFunction.apply(pre_jump, ...)``; loss ``((l0 / self.target_l0) - 1).pow(2)`` (older
    trainers/jumprelu.py @ 16bdfd95: ``l0``). Same value as H(pre - t) for t > 0; the window
    sees f = 0 for inactive entries, missing pre in (t - eps/2, t], all counted if t < eps/2."""
    pre, threshold = _f64(pre, threshold)
    f = pre * (pre > threshold)  # StepFunction gives f a zero grad, so JumpReLU's STE is moot
    l0 = DictionaryLearningStep.apply(f, threshold, bandwidth).sum(dim=-1).mean()
    return l0 if target_l0 is None else ((l0 / target_l0) - 1).pow(2)


# --- openai/sparse_autoencoder -------------------------------------------------------------


def openai_normalized_mse(decoded: Tensor, source: Tensor) -> Tensor:
    """Mean of per-row ratios, baseline about ZERO. sparse_autoencoder/loss.py @ 8f74a1cb:
    ``(((reconstruction - original_input) ** 2).mean(dim=1) / (original_input**2).mean(dim=1))
    .mean()``."""
    decoded, source = _f64(decoded, source)
    return ((decoded - source).pow(2).mean(dim=1) / source.pow(2).mean(dim=1)).mean()


def openai_normalized_l1(learned: Tensor, source: Tensor) -> Tensor:
    """loss.py @ 8f74a1cb: ``(latent_activations.abs().sum(dim=1) / original_input.norm(dim=1))
    .mean()``."""
    learned, source = _f64(learned, source)
    return (learned.abs().sum(dim=1) / source.norm(dim=1)).mean()


def openai_kernels_normalized_mse(decoded: Tensor, source: Tensor) -> Tensor:
    """Ratio of means about the batch mean (= one-batch FVU); kernels.py @ 3237a47a, used for
    AuxK in train.py: ``loss = mse(recon, xs) / mse(xs_mu[None, :].broadcast_to(xs.shape),
    xs)`` with ``xs_mu = xs.mean(dim=0)`` and ``mse`` the mean of per-row means."""
    decoded, source = _f64(decoded, source)
    mu = source.mean(dim=0)[None, :].broadcast_to(source.shape)
    return (decoded - source).pow(2).mean(dim=1).mean() / (mu - source).pow(2).mean(dim=1).mean()
