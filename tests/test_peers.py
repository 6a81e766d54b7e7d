"""Peer libraries' loss and metric conventions, reproduced with this library's calls.

Each test compares a float64 transcription of a peer's formula (tests/peers.py, or a local one
here; every one cites its repository and file) with the call in this library that gives the same
number, on the same random data. Where the peer's definition differs in substance, the test
asserts the difference instead. These tests back the two README tables "Conventions: each term
in SAELens and dictionary_learning" and "Reproducing other libraries' evaluation numbers".

Peer functions are always evaluated before ours on the same tensors, so a call here that wrote
into its inputs could not change the peer's number (test_streaming_fvu_leaves_inputs_unchanged
checks that separately).
"""

import pytest
import torch

import peers
from helpers import randn
from sae_losses import (
    StreamingFVU,
    fraction_of_variance_unexplained,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
)

F64 = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-12}
# (batch, feature) and seed: every term is checked on several of each.
CASES = [((7, 5), 0), ((33, 16), 1), ((128, 3), 2), ((64, 48), 3)]
# A peer that "differs in substance" must differ by far more than float64 rounding.
SUBSTANTIAL = 1e-3


def data(shape, seed):
    return randn(*shape, dtype=F64, seed=seed)


def close(actual, expected):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), **TIGHT
    )


def differ(a, b, by=SUBSTANTIAL):
    a, b = float(a), float(b)
    assert abs(a - b) > by, f"expected a substantial difference, got {a!r} and {b!r}"


def reconstruction(shape, seed, noise=0.3):
    source = data(shape, seed)
    return source + noise * data(shape, seed + 100), source


def latents(shape, seed, nonnegative=False):
    """Activations with exact zeros, as after a ReLU; signed unless ``nonnegative``."""
    z = data(shape, seed)
    z = torch.where(z.abs() < 0.4, 0.0, z)
    return z.abs() if nonnegative else z


def grads(value, *inputs):
    return torch.autograd.grad(value, inputs)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def stream(decoded, source, split, mask=None):
    fvu = StreamingFVU.empty(source.shape[1:])
    size = split or len(source)
    masks = [None] * len(source.split(size)) if mask is None else mask.split(size)
    for d, x, m in zip(decoded.split(size), source.split(size), masks, strict=True):
        fvu = fvu.update(d, x, mask=m)
    return fvu


# === Conventions: each term in SAELens and dictionary_learning ==============================

# --- reconstruction -------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_saelens_mse_is_l2_times_features(shape, seed):
    # decoderesearch/SAELens sae_lens/saes/sae.py, via peers.saelens_mse: sum over features.
    decoded, source = reconstruction(shape, seed)
    d_peer, d_ours = leaves(decoded, decoded)
    peer = peers.saelens_mse(d_peer, source)
    ours = l2_reconstruction(d_ours, source) * shape[-1]
    close(ours, peer)
    close(grads(ours, d_ours)[0], grads(peer, d_peer)[0])


def dictionary_learning_recon_loss(decoded, source):
    """saprmarks/dictionary_learning trainers/standard.py (and trainers/jumprelu.py):
    ``recon_loss = (x - x_hat).pow(2).sum(dim=-1).mean()``."""
    x, x_hat = source.double(), decoded.double()
    return (x - x_hat).pow(2).sum(dim=-1).mean()


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_dictionary_learning_recon_loss_is_l2_times_features(shape, seed):
    decoded, source = reconstruction(shape, seed)
    close(
        l2_reconstruction(decoded, source) * shape[-1],
        dictionary_learning_recon_loss(decoded, source),
    )


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_dictionary_learning_l2_loss_is_the_unsquared_row_norm(shape, seed):
    # saprmarks/dictionary_learning evaluation.py, via peers.dictionary_learning_l2_loss.
    decoded, source = reconstruction(shape, seed)
    peer = peers.dictionary_learning_l2_loss(decoded, source)
    rows = l2_reconstruction(decoded, source, reduce="none") * shape[-1]
    close(rows.sqrt().mean(), peer)
    differ(peer**2, l2_reconstruction(decoded, source) * shape[-1])  # not the squared error


