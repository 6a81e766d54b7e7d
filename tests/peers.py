"""Float64 TRANSCRIPTIONS of OpenAI's sparse_autoencoder formulas (coefficients set to 1).

openai/sparse_autoencoder is not on the package registry, so these are copies of its code, read
at the commits named in each docstring (sparse_autoencoder/loss.py @ 8f74a1cb, kernels.py
@ 3237a47a, train.py @ 4a32f5e7); docs/peer_conventions.md §6 lists them, and
tests/test_peers.py compares them with this library. Inputs are 2-D ``(batch, feature)``.

Every other peer (SAELens, sparsify, dictionary_learning, the seed) is checked against the real
installed package instead: peer_tests/, run by ``make test-peers``.
"""

import torch
from torch import Tensor


def _f64(*xs: Tensor) -> list[Tensor]:
    return [x.double() for x in xs]


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


def openai_auxk_loss(decoded_aux: Tensor, decoded: Tensor, source: Tensor, pre_bias: Tensor):
    """train.py @ 4a32f5e7: ``normalized_mse(ae.decode_sparse(auxk_inds, auxk_vals),
    flat_acts_train_batch - recons.detach() + ae.pre_bias.detach())``. ``decode_sparse``
    returns ``recons + self.pre_bias`` (FastAutoencoder, train.py), so ``decoded_aux`` is the dead
    latents' decoding plus the pre-bias, and the target is the residual plus the pre-bias."""
    decoded_aux, decoded, source, pre_bias = _f64(decoded_aux, decoded, source, pre_bias)
    target = source - decoded.detach() + pre_bias.detach()
    return openai_kernels_normalized_mse(decoded_aux, target)


def openai_train_loss(decoded: Tensor, source: Tensor, stats_sample: Tensor) -> Tensor:
    """train.py @ 4a32f5e7: ``mse_scale = 1 / ((stats_acts_sample.float().mean(dim=0) -
    stats_acts_sample.float()) ** 2).mean()``, computed once; the main loss is ``mse_scale *
    mse(recons, flat_acts_train_batch)``, with ``mse`` the mean over rows and features."""
    decoded, source, stats_sample = _f64(decoded, source, stats_sample)
    mse_scale = 1 / ((stats_sample.mean(dim=0) - stats_sample) ** 2).mean()
    return mse_scale * (decoded - source).pow(2).mean()


# --- Not OpenAI: a stopgap for two other test files -------------------------------------------


def saelens_jumprelu_l0(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """SAELens 6.54.12's step L0, ``Step`` in sae_lens/saes/jumprelu_sae.py: the count of
    ``pre > threshold`` per row, mean over rows; rectangle-kernel gradient to the threshold, none
    to ``pre``. No ``relu`` on the threshold (the release clamps the parameter in place instead).

    Kept only because tests/test_sparsity.py and tests/test_counts.py import it. The real
    package is checked in peer_tests/test_saelens.py; delete this with those imports."""
    pre, threshold = _f64(pre, threshold)
    return torch.sum(_SaelensStep.apply(pre, threshold, bandwidth), dim=-1).mean()


class _SaelensStep(torch.autograd.Function):
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
        u = (x - threshold) / ctx.bandwidth
        window = ((u > -0.5) & (u < 0.5)).to(x)
        return None, torch.sum(-(1.0 / ctx.bandwidth) * window * grad_output, dim=0), None
