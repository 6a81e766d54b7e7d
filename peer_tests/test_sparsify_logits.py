"""sparsify's end-to-end losses, the real package: eai-sparsify 1.3.3 (peers/sparsify.txt),
against cross_entropy and kl_divergence.

Cited inside the installed package, ``site-packages/sparsify/trainer.py``, ``Trainer.fit``:

- ``loss_fn="ce"``: ``ce = self.model(x, labels=x).loss``: the Hugging Face causal-LM loss
  (``transformers/loss/loss_utils.py``, ``ForCausalLMLoss``), the mean next-token
  cross-entropy of the logits upcast to float32 (``logits.float()``), -100 ignored;
- ``loss_fn="kl"``: ``clean_probs = self.model(x).logits.softmax(dim=-1)``, then ``dirty_lps =
  self.model(x).logits.log_softmax(dim=-1)`` and ``kl = -torch.sum(clean_probs * dirty_lps,
  dim=-1).mean()``: the cross-entropy H(p, q), which is KL(p || q) + H(p), not the KL.

The model is a tiny GPT-2 built here (transformers, nothing downloaded), in float64.

Run with ``.peer-venvs/sparsify/bin/python -m pytest peer_tests/test_sparsify_logits.py``.
"""

import inspect

import torch
from sparsify.trainer import Trainer

from peer_support import F32, F64, close, close_grads, differ
from sae_losses import cross_entropy, kl_divergence


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=16,
        vocab_size=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).double().eval()


def tokens():
    return torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1))


def test_sparsify_ce_loss_is_the_mean_next_token_cross_entropy():
    assert "ce = self.model(x, labels=x).loss" in inspect.getsource(Trainer.fit)
    model, x = tiny_gpt2(), tokens()
    peer = model(x, labels=x).loss
    logits = model(x).logits
    ours = cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    # The peer upcasts the float64 logits to float32: agreement to float32 rounding.
    close(ours, peer, F32)
    close_grads(ours, peer, model.parameters(), F32)
    close(ours, cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()), F32)


def test_sparsify_kl_loss_is_cross_entropy_kl_plus_entropy_with_kl_gradient():
    source = inspect.getsource(Trainer.fit)
    assert "kl = -torch.sum(clean_probs * dirty_lps, dim=-1).mean()" in source
    clean_model, x = tiny_gpt2(0), tokens()
    with torch.no_grad():
        clean = clean_model(x).logits
    dirty_model = tiny_gpt2(1)  # stands in for the model with the SAE spliced in
    dirty = dirty_model(x).logits
    # The peer's expression, evaluated as Trainer.fit does it.
    clean_probs = clean.softmax(dim=-1)
    dirty_lps = dirty.log_softmax(dim=-1)
    peer = -torch.sum(clean_probs * dirty_lps, dim=-1).mean()
    ours = kl_divergence(clean.flatten(0, 1), dirty.flatten(0, 1))
    entropy = -(clean_probs * clean.log_softmax(-1)).sum(-1).mean()
    close(ours + entropy, peer, F64)
    differ(ours, peer)  # the value differs by H(p) ...
    close_grads(ours, peer, dirty_model.parameters(), F64)  # ... the gradient does not
