"""OpenAI's sparse_autoencoder conventions, reproduced with this library's calls.

openai/sparse_autoencoder is not on the package registry, so each test compares a float64
TRANSCRIPTION of its code (tests/peers.py, with the commit each was read at) with the call here,
on random data, to 1e-12; where the definitions differ, the test asserts the difference. These
back the last table of docs/peer_conventions.md.

Every other peer (SAELens, sparsify, dictionary_learning, the seed) is checked against the real
installed package, in peer_tests/ (``make test-peers``), not here.
"""

import pytest
import torch

import peers
from helpers import randn
from sae_losses import (
    StreamingFVU,
    fraction_of_variance_unexplained,
    l1_absolute,
    l2_reconstruction,
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
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert abs(a - b) > by, f"expected a substantial difference, got {a!r} and {b!r}"


def reconstruction(shape, seed, noise=0.3):
    source = data(shape, seed) + 0.5  # a mean away from 0, as in real activations
    return source + noise * data(shape, seed + 100), source


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_openai_normalized_mse_is_a_mean_of_uncentred_row_ratios(shape, seed):
    # openai/sparse_autoencoder sparse_autoencoder/loss.py, via peers.openai_normalized_mse.
    decoded, source = reconstruction(shape, seed)
    peer = peers.openai_normalized_mse(decoded, source)
    error = l2_reconstruction(decoded, source, reduce="none")
    baseline = l2_reconstruction(torch.zeros_like(source), source, reduce="none")
    close((error / baseline).mean(), peer)
    differ(peer, fraction_of_variance_unexplained(decoded, source))  # not an FVU


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_openai_normalized_l1_divides_each_row_by_its_input_norm(shape, seed):
    # loss.py, via peers.openai_normalized_l1: each row's L1 over its own input's norm.
    _, source = reconstruction(shape, seed)
    learned = torch.where(data(shape, seed + 7).abs() < 0.4, 0.0, data(shape, seed + 7))
    peer = peers.openai_normalized_l1(learned, source)
    close((l1_absolute(learned, reduce="none") / source.norm(dim=-1)).mean(), peer)


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_openai_kernels_normalized_mse_is_fvu(shape, seed):
    # kernels.py, via peers.openai_kernels_normalized_mse (train.py uses it for AuxK).
    decoded, source = reconstruction(shape, seed)
    decoded_peer, decoded_ours = leaves(decoded, decoded)
    peer = peers.openai_kernels_normalized_mse(decoded_peer, source)
    ours = fraction_of_variance_unexplained(decoded_ours, source)
    close(ours, peer)
    (grad_peer,) = torch.autograd.grad(peer, [decoded_peer])
    (grad_ours,) = torch.autograd.grad(ours, [decoded_ours])
    close(grad_ours, grad_peer)


def test_openai_auxk_normalises_by_the_residual_variance():
    # train.py, via peers.openai_auxk_loss: normalized_mse(decode_sparse(...), x - x_hat +
    # pre_bias), decode_sparse adding the pre-bias too. The pre-bias shifts every row alike, so it
    # cancels: the FVU of the dead latents' decoding e_hat about the residual e = x - x_hat.
    decoded, source = reconstruction((64, 12), 4)
    e_hat = 0.2 * data((64, 12), 5)
    pre_bias = data((12,), 6)
    e_hat_peer, e_hat_ours = leaves(e_hat, e_hat)
    peer = peers.openai_auxk_loss(e_hat_peer + pre_bias, decoded, source, pre_bias)
    residual = source - decoded
    ours = fraction_of_variance_unexplained(e_hat_ours, residual)
    close(ours, peer)
    (grad_peer,) = torch.autograd.grad(peer, [e_hat_peer])
    (grad_ours,) = torch.autograd.grad(ours, [e_hat_ours])
    close(grad_ours, grad_peer)
    # sparsify's AuxK divides by the input's variance instead: a different number.
    sparsify_style = fraction_of_variance_unexplained(source + (e_hat - residual), source)
    differ(peer, sparsify_style)


def test_openai_train_loss_is_l2_over_a_frozen_sample_variance():
    # train.py, via peers.openai_train_loss: mse_scale from a fixed stats sample, computed once.
    decoded, source = reconstruction((48, 10), 7)
    sample = data((256, 10), 8) * 2 + 1
    scale = l2_reconstruction(sample.mean(0).expand_as(sample), sample)  # per-element variance
    close(
        l2_reconstruction(decoded, source) / scale, peers.openai_train_loss(decoded, source, sample)
    )


def test_streaming_fvu_leaves_inputs_unchanged():
    # Every comparison with a peer hands the same tensors to the peer and to this library.
    decoded, source = reconstruction((9, 4), 0)
    keep = torch.tensor([True] * 7 + [False] * 2)
    for mask in (None, keep):
        d, x = decoded.clone(), source.clone()
        StreamingFVU.empty((4,)).update(d, x, mask=mask)
        assert torch.equal(d, decoded)
        assert torch.equal(x, source)
