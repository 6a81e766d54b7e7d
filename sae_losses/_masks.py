"""Row masks: the one check and the one reshape every op and accumulator uses.

A mask is ``(batch,)``: bool (rows to keep) or, where an op allows it, floating row weights. It
never gets a gradient, so :func:`check_mask` returns it detached, once. :func:`row_view` gives
any per-row tensor the shape ``(batch, 1, ..., 1)`` that broadcasts against an input.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._checks import check_floating, shape_str

__all__ = ["Mask", "check_mask", "keep_of", "row_view"]

# The annotation of every term's `mask` argument: bool rows to keep, or row weights.
Mask = Bool[Tensor, " batch"] | Float[Tensor, " batch"] | None


def check_mask(mask: object, like: Tensor, *, weights_allowed: bool = True) -> Tensor | None:
    """The detached ``(batch,)`` bool mask, or floating row weights where ``weights_allowed``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"`mask` must be a torch.Tensor or None, got {type(mask).__name__}.")
    if mask.dtype != torch.bool and not (weights_allowed and mask.is_floating_point()):
        kinds = "bool or floating (row weights)" if weights_allowed else "bool"
        raise TypeError(f"`mask` must be a {kinds} tensor, got dtype {mask.dtype}.")
    if mask.is_floating_point():
        check_floating("mask", mask)  # float8 weights
    if mask.shape != like.shape[:1]:
        raise ValueError(
            f"`mask` must have shape (batch,) = {shape_str(like.shape[:1])}, got {shape_str(mask)}."
        )
    if mask.device != like.device:
        raise ValueError(f"`mask` is on {mask.device} but the inputs are on {like.device}.")
    return mask.detach()


def keep_of(mask: Tensor | None) -> Tensor | None:
    """The bool rows a checked mask keeps: itself, or the rows whose weight is not 0."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask != 0


def row_view(per_row: Tensor, like: Tensor) -> Tensor:
    """``per_row`` (leading axis ``batch``) reshaped to broadcast against ``like``'s rows."""
    return per_row.reshape(per_row.shape + (1,) * (like.ndim - per_row.ndim))
