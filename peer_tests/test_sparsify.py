"""EleutherAI sparsify, the real package: eai-sparsify 1.3.3 (peers/sparsify.txt).

Files cited are inside the installed package, ``site-packages/sparsify/``:

- ``sparse_coder.py``, ``SparseCoder.forward``: ``total_variance = (y - y.mean(0)).pow(2).sum()``
  unless a caller passes one; ``fvu = e.pow(2).sum() / total_variance``; and the AuxK term
  ``scale * (e_hat - e.detach()).pow(2).sum() / total_variance``.
- ``trainer.py``, ``Trainer.fit``: each micro-batch is normalised by the *unchunked* batch's
  ``total_variance`` ("Normalize every chunk against the unchunked batch's variance"), and the
  logged ``fvu/<hookpoint>`` is ``sum over chunks of out.fvu / denom`` with ``denom =
  grad_acc_steps * micro_acc_steps * wandb_log_frequency``.

Run with ``make test-peers`` (this file needs the .peer-venvs/sparsify venv).
"""

import sys
import types
from importlib.metadata import version

import pytest
import torch
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer
from sparsify.sparse_coder import decoder_impl

from peer_support import F32, F64, close, close_grads, differ, randn
from sae_losses import fraction_of_variance_unexplained

D_IN, LATENTS, K = 8, 32, 4


def test_the_installed_version_is_the_pinned_one():
    # docs/peer_conventions.md states every row for this version (peers/*.txt pins it).
    assert version("eai-sparsify") == "1.3.3"


def coder(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return SparseCoder(D_IN, SparseCoderConfig(num_latents=LATENTS, k=K), dtype=dtype)


def activations(rows, seed):
    # A mean away from 0, as in a residual stream.
    return randn(rows, D_IN, seed=seed) + 0.5 * randn(D_IN, seed=seed + 1)


@pytest.mark.parametrize(("rows", "seed"), [(16, 0), (37, 1), (128, 2)])
def test_sparse_coder_fvu_is_fvu_per_call(rows, seed):
    # sparse_coder.py SparseCoder.forward: fvu = e.pow(2).sum() / (y - y.mean(0)).pow(2).sum(),
    # one forward call's rows; sparsify trains on it, so the gradients must agree too.
    sae = coder(seed)
    x = activations(rows, seed)
    out = sae(x)
    ours = fraction_of_variance_unexplained(out.sae_out, x)
    close(ours, out.fvu, F64)
    close_grads(ours, out.fvu, sae.parameters(), F64)


def test_sparse_coder_auxk_loss_is_scaled_fvu_of_the_residual_target():
    # sparse_coder.py SparseCoder.forward with a dead_mask: k_aux = y.shape[-1] // 2, scale =
    # min(num_dead / k_aux, 1), e_hat from the top k_aux dead pre-activations, and
    # auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance: the variance of the
    # INPUT y. With decoded = y + (e_hat - e), fraction_of_variance_unexplained(decoded, y) has
    # exactly that numerator and denominator.
    sae = coder(3)
    x = activations(64, 3)
    dead = torch.zeros(LATENTS, dtype=torch.bool)
    dead[::3] = True  # 11 dead latents: scale = min(11 / 4, 1) = 1
    dead_few = torch.zeros(LATENTS, dtype=torch.bool)
    dead_few[:2] = True  # 2 dead latents: scale = 2 / 4, k_aux = 2
    for mask in (dead, dead_few):
        out = sae(x, dead_mask=mask)
        num_dead = int(mask.sum())
        k_aux = min(D_IN // 2, num_dead)
        scale = min(num_dead / (D_IN // 2), 1.0)
        # e_hat with the peer's own encoder and decoder_impl (sparse_coder.py, same steps).
        _, _, pre_acts = sae.encode(x)
        auxk_acts, auxk_indices = torch.where(mask[None], pre_acts, -torch.inf).topk(
            k_aux, sorted=False
        )
        e_hat = decoder_impl(auxk_indices, auxk_acts, sae.W_dec.mT)
        e = (x - out.sae_out).detach()
        ours = scale * fraction_of_variance_unexplained(x + (e_hat - e), x)
        close(ours, out.auxk_loss, F64)
        close_grads(ours, out.auxk_loss, sae.parameters(), F64)


class Recorder:
    """Stands in for wandb: ``Trainer.fit`` does ``import wandb``, ``wandb.init``, ``wandb.log``."""

    def __init__(self):
        self.logs = {}
        self.module = types.ModuleType("wandb")
        self.module.init = lambda **kwargs: None
        self.module.log = lambda info, step: self.logs.__setitem__(step, dict(info))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=16,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("micro_acc_steps", [1, 4])
def test_trainer_logs_batch_fvu_over_micro_acc_steps(micro_acc_steps, monkeypatch, tmp_path):
    # trainer.py Trainer.fit with loss_fn="fvu": every chunk gets total_variance of the whole
    # batch, unscaled, and the log adds out.fvu / denom per chunk. So the logged number is
    # sum_c |e_c|^2 / (micro_acc_steps * total_variance) = (batch FVU) / micro_acc_steps.
    # The real Trainer runs on a tiny GPT-2 (no download); a recorder replaces wandb, and a
    # wrapper records what each SparseCoder.forward call saw and returned.
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "wandb", recorder.module)
    calls = []
    forward = SparseCoder.forward

    def recording_forward(self, x, y=None, **kwargs):
        out = forward(self, x, y, **kwargs)
        calls.append((x.detach().clone(), out.sae_out.detach().clone(), out.fvu.detach()))
        return out

    monkeypatch.setattr(SparseCoder, "forward", recording_forward)
    generator = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": torch.randint(64, (16,), generator=generator)} for _ in range(8)]
    cfg = TrainConfig(
        SparseCoderConfig(num_latents=LATENTS, k=K),
        batch_size=4,
        micro_acc_steps=micro_acc_steps,
        optimizer="adam",
        lr=1e-3,
        lr_warmup_steps=0,
        hookpoints=["h.0"],
        log_to_wandb=True,
        wandb_log_frequency=1,
        save_every=10**6,
        save_dir=str(tmp_path),
        run_name="peer-test",
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, dataset, tiny_gpt2())
    try:
        trainer.fit()
    finally:
        torch.set_float32_matmul_precision("highest")  # fit() sets "high" process-wide
    # 8 sequences, 4 per step: two steps, which trainer.py logs as step 1 and 2.
    assert sorted(recorder.logs) == [1, 2]
    assert len(calls) == 2 * micro_acc_steps
    for step, logged in enumerate(recorder.logs[s] for s in (1, 2)):
        chunks = calls[step * micro_acc_steps : (step + 1) * micro_acc_steps]
        source = torch.cat([x for x, _, _ in chunks])
        decoded = torch.cat([d for _, d, _ in chunks])
        batch_fvu = fraction_of_variance_unexplained(decoded, source)  # float32, as theirs
        # float32 sums over 4 x 16 rows x 16 features, on both sides.
        close(batch_fvu / micro_acc_steps, logged["fvu/h.0"], F32)
        if micro_acc_steps > 1:
            differ(logged["fvu/h.0"], batch_fvu)  # not the batch FVU
            # nor a mean of per-chunk FVUs, each about its own chunk's mean
            per_chunk = torch.stack([fraction_of_variance_unexplained(d, x) for x, d, _ in chunks])
            differ(logged["fvu/h.0"], per_chunk.mean())
