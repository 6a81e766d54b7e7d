"""Cheap input checks shared by every op and accumulator.

They read only Python-side metadata (type, dtype, shape, device), so they never sync with the
device and they trace under ``torch.compile`` as guards rather than graph breaks. Messages format
sizes one at a time, which works on the symbolic sizes of ``dynamic=True`` graphs too (``str`` of
a whole symbolic shape cannot be traced).
"""

from collections.abc import Sequence
from typing import Literal, TypeAlias, cast

import torch
from torch import Tensor

__all__ = [
    "Reduce",
    "accumulation_dtype",
    "check_activations",
    "check_feature_vector",
    "check_floating",
    "check_non_negative_float",
    "check_pair",
    "check_positive_float",
    "check_reduce",
    "check_same_shape",
    "describe",
    "shape_str",
]

Reduce: TypeAlias = Literal["none", "mean", "sum"]
_REDUCE_MODES = ("none", "mean", "sum")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def shape_str(shape: Tensor | Sequence[int]) -> str:
    """``(2, 3)``-style text for a shape, concrete or symbolic."""
    sizes = [f"{size}" for size in (shape.shape if isinstance(shape, Tensor) else shape)]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"


def describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {shape_str(x)}"
    return type(x).__name__


def check_floating(name: str, x: object) -> Tensor:
    """A floating-point tensor of a dtype the ops compute in (float8 is not one)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}.")
    if x.dtype.itemsize == 1:
        raise TypeError(
            f"`{name}` has dtype {x.dtype}: float8 is not supported (aten cannot reduce or promote "
            "it); convert it to bfloat16, float16 or float32 first."
        )
    return x


_LAST_AXIS_WORDS = {"feature": "feature", "vocab": "vocabulary"}


def check_activations(name: str, x: object, *, last: str = "feature") -> Tensor:
    """Check that ``x`` is a floating tensor shaped ``(batch, *component, <last>)``, the last axis
    (``"feature"``, or ``"vocab"`` for logits) not empty."""
    x = check_floating(name, x)
    if x.ndim < 2:
        raise ValueError(
            f"`{name}` must have shape (batch, *component, {last}) with at least 2 dimensions, "
            f"got shape {shape_str(x)}."
        )
    if x.shape[-1] == 0:
        word = _LAST_AXIS_WORDS[last]
        raise ValueError(f"`{name}` has an empty {word} axis: shape {shape_str(x)}.")
    return x


def check_pair(decoded: object, source: object) -> tuple[Tensor, Tensor]:
    """``decoded`` and ``source``: activations of one shape, with no broadcasting."""
    decoded = check_activations("decoded", decoded)
    source = check_activations("source", source)
    check_same_shape("`decoded` and `source`", decoded, source)
    return decoded, source


def check_same_shape(names: str, a: Tensor, b: Tensor) -> None:
    """No broadcasting: ``a`` and ``b`` must have identical shapes."""
    if a.shape != b.shape:
        raise ValueError(
            f"{names} must have the same shape, got {shape_str(a)} and {shape_str(b)}."
        )


def check_reduce(reduce: object) -> Reduce:
    if not isinstance(reduce, str) or reduce not in _REDUCE_MODES:
        raise ValueError(f"`reduce` must be one of 'none', 'mean' or 'sum', got {reduce!r}.")
    return cast(Reduce, reduce)


def check_feature_vector(name: str, x: object, like: Tensor) -> Tensor:
    """A floating ``(feature,)`` tensor on ``like``'s device, such as a weight or a threshold."""
    x = check_floating(name, x)
    if x.shape != like.shape[-1:]:
        raise ValueError(
            f"`{name}` must have shape (feature,) = {shape_str(like.shape[-1:])}, "
            f"got {shape_str(x)}."
        )
    if x.device != like.device:
        raise ValueError(f"`{name}` is on {x.device} but the inputs are on {like.device}.")
    return x


def _as_float(name: str, value: object, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"`{name}` must be a {kind} float, got {value!r}.")
    try:
        return float(value)
    except OverflowError:  # a Python int beyond float64
        raise ValueError(f"`{name}` must be a {kind} float, got {value!r}.") from None


def check_positive_float(name: str, value: object) -> float:
    """A positive, finite Python number (bool excluded); returned as a float."""
    number = _as_float(name, value, "positive")
    if not 0 < number < float("inf"):
        raise ValueError(f"`{name}` must be a positive float, got {value!r}.")
    return number


def check_non_negative_float(name: str, value: object) -> float:
    """A non-negative Python number, ``inf`` included (bool and NaN excluded); as a float."""
    number = _as_float(name, value, "non-negative")
    if not number >= 0:
        raise ValueError(f"`{name}` must be a non-negative float, got {value!r}.")
    return number


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype results are accumulated and returned in: promoted, half goes up to float32."""
    dtype = dtypes[0]
    for other in dtypes[1:]:
        if other is not dtype:
            dtype = torch.promote_types(dtype, other)
    return torch.float32 if dtype in _HALF_DTYPES else dtype
