"""The Matryoshka reconstruction loss: the L2 of every nested prefix of the latents.

A Matryoshka SAE asks its first ``w_1`` latents to reconstruct the input alone, its first ``w_2``
too, and so on. The prefixes are nested, so each adds one segment of latents to the last: the
forward decodes each latent once. An exact backward needs every prefix's residual; it keeps the
last one and the one below the widest later segment, and walks from the widest prefix down,
rebuilding the others by subtracting the segments it has passed (one more decode, less the
skipped segment), so nothing of size ``G x batch x d_model`` is kept.

The autograd kernel is in ``sae_losses._matryoshka_kernel``.
"""

import itertools
from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from sae_losses._checks import Reduce, check_activations, check_floating, shape_str
from sae_losses._masks import Mask
from sae_losses._matryoshka_kernel import prefix_rows
from sae_losses._own_autograd_term import own_autograd_term

__all__ = ["check_widths", "matryoshka_l2"]


def check_widths(widths: object, d_sae: int) -> tuple[int, ...]:
    """Strictly increasing Python ints in ``1..d_sae``, as a tuple."""
    if (
        not isinstance(widths, list | tuple)
        or not widths
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths)
    ):
        raise ValueError(f"`widths` must be a non-empty list of Python ints, got {widths!r}.")
    if any(b <= a for a, b in itertools.pairwise(widths)):
        raise ValueError(f"`widths` must be strictly increasing, got {list(widths)}.")
    if widths[0] < 1 or widths[-1] > d_sae:
        raise ValueError(
            f"`widths` must lie in 1..d_sae = 1..{d_sae} (latents.shape[1]), got {list(widths)}."
        )
    return tuple(widths)


def _check_2d(name: str, x: object, axes: str) -> Tensor:
    x = check_activations(name, x)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must have shape {axes}, got {shape_str(x)}.")
    return x


def _check_shape(name: str, x: Tensor, axes: str, expected: tuple[int, ...], like: Tensor) -> None:
    if x.shape != expected:
        raise ValueError(
            f"`{name}` must have shape {axes} = {shape_str(expected)}, got {shape_str(x)}."
        )
    if x.device != like.device:
        raise ValueError(f"`{name}` is on {x.device} but `latents` is on {like.device}.")


