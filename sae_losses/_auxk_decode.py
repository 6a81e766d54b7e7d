"""The AuxK sparse decode: each row's top ``k_aux`` dead latents, decoded with ``embedding_bag``.

The machinery under :func:`sae_losses.auxk_reconstruction` and :func:`sae_losses.auxk_loss`, on
inputs they have already checked: the dead top-k selection, a block of rows at a time when eager
(:data:`SELECT_ELEMENTS`), and the decode of the selected pre-activations, ``k_aux`` decoder rows
per token, so nothing of size ``batch x latent`` is materialised or saved for backward.
"""

import torch
from torch import Tensor

from sae_losses._rowops import uses_plain_formula

__all__ = ["SELECT_ELEMENTS", "sparse_decode"]


# Rows of the eager top-k's masked temporary: 16 MiB of float32. topk pays a parallel loop per
# call, which dominates below a few hundred rows of 16384 latents on a busy CPU (32-row blocks
# took 3x as long as one call); at this size the temporary is 1/16 of a (4096, 16384) batch.
SELECT_ELEMENTS = 1 << 22


def _dead_top_indices(pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """``(batch, k_aux)``: each row's ``k_aux`` largest dead pre-activations, then live filler.

    Live latents compete at ``-inf``, so they fill only the slots beyond the number of dead
    latents. Eager, the masked ``batch x latent`` temporary is made a block of rows at a time.
    """
    with torch.no_grad():
        rows = max(1, SELECT_ELEMENTS // pre.shape[1])
        if uses_plain_formula((pre,)) or pre.shape[0] <= rows:
            return torch.where(dead, pre, -torch.inf).topk(k_aux, dim=1, sorted=False).indices
        indices = torch.empty((pre.shape[0], k_aux), dtype=torch.int64, device=pre.device)
        for start in range(0, pre.shape[0], rows):
            block = pre[start : start + rows]
            chosen = torch.where(dead, block, -torch.inf).topk(k_aux, dim=1, sorted=False)
            indices[start : start + rows] = chosen.indices
        return indices


def sparse_decode(
    pre: Tensor, dead: Tensor, weight: Tensor, k_aux: int, keep: Tensor | None
) -> Tensor:
    """ê, ``(batch, model)``: the checked inputs' AuxK decode; rows ``keep`` drops are 0.

    The selected values are gathered again from ``pre``, so the gradient reaches exactly the
    selected pre-activations (gather's backward is the one ``batch x latent`` gradient), and the
    weights of filler slots and dropped rows are replaced by 0 with ``where``, not multiplied.
    """
    indices = _dead_top_indices(pre, dead, k_aux)
    selected = dead[indices]
    if keep is not None:
        selected = selected & keep[:, None]
    dtype = torch.promote_types(pre.dtype, weight.dtype)
    weights = torch.where(selected, pre.gather(1, indices).relu(), 0).to(dtype)
    return torch.nn.functional.embedding_bag(
        indices, weight.to(dtype), per_sample_weights=weights, mode="sum"
    )
