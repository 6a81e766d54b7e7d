"""SAELens's per-token KL and TransformerLens's per-token CE, the real packages: sae-lens 6.54.12
and transformer-lens 3.9.0 (peers/saelens.txt), against kl_divergence and cross_entropy.

Cited inside the installed packages:

- ``sae_lens/evals.py``, ``_kl(original_logits, new_logits)``: ``F.kl_div(F.log_softmax(new,
  -1), F.softmax(orig, -1), reduction="none").sum(-1)``, KL(orig || new) per token, in the
  model's dtype.
- ``transformer_lens/utilities/lm_utils.py``, ``lm_cross_entropy_loss(logits, tokens,
  attention_mask, per_token)``: ``-log_softmax(logits)[..., :-1, :].gather(-1, tokens[..., 1:,
  None])[..., 0]``, with the positions where ``attention_mask[:, :-1] & attention_mask[:, 1:]``
  is False set to 0 and left out of the mean.

Run with ``.peer-venvs/saelens/bin/python -m pytest peer_tests/test_saelens_logits.py``.
"""

import math

import pytest
import torch
from sae_lens.evals import _kl
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

from peer_support import F32, F64, close, close_grads, randn
from sae_losses import cross_entropy, kl_divergence


@pytest.mark.parametrize("shape", [(6, 11), (3, 4, 9)])
def test_kl_divergence_is_saelens_kl_per_token(shape):
    original = (2 * randn(*shape, seed=1)).requires_grad_()
    new = (original.detach() + randn(*shape, seed=2)).requires_grad_()
    ours = kl_divergence(original, new, reduce="none")
    peer = _kl(original, new)
    close(ours, peer, F64)
    weights = randn(*shape[:-1], seed=3)  # any upstream gradient, per token
    close_grads((ours * weights).sum(), (peer * weights).sum(), [original, new], F64)


def test_kl_divergence_in_bfloat16_is_the_float64_value_where_saelens_is_not():
    # SAELens computes in the model's dtype: bfloat16 log_softmax and softmax, rounded.
    original = (3 * randn(64, 50, seed=4)).to(torch.bfloat16)
    new = (original.double() + 0.3 * randn(64, 50, seed=5)).to(torch.bfloat16)
    exact = _kl(original.double(), new.double())
    close(kl_divergence(original, new, reduce="none"), exact, F32)
    assert (_kl(original, new).double() - exact).abs().max() > 1e-3


def test_zero_probability_entries_count_zero_where_saelens_gives_nan():
    original = torch.tensor([[0.0, 1.0, -math.inf]], dtype=torch.float64)
    new = torch.tensor([[0.5, 0.0, -math.inf]], dtype=torch.float64)
    assert _kl(original, new).isnan().all()
    close(
        kl_divergence(original, new, reduce="none"),
        _kl(original[:, :2], new[:, :2]),  # the same distributions without the empty entry
        F64,
    )


def test_cross_entropy_is_transformer_lens_next_token_loss():
    logits = (2 * randn(3, 7, 13, seed=6)).requires_grad_()
    tokens = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(7))
    peer = lm_cross_entropy_loss(logits, tokens, per_token=True)
    ours = cross_entropy(logits[:, :-1], tokens[:, 1:], reduce="none")
    close(ours, peer, F64)
    weights = randn(3, 6, seed=8)
    close_grads((ours * weights).sum(), (peer * weights).sum(), [logits], F64)
    # The mean: flattened rows (a copy of logits[:, :-1]), or every position with the last
    # one masked (no copy); both are TransformerLens's per_token=False.
    mean = lm_cross_entropy_loss(logits, tokens)
    close(cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()), mean, F64)
    scored = torch.ones_like(tokens, dtype=torch.bool)
    scored[:, -1] = False
    rolled = tokens.roll(-1, dims=1).flatten()
    close(cross_entropy(logits.flatten(0, 1), rolled, mask=scored.flatten()), mean, F64)


def test_cross_entropy_with_transformer_lens_attention_mask():
    # Padding at the end of row 1 and a pad token id of -100 in the targets (never read: the
    # mask drops those rows). TransformerLens scores a position when it and the next are kept.
    logits = (2 * randn(2, 6, 9, seed=9)).requires_grad_()
    tokens = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(10))
    attention = torch.ones(2, 6, dtype=torch.bool)
    attention[1, 4:] = False
    peer = lm_cross_entropy_loss(logits, tokens, attention_mask=attention)
    scored = attention[:, :-1] & attention[:, 1:]
    targets = torch.where(attention[:, 1:], tokens[:, 1:], -100)
    ours = cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), mask=scored.flatten())
    close(ours, peer, F64)
    close_grads(ours, peer, [logits], F64)