# --- decoder-norm-weighted L1 and Lp ----------------------------------------------------------


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_saelens_decoder_weighted_l1_is_weighted_l1_absolute(shape, seed):
    # decoderesearch/SAELens sae_lens/saes/standard_sae.py, via peers.saelens_l1_decoder_weighted.
    z, w_dec = latents(shape, seed), data((shape[-1], 6), seed + 1)  # W_dec is (d_sae, d_in)
    z_peer, w_peer, z_ours, w_ours = leaves(z, w_dec, z, w_dec)
    peer = peers.saelens_l1_decoder_weighted(z_peer, w_peer)
    ours = l1_absolute(z_ours, weight=w_ours.norm(dim=1))
    close(ours, peer)
    for got, want in zip(grads(ours, z_ours, w_ours), grads(peer, z_peer, w_peer), strict=True):
        close(got, want)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_saelens_decoder_weighted_lp_is_rooted_lp_sparsity(shape, seed, p):
    # decoderesearch/SAELens sae_lens/saes/standard_sae.py, via peers.saelens_lp:
    # (z * W_dec.norm(dim=1)).norm(p), the p-th root, with the weight inside the power.
    z, w_dec = latents(shape, seed), data((shape[-1], 6), seed + 1)
    z_peer, w_peer, z_ours, w_ours = leaves(z, w_dec, z, w_dec)
    peer = peers.saelens_lp(z_peer, w_peer, p)
    ours = lp_sparsity(z_ours, p=p, weight=w_ours.norm(dim=1), root=True)
    close(ours, peer)
    for got, want in zip(grads(ours, z_ours, w_ours), grads(peer, z_peer, w_peer), strict=True):
        close(got, want)


@pytest.mark.parametrize("root", [False, True])
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_dictionary_learning_lp_is_lp_sparsity_for_nonnegative_z(shape, seed, p, root):
    # saprmarks/dictionary_learning dictionary_learning/trainers/p_anneal.py, via
    # peers.dictionary_learning_lp: 'Lp^p' (root=False) and 'Lp' (root=True), no abs.
    z = latents(shape, seed, nonnegative=True) + 0.1  # > 0: their pow has finite gradients
    z_peer, z_ours = leaves(z, z)
    peer = peers.dictionary_learning_lp(z_peer, p, root=root)
    ours = lp_sparsity(z_ours, p=p, root=root)
    close(ours, peer)
    close(grads(ours, z_ours)[0], grads(peer, z_peer)[0])


def test_dictionary_learning_lp_differs_without_abs_and_at_zero():
    # peers.dictionary_learning_lp (dictionary_learning/trainers/p_anneal.py) has no abs.
    z = latents((16, 8), 5)
    assert (z < 0).any()
    # Fractional p on negative z: NaN there, a finite value here.
    assert torch.isnan(peers.dictionary_learning_lp(z, 0.5))
    assert torch.isfinite(lp_sparsity(z, p=0.5))
    # p = 1: a signed sum there, the sum of |z| here.
    differ(peers.dictionary_learning_lp(z, 1.0), lp_sparsity(z, p=1.0))
    close(lp_sparsity(z, p=1.0), peers.dictionary_learning_lp(z.abs(), 1.0))
    # Exact zeros (ReLU output) with p < 1: f.pow(p) has an infinite gradient there, ours is 0.
    z = latents((16, 8), 6, nonnegative=True)
    assert (z == 0).any()
    z_peer, z_ours = leaves(z, z)
    (grad_peer,) = grads(peers.dictionary_learning_lp(z_peer, 0.5), z_peer)
    (grad_ours,) = grads(lp_sparsity(z_ours, p=0.5), z_ours)
    assert torch.isinf(grad_peer[z == 0]).all()
    assert (grad_ours[z == 0] == 0).all()
    close(grad_ours[z > 0], grad_peer[z > 0])


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_dictionary_learning_decoder_weighted_l1_for_nonnegative_z(shape, seed):
    # saprmarks/dictionary_learning trainers/standard.py (StandardTrainerAprilUpdate), via
    # peers.dictionary_learning_l1_decoder_weighted: decoder.weight is (d_in, d_sae), no abs.
    z, decoder_weight = latents(shape, seed, nonnegative=True), data((6, shape[-1]), seed + 1)
    z_peer, w_peer, z_ours, w_ours = leaves(z, decoder_weight, z, decoder_weight)
    peer = peers.dictionary_learning_l1_decoder_weighted(z_peer, w_peer)
    ours = l1_absolute(z_ours, weight=w_ours.norm(dim=0))
    close(ours, peer)
    (grad_w_peer,) = grads(peer, w_peer)
    (grad_w_ours,) = grads(ours, w_ours)
    close(grad_w_ours, grad_w_peer)
    # Signed z: their sum lets negative activations cancel positive ones; ours takes |z|.
    signed = latents(shape, seed)
    differ(
        peers.dictionary_learning_l1_decoder_weighted(signed, decoder_weight),
        l1_absolute(signed, weight=decoder_weight.norm(dim=0)),
    )


