"""What the logit-term tests share: float64 references, seeded inputs and masks.

The references compute cross_entropy and kl_divergence in float64 straight from torch's
logsumexp and log_softmax, so nothing of the library's blocked kernels is shared with them.
"""

import torch

from helpers import randn

__all__ = ["REDUCE_MODES", "ce_rows", "draw", "kl_rows", "make_mask", "targets_for"]

REDUCE_MODES = ["none", "mean", "sum"]


def ce_rows(logits, targets):
    """logsumexp - the target's logit, in float64."""
    z = logits.double()
    return torch.logsumexp(z, -1) - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_rows(reference, logits):
    """sum p (log p - log q) over the entries with p > 0, from float64 log_softmax."""
    log_p, log_q = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0).sum(-1)


def draw(shape, dtype=torch.float64, seed=0, scale=2.0):
    """Seeded logits: ``scale`` times N(0, 1), drawn in float64 and rounded to ``dtype``."""
    return (scale * randn(*shape, dtype=torch.float64, seed=seed)).to(dtype)


def targets_for(logits, seed=0):
    """Seeded int64 targets in ``[0, vocab)``, one per row of ``logits``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator)


def make_mask(kind, batch):
    """A ``(batch,)`` mask that drops rows 1, 4, 7, ...: bool, or float weights in [0.5, 2]."""
    keep = torch.arange(batch) % 3 != 1
    if kind == "bool":
        return keep
    return torch.where(keep, torch.linspace(0.5, 2.0, batch, dtype=torch.float64), 0)
