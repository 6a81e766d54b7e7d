"""The fields of the accumulators with several statistics: on one device, counted in kept rows.

:class:`StreamingSpliceScores` and :class:`StreamingReconstructionBias` hold several statistic
tensors beside ``count``: their construction checks that every field is on one device
(:func:`one_device`), and each ``update`` adds the int64 number of rows its mask kept
(:func:`kept_rows`) to ``count``.
"""

import torch
from torch import Tensor

from sae_losses._accumulator import Accumulator

__all__ = ["kept_rows", "one_device"]


def one_device(accumulator: Accumulator, fields: tuple[Tensor, ...]) -> None:
    if len({field.device for field in fields}) != 1:
        name = type(accumulator).__name__
        raise ValueError(f"the fields of a {name} must be on one device.")


def kept_rows(mask: Tensor | None, like: Tensor) -> Tensor:
    """The int64 number of rows ``mask`` keeps (every row without one)."""
    if mask is None:
        return torch.full((), like.shape[0], dtype=torch.int64, device=like.device)
    return mask.sum()
