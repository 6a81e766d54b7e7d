"""Cheap input checks shared by the ops and the accumulator.

They read only Python-side metadata (type, dtype, shape), so they never sync with the device and
they trace under ``torch.compile`` as guards rather than graph breaks.
"""

import torch
from torch import Tensor

REDUCE_MODES = ("none", "mean", "sum")


def shape_str(x: Tensor) -> str:
    return str(tuple(x.shape))


def check_activations(name: str, x: object) -> None:
    """Check that ``x`` is a floating tensor shaped ``(batch, *component, feature)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}.")
    if x.ndim < 2:
        raise ValueError(
            f"`{name}` must have shape (batch, *component, feature) with at least 2 dimensions, "
            f"got shape {shape_str(x)}."
        )
    if x.shape[-1] == 0:
        raise ValueError(f"`{name}` has an empty feature axis: shape {shape_str(x)}.")


def check_reduce(reduce: object) -> None:
    if not isinstance(reduce, str) or reduce not in REDUCE_MODES:
        raise ValueError(f"`reduce` must be one of 'none', 'mean' or 'sum', got {reduce!r}.")


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype, other: torch.dtype | None = None) -> torch.dtype:
    """The dtype results are accumulated and returned in: half precision goes up to float32."""
    if other is not None and other != dtype:
        dtype = torch.promote_types(dtype, other)
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def reduce_batch(rows: Tensor, reduce: str) -> Tensor:
    """Apply ``reduce`` over the batch axis (axis 0) of per-row values."""
    if reduce == "mean":
        return rows.mean(0)
    if reduce == "sum":
        return rows.sum(0)
    return rows
