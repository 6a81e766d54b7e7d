"""SAELens's downstream and shrinkage metrics, the real package: sae-lens 6.54.12
(peers/saelens.txt), against the recipes of docs/evaluation.md.

Files cited are inside the installed package, ``site-packages/sae_lens/``:

- ``evals.py``: ``get_downstream_reconstruction_metrics`` (per batch ``get_recons_loss``, each
  metric filtered with the token mask, ``mask[:, :-1]`` for the CE, concatenated over batches and
  averaged; the scores from those means), ``get_recons_loss`` (the SAE spliced in only where
  the mask holds, every position zero-ablated, CE from TransformerLens ``loss_per_token=True``,
  ``_kl``: ``F.kl_div(F.log_softmax(new), F.softmax(orig), reduction="none").sum(-1)``), and
  ``get_sparsity_and_variance_metrics`` (``l2_ratio`` with ``‖x‖ < 1e-4`` replaced by 1,
  ``relative_reconstruction_bias`` per batch, ``cossim`` per token).

A tiny float64 ``HookedTransformer`` is built here (nothing is downloaded), with a float64
``StandardTrainingSAE``: both sides compute in float64.

Run with ``.peer-venvs/saelens/bin/python -m pytest peer_tests/test_saelens_downstream.py``.
"""

import pytest
import torch
from sae_lens.evals import (
    _kl,
    get_downstream_reconstruction_metrics,
    get_sparsity_and_variance_metrics,
)
from sae_lens.saes import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer, HookedTransformerConfig

from peer_support import F64, close, differ, randn
from sae_losses import (
    StreamingMean,
    StreamingReconstructionBias,
    StreamingSpliceScores,
    cosine_similarity,
    kl_divergence,
    l2_norm_ratio,
)

D_MODEL, D_SAE, VOCAB, SEQ, BATCH = 8, 32, 40, 12, 4
HOOK = "blocks.0.hook_resid_post"
SPECIAL = torch.tensor([0, 1])  # "BOS" and "padding"


