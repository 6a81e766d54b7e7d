"""The Matryoshka reconstruction loss: the L2 of every nested prefix of the latents.

A Matryoshka SAE asks its first ``w_1`` latents to reconstruct the input alone, its first ``w_2``
too, and so on. The prefixes are nested, so each adds one segment of latents to the last: the
forward decodes each latent once. An exact backward needs every prefix's residual; it keeps the
last one and the one below the widest later segment, and walks from the widest prefix down,
rebuilding the others by subtracting the segments it has passed (one more decode, less the
skipped segment), so nothing of size ``G x batch x d_model`` is kept.
"""

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from sae_losses._checks import (
    Reduce,
    accumulation_dtype,
    check_activations,
    check_floating,
    check_reduce,
    shape_str,
)
from sae_losses._masks import check_mask, keep_of
from sae_losses._penalties import Mask
from sae_losses._rowops import Tensors, batched_backward, reduce_rows, uses_plain_formula

__all__ = ["check_widths", "matryoshka_l2", "own_autograd_term"]


def own_autograd_term(
    formula: Callable[..., Tensor],
    inputs: Tensors,
    *,
    reduce: object,
    mask: object,
    options: Mapping[str, Any],
) -> Tensor:
    """``row_term`` for a formula that is its own autograd function, on every path.

    ``formula(*inputs, keep, dtype=..., **options)`` gets the rows the mask keeps (or None) and
    must leave the other rows inert in its own backward; its rows are then masked and reduced.
    The first input has the batch axis.
    """
    reduce = check_reduce(reduce)
    first = inputs[0]
    assert first is not None
    checked = check_mask(mask, first, weights_allowed=True)
    dtype = accumulation_dtype(*(t.dtype for t in inputs if t is not None))
    rows = formula(*inputs, keep_of(checked), dtype=dtype, **options)
    return reduce_rows(rows, reduce, checked)


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


def _widest_later_segment(widths: tuple[int, ...]) -> int | None:
    """The segment, after the first, whose re-decode the backward skips by keeping its base."""
    sizes = [b - a for a, b in itertools.pairwise(widths)]
    return None if not sizes else 1 + max(range(len(sizes)), key=sizes.__getitem__)


def _kept(t: Tensor, keep: Tensor | None) -> Tensor:
    return t if keep is None else torch.where(keep.unsqueeze(-1), t, 0)


