"""AuxK: the auxiliary loss that has the dead latents of a TopK SAE reconstruct its residual.

Gao et al. 2024, "Scaling and evaluating sparse autoencoders", appendix A.2. Each row takes its
``k_aux`` largest pre-activations among the dead latents and decodes them sparsely (``k_aux``
decoder rows per token, with ``F.embedding_bag``), so nothing of size ``batch x latent`` is
materialised in the forward or saved for backward; the loss is the FVU of that decode against the
detached residual, through the batch FVU's shared sums (:func:`sae_losses._fvu.fvu_sums`).
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._auxk_decode import sparse_decode
from sae_losses._checks import check_floating, describe, shape_str
from sae_losses._fvu import fvu_sums, ratio_of_sums
from sae_losses._masks import check_mask

__all__ = ["auxk_loss", "auxk_reconstruction"]


def _check_inputs(
    pre_activations: object, dead: object, decoder_weight: object, k_aux: object
) -> tuple[Tensor, Tensor, Tensor, int]:
    pre = check_floating("pre_activations", pre_activations)
    if pre.ndim != 2:
        raise ValueError(
            f"`pre_activations` must have shape (batch, latent), got shape {shape_str(pre)}."
        )
    latents = pre.shape[1]
    if not isinstance(dead, Tensor) or dead.dtype != torch.bool:
        raise TypeError(f"`dead` must be a bool tensor, got {describe(dead)}.")
    if dead.shape != (latents,):
        raise ValueError(
            f"`dead` must have shape (latent,) = ({latents},), got shape {shape_str(dead)}."
        )
    weight = check_floating("decoder_weight", decoder_weight)
    if weight.ndim != 2 or weight.shape[0] != latents or weight.shape[1] == 0:
        raise ValueError(
            f"`decoder_weight` must have shape (latent, model) = ({latents}, model) with "
            f"model >= 1, got shape {shape_str(weight)}."
        )
    for name, t in (("dead", dead), ("decoder_weight", weight)):
        if t.device != pre.device:
            raise ValueError(f"`{name}` is on {t.device} but `pre_activations` is on {pre.device}.")
    if isinstance(k_aux, bool) or not isinstance(k_aux, int) or not 1 <= k_aux <= latents:
        raise ValueError(
            f"`k_aux` must be a Python int from 1 to the number of latents ({latents}), "
            f"got {k_aux!r}."
        )
    return pre, dead, weight, k_aux


def auxk_reconstruction(
    pre_activations: Float[Tensor, "batch latent"],
    dead: Bool[Tensor, " latent"],
    decoder_weight: Float[Tensor, "latent model"],
    *,
    k_aux: int,
) -> Float[Tensor, "batch model"]:
    r"""The AuxK reconstruction ê: each row's top ``k_aux`` dead latents, decoded with no bias.

    .. math::

        \hat{e}_b = \sum_{f \in T_b} \operatorname{relu}(\pi_{b,f}) \, W_f, \qquad
        T_b = \text{the } \min(k_{\text{aux}}, n_{\text{dead}}) \text{ dead latents with the
        largest } \pi_{b,f}

    with :math:`\pi` = ``pre_activations`` and :math:`W` = ``decoder_weight`` (Gao et al. 2024,
    appendix A.2; sparsify's and OpenAI's ``e_hat``). No decoder bias is added: the residual it
    is compared with already contains it (the bug of sparsify #132 and SAELens #644). Gradients
    flow to the selected pre-activations (through the ReLU) and to the selected decoder rows.

    The decode is sparse, ``k_aux`` decoder rows per row (``F.embedding_bag``): no
    ``(batch, latent)`` activation and no ``(batch, k_aux, model)`` gather is made or saved, and
    the eager top-k runs a block of rows at a time. Shapes are static: slots beyond the number of
    dead latents hold a live latent with weight exactly 0, so there is no host sync and no
    recompile when that number changes. Which of tied pre-activations is chosen is up to
    ``torch.topk``. ê is in the promoted dtype of the inputs, each row summed in float32 and
    rounded once for half inputs; a ``decoder_weight`` of a lower dtype than
    ``pre_activations`` is converted (a copy).

    Shapes:
        - ``pre_activations``: ``(batch, latent)``, before the TopK (and before any ReLU).
        - ``dead``: ``(latent,)`` bool, such as :meth:`TokensSinceFired.dead`.
        - ``decoder_weight``: ``(latent, model)``, one decoder row per latent.
        - result: ``(batch, model)``.

    Raises:
        TypeError: an input is not a floating-point tensor, or ``dead`` is not bool.
        ValueError: the shapes do not match, the inputs are on different devices, or
            ``k_aux`` is not an int from 1 to the number of latents.

    Example:
        >>> import torch
        >>> from sae_losses import auxk_reconstruction
        >>> pre = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
        >>> dead = torch.tensor([False, True, True, True])  # latent 0 is alive
        >>> decoder_weight = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> auxk_reconstruction(pre, dead, decoder_weight, k_aux=2)  # 2 * W_2 + 1 * W_1
        tensor([[1., 2.]])
        >>> auxk_reconstruction(pre, torch.zeros(4, dtype=torch.bool), decoder_weight, k_aux=2)
        tensor([[0., 0.]])
    """
    pre, dead, weight, k_aux = _check_inputs(pre_activations, dead, decoder_weight, k_aux)
    return sparse_decode(pre, dead, weight, k_aux, None)


def auxk_loss(
    pre_activations: Float[Tensor, "batch latent"],
    dead: Bool[Tensor, " latent"],
    decoder_weight: Float[Tensor, "latent model"],
    residual: Float[Tensor, "batch model"],
    *,
    k_aux: int,
    mask: Bool[Tensor, " batch"] | None = None,
) -> Float[Tensor, ""]:
    r"""The AuxK loss: the FVU of :func:`auxk_reconstruction` against the detached residual.

    .. math::

        \mathcal{L}_{\text{aux}} = \frac{\sum_b \lVert \hat{e}_b - e_b \rVert^2}
                                        {\sum_b \lVert e_b - \bar{e} \rVert^2},
        \qquad \bar{e} = \frac{1}{B} \sum_b e_b

    over the rows ``mask`` keeps, with :math:`e` = ``residual`` (``source - decoded`` of the
    main reconstruction), detached inside: AuxK trains only the dead latents. This is OpenAI's
    ``normalized_mse`` and dictionary_learning's normaliser; it equals
    :func:`fraction_of_variance_unexplained` of ê and the detached residual. It is exactly 0,
    with a gradient of exactly 0, when no latent is dead, with no host sync (SAELens and
    sparsify read the number of dead latents back to skip it). Otherwise it is NaN when fewer
    than 2 rows are kept. Masked rows are inert, even holding NaN. For the peers' scales and
    normalisers, see the recipes in ``docs/topk_terms.md``.

    Shapes:
        - ``pre_activations``, ``dead``, ``decoder_weight``: as :func:`auxk_reconstruction`.
        - ``residual``: ``(batch, model)``.
        - ``mask``: ``(batch,)`` bool.
        - result: 0-d, in the accumulation dtype (float32 for half inputs).

    Raises:
        TypeError: the errors of :func:`auxk_reconstruction`, ``residual`` is not a
            floating-point tensor, or ``mask`` is not bool.
        ValueError: the errors of :func:`auxk_reconstruction`, ``residual`` is not
            ``(batch, model)``, or ``mask`` is not ``(batch,)`` on the inputs' device.

    Example:
        >>> import torch
        >>> from sae_losses import auxk_loss
        >>> pre = torch.tensor([[3.0, 2.0], [3.0, 0.5]])
        >>> dead = torch.tensor([False, True])
        >>> decoder_weight = torch.tensor([[5.0, 5.0], [1.0, 0.0]])
        >>> residual = torch.tensor([[2.0, 1.0], [0.0, 0.0]])  # variance 2 + 0.5 = 2.5
        >>> auxk_loss(pre, dead, decoder_weight, residual, k_aux=1)  # ê = (2, 0), (0.5, 0)
        tensor(0.5000)
        >>> auxk_loss(pre, torch.zeros(2, dtype=torch.bool), decoder_weight, residual, k_aux=1)
        tensor(0.)
    """
    pre, dead, weight, k_aux = _check_inputs(pre_activations, dead, decoder_weight, k_aux)
    residual = check_floating("residual", residual)
    if residual.shape != (pre.shape[0], weight.shape[1]):
        raise ValueError(
            f"`residual` must have shape (batch, model) = ({pre.shape[0]}, {weight.shape[1]}), "
            f"got shape {shape_str(residual)}."
        )
    if residual.device != pre.device:
        raise ValueError(
            f"`residual` is on {residual.device} but `pre_activations` is on {pre.device}."
        )
    keep = check_mask(mask, pre, weights_allowed=False)
    reconstruction = sparse_decode(pre, dead, weight, k_aux, keep)
    error, variance, count = fvu_sums(reconstruction, residual.detach(), keep)
    # Where nothing is dead, the FVU branch gets a gradient of exactly 0 and a denominator of 1,
    # so no 0 / 0 reaches the gradient either.
    any_dead = dead.any()
    fvu = ratio_of_sums(error, torch.where(any_dead, variance, 1), count)
    return torch.where(any_dead, fvu, 0)