class TokenBatches:
    """The one ActivationsStore method these evals call."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_batch_tokens(self, batch_size):
        batch = next(self.batches)
        assert batch.shape[0] == batch_size
        return batch


@pytest.fixture(scope="module")
def model_and_sae():
    config = HookedTransformerConfig(
        n_layers=1,
        d_model=D_MODEL,
        n_ctx=SEQ,
        d_head=4,
        n_heads=2,
        d_vocab=VOCAB,
        act_fn="relu",
        dtype=torch.float64,
        seed=0,
    )
    model = HookedTransformer(config)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, dtype="float64"))
    sae.cfg.metadata = SAEMetadata(hook_name=HOOK, hook_head_index=None)
    with torch.no_grad():
        sae.W_enc.copy_(randn(D_MODEL, D_SAE, seed=10) * 0.5)
        sae.W_dec.copy_(randn(D_SAE, D_MODEL, seed=11) * 0.3)
        sae.b_enc.copy_(randn(D_SAE, seed=12) * 0.2 - 0.1)
    return model, sae


def token_batches(n=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(2, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(n)]
    for i, batch in enumerate(batches):
        batch[:, 0] = 0  # a BOS at every position 0
        batch[i % BATCH, -(2 + i) :] = 1  # padding at the end of one sequence, of varying length
    return batches


def three_runs(model, sae, tokens, splice_where):
    """Clean, spliced (only where ``splice_where``) and zero-ablated logits, (batch, seq, vocab)."""

    def splice(activations, hook):
        return torch.where(
            splice_where[..., None], sae.decode(sae.encode(activations)), activations
        )

    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, splice)])
        ablated = model.run_with_hooks(
            tokens, fwd_hooks=[(HOOK, lambda a, hook: torch.zeros_like(a))]
        )
    return clean, spliced, ablated


def saelens_update(scores, tokens, clean, spliced, ablated, special_ids):
    """The SAELens recipe of docs/evaluation.md, verbatim."""
    keep = ~torch.isin(tokens, special_ids)
    last = torch.arange(tokens.shape[1]) == tokens.shape[1] - 1
    targets = tokens.roll(-1, 1)
    return scores.update(
        *(x.flatten(0, 1) for x in (clean, spliced, ablated)),
        targets.flatten(),
        mask=(keep & ~last).flatten(),
        kl_mask=keep.flatten(),
    )


KEYS = {  # ours: SAELens's
    "ce_clean": "ce_loss_without_sae",
    "ce_spliced": "ce_loss_with_sae",
    "ce_ablated": "ce_loss_with_ablation",
    "kl_spliced": "kl_div_with_sae",
    "kl_ablated": "kl_div_with_ablation",
    "ce_loss_score": "ce_loss_score",
    "kl_div_score": "kl_div_score",
}


@pytest.mark.parametrize("exclude", [True, False], ids=["special tokens excluded", "every token"])
def test_downstream_scores_follow_the_saelens_recipe(model_and_sae, exclude):
    model, sae = model_and_sae
    batches = token_batches()
    metrics = get_downstream_reconstruction_metrics(
        sae,
        model,
        TokenBatches(batches),
        ActivationScaler(),
        compute_kl=True,
        compute_ce_loss=True,
        n_batches=len(batches),
        eval_batch_size_prompts=BATCH,
        ignore_tokens=SPECIAL.tolist() if exclude else None,
    )
    special = SPECIAL if exclude else torch.tensor([], dtype=torch.int64)
    scores = StreamingSpliceScores.empty()
    for tokens in batches:
        runs = three_runs(model, sae, tokens, ~torch.isin(tokens, special))
        scores = saelens_update(scores, tokens, *runs, special)
    ours = scores.compute()
    for key, theirs in KEYS.items():
        close(ours[key], metrics[theirs], F64)
    kept_ce = sum(int((~torch.isin(t[:, :-1], special)).sum()) for t in batches)
    kept_kl = sum(int((~torch.isin(t, special)).sum()) for t in batches)
    assert (int(scores.count), int(scores.kl_count)) == (kept_ce, kept_kl)
    assert kept_ce < kept_kl  # the two token sets differ


def test_our_token_rule_is_another_number(model_and_sae):
    # One token set for CE and KL, predictions of special tokens dropped too: not SAELens's.
    model, sae = model_and_sae
    batches = token_batches(seed=2)
    metrics = get_downstream_reconstruction_metrics(
        sae,
        model,
        TokenBatches(batches),
        ActivationScaler(),
        compute_kl=True,
        compute_ce_loss=True,
        n_batches=len(batches),
        eval_batch_size_prompts=BATCH,
        ignore_tokens=SPECIAL.tolist(),
    )
    scores = StreamingSpliceScores.empty()
    for tokens in batches:
        real = ~torch.isin(tokens, SPECIAL)
        last = torch.arange(SEQ) == SEQ - 1
        keep = real & real.roll(-1, 1) & ~last
        clean, spliced, ablated = three_runs(model, sae, tokens, real)
        logits = [x.flatten(0, 1) for x in (clean, spliced, ablated)]
        scores = scores.update(*logits, tokens.roll(-1, 1).flatten(), mask=keep.flatten())
    differ(scores.compute()["ce_clean"], metrics["ce_loss_without_sae"], by=1e-6)


def test_saelens_kl_is_nan_where_both_logits_are_minus_inf():
    # evals.py _kl: F.kl_div(log_softmax(new), softmax(orig)) computes 0 * (-inf) there.
    orig = torch.tensor([[0.0, 1.0, -torch.inf]], dtype=torch.float64)
    new = torch.tensor([[0.5, 0.0, -torch.inf]], dtype=torch.float64)
    assert _kl(orig, new).isnan().all()
    ours = kl_divergence(orig, new, reduce="none")
    p = torch.softmax(orig[:, :2], -1)
    expected = (p * (p.log() - torch.log_softmax(new[:, :2], -1))).sum(-1)
    close(ours, expected, F64)


def peer_l2_ratio(x_hat, x):
    """The l2_ratio recipe of docs/evaluation.md, verbatim."""
    small = torch.linalg.vector_norm(x, dim=-1) < 1e-4
    x_hat_norm = torch.linalg.vector_norm(x_hat, dim=-1)
    return torch.where(small, x_hat_norm, l2_norm_ratio(x_hat, x, reduce="none"))


def test_shrinkage_and_cosine_follow_the_recipes(model_and_sae):
    model, sae = model_and_sae
    batches = token_batches(seed=3)
    metrics, _ = get_sparsity_and_variance_metrics(
        sae,
        model,
        TokenBatches(batches),
        ActivationScaler(),
        n_batches=len(batches),
        compute_l2_norms=True,
        compute_sparsity_metrics=False,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=False,
        eval_batch_size_prompts=BATCH,
        model_kwargs={},
        ignore_tokens=SPECIAL.tolist(),
    )
    names = ("cossim", "l2_ratio", "l2_norm_in", "l2_norm_out", "per_batch_bias")
    ours = {name: StreamingMean.empty() for name in names}
    bias = StreamingReconstructionBias.empty()
    with torch.no_grad():
        for tokens in batches:
            _, cache = model.run_with_cache(tokens, prepend_bos=False)
            x = cache[HOOK].flatten(0, 1)
            x_hat = sae.decode(sae.encode(x))
            keep = ~torch.isin(tokens, SPECIAL).flatten()
            one_batch = StreamingReconstructionBias.empty().update(x_hat, x, mask=keep)
            values = {
                "cossim": cosine_similarity(x_hat, x, reduce="none"),
                "l2_ratio": peer_l2_ratio(x_hat, x),
                "l2_norm_in": torch.linalg.vector_norm(x, dim=-1),
                "l2_norm_out": torch.linalg.vector_norm(x_hat, dim=-1),
            }
            ours = {
                **{name: ours[name].update(v, mask=keep) for name, v in values.items()},
                "per_batch_bias": ours["per_batch_bias"].update(one_batch.compute().reshape(1)),
            }
            bias = bias.update(x_hat, x, mask=keep)
    for name in names[:4]:
        close(ours[name].compute(), metrics[name], F64)
    close(ours["per_batch_bias"].compute(), metrics["relative_reconstruction_bias"], F64)
    # Eq. 10 over the set: the kept tokens per batch differ, so the per-batch mean is another
    # number (by rounding-free amounts, but small ones here: the batches are alike).
    differ(bias.compute(), metrics["relative_reconstruction_bias"], by=1e-9)
