"""What the matryoshka_l2 tests share: seeded inputs, the call, and the naive float64 reference.

The reference decodes every prefix from scratch, ``b + z[:, :w] @ W[:w]``, in float64: nothing
of the incremental forward or of the walk-down backward is shared with it.
"""

import torch

from helpers import randn
from sae_losses import matryoshka_l2

__all__ = [
    "BATCH",
    "D_MODEL",
    "D_SAE",
    "WIDTHS",
    "call",
    "inputs",
    "naive_grads",
    "naive_rows",
    "reference",
]

BATCH, D_SAE, D_MODEL = 7, 12, 5
WIDTHS = [2, 5, 9, 12]


def naive_rows(z, w_dec, x, b_dec, widths):
    """``(batch, G)``: each prefix decoded from scratch, then the mean squared error."""
    bias = 0 if b_dec is None else b_dec
    return torch.stack([(bias + z[:, :w] @ w_dec[:w] - x).square().mean(-1) for w in widths], -1)


def reference(z, w_dec, x, b_dec, widths, reduce="mean", mask=None):
    """The float64 naive rows, weighted by the mask (exactly 0 where it is 0), then reduced."""
    rows = naive_rows(z.double(), w_dec.double(), x.double(), _double(b_dec), widths)
    w = torch.ones(rows.shape[0], dtype=torch.float64) if mask is None else mask.double()
    rows = torch.where(w[:, None] != 0, rows * w[:, None], 0)
    return {"none": rows, "sum": rows.sum(0), "mean": rows.sum(0) / w.sum()}[reduce]


def _double(t):
    return None if t is None else t.double()


def inputs(batch=BATCH, d_sae=D_SAE, d_model=D_MODEL, dtype=torch.float64, seed=0, grad=True):
    """Sparse non-negative latents (a third exact zeros), a decoder, a source and a bias."""
    z = randn(batch, d_sae, dtype=torch.float64, seed=seed).relu() + 0.0
    z = torch.where(z < 0.3, 0, z)
    tensors = [
        z,
        randn(d_sae, d_model, dtype=torch.float64, seed=seed + 1) / d_model**0.5,
        randn(batch, d_model, dtype=torch.float64, seed=seed + 2),
        randn(d_model, dtype=torch.float64, seed=seed + 3),
    ]
    return [t.to(dtype).requires_grad_(grad) for t in tensors]


def call(z, w_dec, x, b_dec, widths=WIDTHS, **options):
    return matryoshka_l2(z, w_dec, x, widths=widths, decoder_bias=b_dec, **options)


def naive_grads(tensors, widths, cotangent, mask=None):
    """Plain autograd of the naive formula (every prefix decoded from scratch), indexed rows."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    z, w_dec, x, b_dec = leaves
    keep = slice(None) if mask is None else mask != 0
    weight = 1 if mask is None else mask[keep, None].double()
    rows = naive_rows(z[keep], w_dec, x[keep], b_dec, widths) * weight
    grads = torch.autograd.grad(rows, leaves, cotangent[keep])
    return grads