# --- L0 -------------------------------------------------------------------------------------


def saelens_eval_l0(learned, keep):
    """decoderesearch/SAELens sae_lens/evals.py: special tokens removed by the mask, then
    ``(flattened_sae_feature_acts != 0).sum(dim=-1).float()``, concatenated, ``.mean()``."""
    return (learned.double()[keep] != 0).sum(dim=-1).double().mean()


def dictionary_learning_eval_l0(learned, batch_size):
    """saprmarks/dictionary_learning evaluation.py: per batch ``(f != 0).float().sum(dim=-1)
    .mean()``, added up and divided by ``n_batches``."""
    values = [(f != 0).double().sum(dim=-1).mean() for f in learned.double().split(batch_size)]
    return sum(values) / len(values)


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_eval_l0_is_l0_norm(shape, seed):
    z = latents(shape, seed)
    keep = data(shape[:1], seed + 7) > -0.5  # e.g. BOS and padding dropped
    close(l0_norm(z, mask=keep), saelens_eval_l0(z, keep))
    batch_size = next(k for k in (16, 11, 7) if shape[0] % k == 0)  # equal batches
    close(l0_norm(z), dictionary_learning_eval_l0(z, batch_size))


# --- JumpReLU L0 ----------------------------------------------------------------------------


def jumprelu_case(shape, seed):
    """Pre-activations near thresholds, some thresholds negative (zeroed by SAELens's relu)."""
    pre = data(shape, seed)
    threshold = 0.5 * data(shape[-1:], seed + 1)
    return pre, threshold


@pytest.mark.parametrize("bandwidth", [0.1, 0.5])
@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_saelens_jumprelu_l0_value_and_threshold_gradient(shape, seed, bandwidth):
    # decoderesearch/SAELens sae_lens/saes/jumprelu_sae.py, via peers.saelens_jumprelu_l0:
    # Step on the pre-activations with threshold.relu(); Step.backward's rectangle window.
    pre, threshold = jumprelu_case(shape, seed)
    t_peer, t_ours = leaves(threshold, threshold)
    peer = peers.saelens_jumprelu_l0(pre, t_peer, bandwidth)
    ours = jumprelu_l0(pre, t_ours.relu(), bandwidth=bandwidth)
    close(ours, peer)
    (grad_peer,) = grads(peer, t_peer)
    (grad_ours,) = grads(ours, t_ours)
    assert grad_peer.count_nonzero() > 0  # the window catches some pre-activations
    close(grad_ours, grad_peer)


def test_saelens_jumprelu_l0_three_dimensional():
    # SAELens's Step sums its threshold gradient over dim=0 only; autograd sums the rest, so a
    # (batch, component, feature) input still matches ours averaged over the components.
    pre, threshold = data((20, 3, 8), 0), 0.5 * data((8,), 1).abs()
    t_peer, t_ours = leaves(threshold, threshold)
    peer = peers.saelens_jumprelu_l0(pre, t_peer, 0.5)
    ours = jumprelu_l0(pre, t_ours.relu(), bandwidth=0.5).mean()
    close(ours, peer)
    close(grads(ours, t_ours)[0], grads(peer, t_peer)[0])


