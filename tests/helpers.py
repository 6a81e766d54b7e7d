"""Shared test helpers: seeded inputs and the float64 reference implementations."""

import torch


def randn(*shape, dtype=torch.float32, seed=0):
    """Seeded normal values, drawn in float64 and rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def reduce_reference(rows: torch.Tensor, reduce: str) -> torch.Tensor:
    return {"none": rows, "mean": rows.mean(0), "sum": rows.sum(0)}[reduce]


def l2_reference(decoded, source, reduce):
    """Mean over features of the squared error, in float64, then ``reduce`` over the batch."""
    return reduce_reference((decoded.double() - source.double()).pow(2).mean(-1), reduce)


def l1_reference(learned, reduce):
    """Sum over features of the absolute values, in float64, then ``reduce`` over the batch."""
    return reduce_reference(learned.double().abs().sum(-1), reduce)