def _check_decoder(
    latents: object, decoder_weight: object, source: object, decoder_bias: object
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    latents = _check_2d("latents", latents, "(batch, d_sae)")
    source = _check_2d("source", source, "(batch, d_model)")
    (batch, d_sae), d_model = latents.shape, source.shape[1]
    _check_shape("source", source, "(batch, d_model)", (batch, d_model), latents)
    weight = check_floating("decoder_weight", decoder_weight)
    _check_shape("decoder_weight", weight, "(d_sae, d_model)", (d_sae, d_model), latents)
    if decoder_bias is None:
        return latents, weight, source, None
    bias = check_floating("decoder_bias", decoder_bias)
    _check_shape("decoder_bias", bias, "(d_model,)", (d_model,), latents)
    return latents, weight, source, bias


def matryoshka_l2(
    latents: Float[Tensor, "batch d_sae"],
    decoder_weight: Float[Tensor, "d_sae d_model"],
    source: Float[Tensor, "batch d_model"],
    *,
    widths: Sequence[int],
    decoder_bias: Float[Tensor, " d_model"] | None = None,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""The Matryoshka loss: the L2 reconstruction error of each nested prefix of the latents.

    .. math::

        \hat{x}^{(i)}_b = b_{\text{dec}} + \sum_{f < w_i} z_{b,f} W_f, \qquad
        \ell_{b,i} = \frac{1}{D} \sum_{d=1}^{D} \big(\hat{x}^{(i)}_{b,d} - x_{b,d}\big)^2

    for each width :math:`w_i` of ``widths`` (:math:`i = 1 \dots G`), with :math:`z` =
    ``latents``, :math:`W` = ``decoder_weight`` (rows are latents), :math:`b_{\text{dec}}` =
    ``decoder_bias`` (0 when None) and :math:`x` = ``source``. This is :func:`l2_reconstruction`
    of each prefix's reconstruction: when the last width is ``d_sae``, the last entry is the L2
    of the full reconstruction. Then ``mask`` and ``reduce`` over the batch axis as in
    :func:`l2_reconstruction`: :math:`w_b \ell_{b,i}` for ``"none"``, :math:`\sum_b w_b
    \ell_{b,i}` for ``"sum"``, that over :math:`\sum_b w_b` for ``"mean"``.

    Matryoshka SAEs (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning Multi-Level
    Features with Matryoshka Sparse Autoencoders"; Noa Nabeshima 2024) train on the sum of these
    losses (SAELens) or a weighted mean of them (dictionary_learning): the recipes in
    ``docs/matryoshka.md`` reproduce both exactly.

    Cost: each latent is decoded once. For backward it saves ``latents``, ``decoder_weight``
    and two ``(batch, d_model)`` residuals, whatever ``G``; the backward rebuilds the other
    residuals by decoding once more, less the widest segment after the first (see
    ``docs/matryoshka.md``). Forward-mode AD (``torch.func.jvp``) raises NotImplementedError.

    Gradients flow to ``latents``, ``decoder_weight``, ``source`` and ``decoder_bias``; latents
    and decoder rows beyond the last width get exactly 0.

    Shapes:
        - ``latents``: ``(batch, d_sae)``; ``decoder_weight``: ``(d_sae, d_model)``;
          ``source``: ``(batch, d_model)``; ``decoder_bias``: ``(d_model,)`` or None.
        - ``widths``: ``G`` strictly increasing Python ints with ``0 < w <= d_sae``.
        - ``mask``: ``(batch,)``, bool or floating row weights, as in :func:`l2_reconstruction`;
          masked rows may hold NaN or Inf.
        - result: ``(batch, G)`` for ``"none"``, ``(G,)`` otherwise.

    The decode runs in the promoted dtype of ``latents`` and ``decoder_weight``, as
    ``latents @ decoder_weight`` would (with half inputs each segment's part is rounded to half
    once); the residual, the squares and the mean are accumulated in float32 for half inputs,
    and the result is float32. The empty-batch results are those of :func:`l2_reconstruction`.

    Raises:
        TypeError: an input is not a floating-point tensor, or ``mask`` is neither bool nor
            floating.
        ValueError: ``widths`` is not a non-empty, strictly increasing list or tuple of Python
            ints in ``1..d_sae``; ``latents`` or ``source`` is not 2-D, their batch sizes
            differ or ``source`` has no features; ``decoder_weight`` is not ``(d_sae, d_model)``
            or ``decoder_bias`` not ``(d_model,)``; an input is on another device; ``reduce``
            or ``mask`` is invalid.

    Example:
        >>> import torch
        >>> from sae_losses import matryoshka_l2
        >>> latents = torch.tensor([[1.0, 2.0]])
        >>> decoder_weight = torch.eye(2)
        >>> source = torch.tensor([[1.0, 3.0]])
        >>> # width 1 decodes (1, 0): error (0, -3), mean 4.5; width 2 decodes (1, 2): 0.5
        >>> matryoshka_l2(latents, decoder_weight, source, widths=[1, 2], reduce="none")
        tensor([[4.5000, 0.5000]])
        >>> bias = torch.tensor([0.0, 1.0])  # (1, 1) and (1, 3): means 2 and 0
        >>> matryoshka_l2(latents, decoder_weight, source, widths=[1, 2], decoder_bias=bias)
        tensor([2., 0.])
    """
    latents, weight, source, bias = _check_decoder(latents, decoder_weight, source, decoder_bias)
    options = {"widths": check_widths(widths, latents.shape[1])}
    return own_autograd_term(
        prefix_rows, (latents, source, weight, bias), reduce=reduce, mask=mask, options=options
    )