def test_dictionary_learning_jumprelu_l0_value_matches_but_gradient_differs():
    # saprmarks/dictionary_learning dictionary_learning/trainers/jumprelu.py, via
    # peers.dictionary_learning_jumprelu_l0: the Step is applied to f = JumpReLU(pre), after
    # the jump, so its window looks at f, which is 0 for every inactive entry.
    bandwidth = 0.5
    pre = torch.tensor([[-3.0, 0.9, 1.1], [-2.0, 0.8, 2.0], [0.05, 0.3, 1.05]], dtype=F64)
    threshold = torch.tensor([0.1, 1.0, 1.0], dtype=F64)  # 0.1 < bandwidth / 2
    t_peer, t_ours = leaves(threshold, threshold)
    peer = peers.dictionary_learning_jumprelu_l0(pre, t_peer, bandwidth)
    ours = jumprelu_l0(pre, t_ours, bandwidth=bandwidth)
    close(ours, peer)  # the same count for a positive threshold
    (grad_peer,) = grads(peer, t_peer)
    (grad_ours,) = grads(ours, t_ours)
    # Ours, the paper's window on pre: |pre - t| < 0.25. Feature 0: only 0.05; feature 1: 0.9
    # and 0.8; feature 2: 1.1 and 1.05. Each hit is -(1/0.5) / 3 rows.
    close(grad_ours, torch.tensor([-1.0, -2.0, -2.0], dtype=F64) * 2 / 3)
    # Theirs, the window on f: feature 0 (t < eps/2) counts all 3 inactive rows, however
    # negative pre is; feature 1 misses pre = 0.9 and 0.8, just below t (f = 0 there).
    close(grad_peer, torch.tensor([-3.0, 0.0, -2.0], dtype=F64) * 2 / 3)
    differ((grad_peer - grad_ours).abs().max(), 0)


# === Reproducing other libraries' evaluation numbers =========================================


@pytest.mark.parametrize("split", [None, 5, 13])
@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_saelens_explained_variance_is_streamed_fvu(shape, seed, split):
    # decoderesearch/SAELens sae_lens/evals.py ExplainedVarianceCalculator, via
    # peers.saelens_explained_variance: ratio of sums over every row, with the global mean.
    decoded, source = reconstruction(shape, seed)
    peer = peers.saelens_explained_variance(decoded, source, split)
    close(stream(decoded, source, split).explained_variance(), peer)
    # Special tokens: SAELens drops them before add_batch; here a mask does it.
    keep = data(shape[:1], seed + 7) > -0.5
    keep[:2] = True
    peer = peers.saelens_explained_variance(decoded[keep], source[keep])
    close(stream(decoded, source, split, keep).explained_variance(), peer)


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_saelens_legacy_explained_variance_differs(shape, seed):
    # peers.saelens_explained_variance_legacy (SAELens sae_lens/evals.py): a mean of per-row
    # ratios; no call here computes it.
    decoded, source = reconstruction(shape, seed)
    legacy = peers.saelens_explained_variance_legacy(decoded, source, split=None)
    differ(legacy, stream(decoded, source, None).explained_variance())


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_sparsify_fvu_is_fvu_per_call(shape, seed):
    # EleutherAI/sparsify sparsify/sparse_coder.py, via peers.sparsify_fvu.
    decoded, source = reconstruction(shape, seed)
    d_peer, d_ours = leaves(decoded, decoded)
    peer = peers.sparsify_fvu(d_peer, source)
    ours = fraction_of_variance_unexplained(d_ours, source)
    close(ours, peer)
    close(grads(ours, d_ours)[0], grads(peer, d_peer)[0])  # sparsify trains on it


def test_sparsify_logged_fvu_is_a_mean_of_chunk_ratios():
    # EleutherAI/sparsify sparsify/trainer.py, via peers.sparsify_logged_fvu: the logged FVU
    # averages per-rank (and per-micro-batch) FVUs, each about its own chunk's mean.
    decoded, source = reconstruction((48, 8), 0)
    shift = torch.arange(4, dtype=F64).repeat_interleave(12)[:, None]  # chunks differ in mean
    decoded, source = decoded + shift, source + shift
    chunks = 4
    logged = peers.sparsify_logged_fvu(decoded, source, chunks, variance="chunk")
    per_chunk = [
        fraction_of_variance_unexplained(d, x)
        for d, x in zip(decoded.chunk(chunks), source.chunk(chunks), strict=True)
    ]
    close(torch.stack(per_chunk).mean(), logged)  # reproducible, chunk by chunk
    differ(logged, stream(decoded, source, 12).compute())  # but not the FVU of all rows
    # trainer.py @ 001d98eb: the batch variance, unscaled, in every chunk gives FVU / chunks.
    batch = fraction_of_variance_unexplained(decoded, source)
    close(peers.sparsify_logged_fvu(decoded, source, chunks, variance="batch"), batch / chunks)
    # tests/test_micro_acc_steps.py @ b769a181 (each chunk's share of it), equal chunks: the FVU.
    close(peers.sparsify_logged_fvu(decoded, source, chunks, variance="share"), batch)


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_dictionary_learning_frac_variance_explained_centres_the_numerator(shape, seed):
    # saprmarks/dictionary_learning evaluation.py, via
    # peers.dictionary_learning_frac_variance_explained: 1 - sum var(x - x_hat) / sum var(x).
    decoded, source = reconstruction(shape, seed)
    residual = decoded - source
    centred = source + (residual - residual.mean(0))  # a residual with zero mean
    peer = peers.dictionary_learning_frac_variance_explained(centred, source)
    close(1 - fraction_of_variance_unexplained(centred, source), peer)  # equal only then
    # A constant bias in decoded: their number does not move, 1 - FVU drops.
    biased = centred + 0.5
    peer_biased = peers.dictionary_learning_frac_variance_explained(biased, source)
    close(peer_biased, peer)
    ours = 1 - fraction_of_variance_unexplained(biased, source)
    differ(peer_biased, ours)
    assert peer_biased > ours


