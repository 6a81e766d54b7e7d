"""dictionary_learning's evaluation numbers, the real package: dictionary-learning 0.1.0
(peers/dictionary_learning.txt), against the recipes of docs/evaluation.md.

Files cited are inside the installed package, ``site-packages/dictionary_learning/``:

- ``evaluation.py``: ``loss_recovered`` (the model run clean, with ``x̂`` written over the
  submodule's output at every position, and with zeros there; each CE is
  ``nn.CrossEntropyLoss(ignore_index=tokenizer.pad_token_id)`` of ``logits[:, :-1]`` against
  ``tokens[:, 1:]``), and ``evaluate`` (per batch ``frac_recovered = (loss_reconstructed -
  loss_zero) / (loss_original - loss_zero)``, ``cossim``, ``l2_ratio`` and
  ``relative_reconstruction_bias``, each added up and divided by ``n_batches``; ``frac_alive``
  from the summed activations).

A tiny float64 GPT-2 and a word-level tokenizer are built here (nothing is downloaded) and
wrapped in nnsight's ``LanguageModel``, as ``loss_recovered`` expects.

Run with ``.peer-venvs/dictionary_learning/bin/python -m pytest
peer_tests/test_dictionary_learning_downstream.py``.
"""

import pytest
import torch
from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.evaluation import evaluate, loss_recovered
from nnsight import LanguageModel
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from peer_support import F64, close, differ, randn
from sae_losses import (
    StreamingMean,
    StreamingReconstructionBias,
    StreamingSpliceScores,
    cosine_similarity,
    l2_norm_ratio,
)

D_MODEL, D_SAE, VOCAB, SEQ, BATCH = 8, 32, 20, 10, 3
PAD = 1


@pytest.fixture(scope="module")
def model_and_dictionary():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), pad_token="t1"
    )
    config = GPT2Config(
        n_layer=1, n_embd=D_MODEL, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0
    )
    config.eos_token_id = 0
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(config).double().eval()
    dictionary = AutoEncoder(D_MODEL, D_SAE).double()
    with torch.no_grad():
        dictionary.encoder.weight.copy_(randn(D_SAE, D_MODEL, seed=20))
        dictionary.bias.copy_(0.1 * randn(D_MODEL, seed=21))
    return LanguageModel(hf_model, tokenizer=tokenizer), hf_model, dictionary


def token_batches(n=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(2, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(n)]
    for i, batch in enumerate(batches):
        batch[i % BATCH, -(1 + 2 * i) :] = PAD  # padding of a different length in each batch
    return batches


def three_runs(hf_model, dictionary, tokens):
    """Clean, spliced (x̂ at every position) and zero-ablated logits, (batch, seq, vocab)."""

    def replace(by):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = by(hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    block = hf_model.transformer.h[0]
    with torch.no_grad():
        runs = [hf_model(tokens).logits]
        for by in (dictionary, torch.zeros_like):
            handle = block.register_forward_hook(replace(by))
            try:
                runs.append(hf_model(tokens).logits)
            finally:
                handle.remove()
    return runs


def frac_recovered_update(per_batch, tokens, clean, spliced, ablated, pad_id):
    """The dictionary_learning recipe of docs/evaluation.md, verbatim."""
    last = torch.arange(tokens.shape[1]) == tokens.shape[1] - 1
    targets = tokens.roll(-1, 1)
    keep = (targets != pad_id) & ~last
    logits = [x.flatten(0, 1) for x in (clean, spliced, ablated)]
    one = StreamingSpliceScores.empty().update(*logits, targets.flatten(), mask=keep.flatten())
    return per_batch.update(one.compute()["ce_loss_score"].reshape(1))


def test_frac_recovered_is_the_mean_of_per_batch_ce_loss_scores(model_and_dictionary):
    model, hf_model, dictionary = model_and_dictionary
    batches = token_batches()
    per_batch, whole_set = StreamingMean.empty(), StreamingSpliceScores.empty()
    theirs = []
    for tokens in batches:
        original, reconstructed, zero = loss_recovered(
            tokens, model, model.transformer.h[0], dictionary
        )
        theirs.append((reconstructed - zero) / (original - zero))  # evaluate's frac_recovered
        runs = three_runs(hf_model, dictionary, tokens)
        per_batch = frac_recovered_update(per_batch, tokens, *runs, PAD)
        # The three losses of the batch: its CE means over the non-padding targets.
        keep = (tokens.roll(-1, 1) != PAD) & (torch.arange(SEQ) != SEQ - 1)
        logits = [x.flatten(0, 1) for x in runs]
        one = StreamingSpliceScores.empty().update(
            *logits, tokens.roll(-1, 1).flatten(), mask=keep.flatten()
        )
        means = one.compute()
        for ours, peer in zip(
            ("ce_clean", "ce_spliced", "ce_ablated"), (original, reconstructed, zero), strict=True
        ):
            close(means[ours], peer.detach(), F64)
        whole_set = whole_set.merge(one)
    frac_recovered = sum(t.detach() for t in theirs) / len(theirs)  # evaluate: sum / n_batches
    close(per_batch.compute(), frac_recovered, F64)
    # The score over the whole set, from its means, is another number.
    differ(whole_set.compute()["ce_loss_score"], frac_recovered, by=1e-6)


def test_evaluate_shrinkage_and_similarity_are_means_of_per_batch_means(model_and_dictionary):
    _, _, dictionary = model_and_dictionary
    batches = [randn(n, D_MODEL, seed=30 + n) + 0.5 for n in (7, 40, 13)]  # uneven
    out = evaluate(dictionary, iter(batches), n_batches=len(batches))
    names = ("cossim", "l2_ratio", "relative_reconstruction_bias")
    per_batch = {name: StreamingMean.empty() for name in names}
    density = StreamingMean.empty((D_SAE,))
    bias = StreamingReconstructionBias.empty()
    with torch.no_grad():
        for x in batches:
            x_hat, f = dictionary(x, output_features=True)
            one = StreamingReconstructionBias.empty().update(x_hat, x)
            values = {
                "cossim": cosine_similarity(x_hat, x),
                "l2_ratio": l2_norm_ratio(x_hat, x),
                "relative_reconstruction_bias": one.compute(),
            }
            per_batch = {name: per_batch[name].update(values[name].reshape(1)) for name in names}
            density = density.update(f != 0)
            bias = bias.update(x_hat, x)
    for name in names:
        close(per_batch[name].compute(), out[name], F64)
    # frac_alive: the latents that ever fired, from the firing frequency.
    close((density.compute() > 0).double().mean(), out["frac_alive"], F64)
    differ(bias.compute(), out["relative_reconstruction_bias"], by=1e-6)
