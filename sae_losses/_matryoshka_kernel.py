"""The autograd kernel of ``matryoshka_l2``: the prefix rows and their exact, compact backward.

A module of its own because the kernel (forward, backward, double backward) is a concept apart
from the public term's checks and documentation; ``sae_losses._matryoshka`` describes the walk
the backward takes, keeping only the last residual and the one below the widest later segment.
"""

import itertools
from typing import Any

import torch
from torch import Tensor

from sae_losses._rowops import batched_backward, uses_plain_formula

__all__ = ["prefix_rows"]


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


def prefix_rows(*inputs: Tensor | None, dtype: torch.dtype, widths: tuple[int, ...]) -> Tensor:
    plain = uses_plain_formula(inputs)
    skip = _widest_later_segment(widths)
    outputs = _PrefixL2.apply(*inputs, widths, skip, dtype, plain)  # type: ignore[no-untyped-call]
    rows: Tensor = outputs[0]
    return rows