def test_dictionary_learning_frac_variance_explained_averages_batches():
    # evaluation.py divides the per-batch sum by n_batches: a mean of per-batch ratios, each
    # about its own batch's mean, even with zero-mean residuals in every batch.
    source = (
        data((48, 8), 1) * torch.tensor([0.5, 1.0, 3.0], dtype=F64).repeat_interleave(16)[:, None]
    )
    decoded = source + 0.3 * data((48, 8), 2)  # so per-batch FVUs differ: 0.36, 0.09, 0.01
    batches = [
        (x + (d - x) - (d - x).mean(0), x)
        for d, x in zip(decoded.split(16), source.split(16), strict=True)
    ]
    decoded = torch.cat([d for d, _ in batches])
    peer = peers.dictionary_learning_frac_variance_explained(decoded, source, split=16)
    per_batch = [1 - fraction_of_variance_unexplained(d, x) for d, x in batches]
    close(torch.stack(per_batch).mean(), peer)
    differ(peer, stream(decoded, source, 16).explained_variance())


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_openai_normalized_mse_is_a_mean_of_uncentred_row_ratios(shape, seed):
    # openai/sparse_autoencoder sparse_autoencoder/loss.py, via peers.openai_normalized_mse.
    decoded, source = reconstruction(shape, seed)
    source = source + 0.5  # a mean away from 0, as in real activations
    decoded = decoded + 0.5
    peer = peers.openai_normalized_mse(decoded, source)
    error = l2_reconstruction(decoded, source, reduce="none")
    baseline = l2_reconstruction(torch.zeros_like(source), source, reduce="none")
    close((error / baseline).mean(), peer)
    differ(peer, fraction_of_variance_unexplained(decoded, source))  # not an FVU


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_openai_kernels_normalized_mse_is_fvu(shape, seed):
    # openai/sparse_autoencoder sparse_autoencoder/kernels.py, via
    # peers.openai_kernels_normalized_mse (train.py uses it for AuxK).
    decoded, source = reconstruction(shape, seed)
    close(
        fraction_of_variance_unexplained(decoded, source),
        peers.openai_kernels_normalized_mse(decoded, source),
    )


# --- precision and purity -------------------------------------------------------------------


def test_saelens_one_pass_variance_cancels_at_large_offsets():
    # SAELens sae_lens/evals.py keeps float64 sums of x and ||x||^2 and subtracts: at an offset
    # of 1e6 (sigma 1) its explained variance is off by about 1e-5. StreamingFVU is not.
    decoded, source = reconstruction((256, 16), 0)
    source, decoded = source + 1e6, decoded + 1e6
    reference = 1 - (decoded - source).pow(2).sum() / (source - source.mean(0)).pow(2).sum()
    peer = peers.saelens_explained_variance(decoded, source, split=32)
    ours = stream(decoded, source, 32).explained_variance()
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=0)
    differ(peer, reference, by=1e-6)


def test_streaming_fvu_leaves_inputs_unchanged():
    # Every comparison above hands the same tensors to a peer formula and to this library.
    decoded, source = reconstruction((9, 4), 0)
    keep = torch.tensor([True] * 7 + [False] * 2)
    for mask in (None, keep):
        d, x = decoded.clone(), source.clone()
        StreamingFVU.empty((4,)).update(d, x, mask=mask)
        assert torch.equal(d, decoded)
        assert torch.equal(x, source)