def _prefix_l2(
    latents: Tensor,
    source: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    widths: tuple[int, ...],
    skip: int | None,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """Rows ``(batch, G)``, the last residual and the residual below segment ``skip``."""
    mm_dtype = torch.promote_types(latents.dtype, weight.dtype)
    target = source.to(dtype)
    residual = -target if bias is None else bias.to(dtype) - target
    rows: list[Tensor] = []
    below: list[Tensor] = []
    start = 0
    for i, width in enumerate(widths):
        if i == skip:
            below.append(residual)
        part_latents = latents[:, start:width].to(mm_dtype)
        part_weight = weight[start:width].to(mm_dtype)
        if mm_dtype == dtype:
            residual = torch.addmm(residual, part_latents, part_weight)
        else:  # half: the segment is decoded in half, as latents @ weight would be
            residual = residual + part_latents @ part_weight
        rows.append(residual.square().mean(-1))
        start = width
    return torch.stack(rows, -1), residual, *below


def _product(a: Tensor, b: Tensor, out: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``a @ b`` in ``dtype``: written into ``out`` when given (the eager backward)."""
    if out is None:
        return (a @ b).to(dtype)
    if out.dtype == a.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(a @ b)


class _PrefixL2(torch.autograd.Function):
    """The prefix rows; saves the latents, the weight, the mask and the two residuals.

    The residuals are outputs that the caller drops, so a double backward differentiates
    through them too: their gradients join every segment below them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs: Any) -> tuple[Tensor, ...]:
        latents, source, weight, bias, _keep, widths, skip, dtype, _plain = inputs
        return _prefix_l2(latents, source, weight, bias, widths, skip, dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        latents, source, weight, bias, keep, widths, skip, dtype, plain = inputs
        ctx.save_for_backward(latents, weight, keep, *output[1:])
        ctx.set_materialize_grads(False)  # the residuals' gradients: None unless differentiated
        ctx.widths, ctx.skip, ctx.dtype, ctx.plain = widths, skip, dtype, plain
        ctx.source_dtype, ctx.bias_dtype = source.dtype, None if bias is None else bias.dtype

    @staticmethod
    def backward(
        ctx: Any, grad_rows: Tensor | None, *grad_residuals: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        latents, weight, keep, last, *below = ctx.saved_tensors
        widths, skip, dtype = ctx.widths, ctx.skip, ctx.dtype
        need_latents, need_source, need_weight, need_bias = ctx.needs_input_grad[:4]
        mm_dtype = torch.promote_types(latents.dtype, weight.dtype)
        # Into preallocated gradients on the eager path only: a double backward (grad enabled),
        # torch.func and tensor subclasses get differentiable out-of-place ops and a cat.
        batched = grad_rows is not None and batched_backward(grad_rows)
        in_place = not (ctx.plain or torch.is_grad_enabled() or batched)
        grad_latents = torch.empty_like(latents) if in_place and need_latents else None
        grad_weight = torch.empty_like(weight) if in_place and need_weight else None
        latent_parts: list[Tensor] = []
        weight_parts: list[Tensor] = []
        residual = _kept(last, keep)
        # None in a double backward that reaches only the residual outputs.
        scale = (
            None if grad_rows is None else _kept(grad_rows.to(dtype) * (2 / weight.shape[1]), keep)
        )
        # The gradient of segment i's decoded part: the upstream gradients of every prefix that
        # holds it (and, in a double backward, of the residual outputs above it).
        last_grad, *below_grad = grad_residuals
        grad_part = torch.zeros_like(residual) if last_grad is None else _kept(last_grad, keep)
        for i in reversed(range(len(widths))):
            start, stop = (widths[i - 1] if i else 0), widths[i]
            if scale is not None:
                grad_part = grad_part + scale[:, i : i + 1] * residual
            if i + 1 == skip and below_grad[0] is not None:
                grad_part = grad_part + _kept(below_grad[0], keep)
            part_latents = _kept(latents[:, start:stop], keep).to(mm_dtype)
            part_weight = weight[start:stop].to(mm_dtype)
            grad_mm = grad_part.to(mm_dtype)
            if need_latents:
                out = None if grad_latents is None else grad_latents[:, start:stop]
                latent_parts.append(_product(grad_mm, part_weight.T, out, latents.dtype))
            if need_weight:
                out = None if grad_weight is None else grad_weight[start:stop]
                weight_parts.append(_product(part_latents.T, grad_mm, out, weight.dtype))
            if i == skip:
                residual = _kept(below[0], keep)
            elif i and mm_dtype == dtype:
                residual = torch.addmm(residual, part_latents, part_weight, alpha=-1)
            elif i:
                residual = residual - part_latents @ part_weight
        end = widths[-1]
        if need_latents and grad_latents is None:
            tail = torch.zeros_like(latents[:, end:])
            grad_latents = torch.cat([*reversed(latent_parts), tail], 1)
        elif grad_latents is not None:
            grad_latents[:, end:] = 0
        if need_weight and grad_weight is None:
            grad_weight = torch.cat([*reversed(weight_parts), torch.zeros_like(weight[end:])], 0)
        elif grad_weight is not None:
            grad_weight[end:] = 0
        grad_source = grad_part.neg().to(ctx.source_dtype) if need_source else None
        grad_bias = grad_part.sum(0).to(ctx.bias_dtype) if need_bias else None
        return grad_latents, grad_source, grad_weight, grad_bias, None, None, None, None, None


def _prefix_rows(*inputs: Tensor | None, dtype: torch.dtype, widths: tuple[int, ...]) -> Tensor:
    plain = uses_plain_formula(inputs)
    skip = _widest_later_segment(widths)
    outputs = _PrefixL2.apply(*inputs, widths, skip, dtype, plain)  # type: ignore[no-untyped-call]
    rows: Tensor = outputs[0]
    return rows


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
        _prefix_rows, (latents, source, weight, bias), reduce=reduce, mask=mask, options=options
    )
