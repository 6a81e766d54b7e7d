"""The L0 penalty of JumpReLU SAEs, with its straight-through (rectangle-kernel) threshold gradient.

A formula (through ``_HeavisideStep``, whose backward is the straight-through gradient), an eager
counting kernel, a hand-written blocked threshold gradient and a docstring;
:func:`sae_losses._row_term.row_term` does the rest (blocks, autograd, mask, reduce).
``jumprelu_loss`` takes the strategy, for the fused twin.
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from sae_losses import _rowops
from sae_losses._checks import (
    Reduce,
    accumulation_dtype,
    check_activations,
    check_feature_vector,
    check_positive_float,
)
from sae_losses._masks import Mask
from sae_losses._row_term import row_term
from sae_losses._rowops import EAGER, Gradients, RowOp, Strategy, Tensors

__all__ = ["JUMPRELU_L0", "jumprelu_l0", "jumprelu_loss"]


class _HeavisideStep(torch.autograd.Function):
    """``H(pre - threshold)`` with the rectangle-kernel straight-through gradient to threshold."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: Tensor, threshold: Tensor, dtype: torch.dtype, bandwidth: float) -> Tensor:
        return (pre > threshold).to(dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pre, threshold, dtype, bandwidth = inputs
        ctx.save_for_backward(pre, threshold)
        ctx.dtype, ctx.bandwidth = dtype, bandwidth

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None, None]:
        pre, threshold = ctx.saved_tensors
        near = (pre.to(ctx.dtype) - threshold.to(ctx.dtype)).abs() < ctx.bandwidth / 2
        grad_threshold = torch.where(near, grad, 0).sum_to_size(threshold.shape)
        return None, grad_threshold.mul(-1 / ctx.bandwidth).to(threshold.dtype), None, None


def _jumprelu_formula(
    pre: Tensor, threshold: Tensor, *, dtype: torch.dtype, bandwidth: float
) -> Tensor:
    steps: Tensor = _HeavisideStep.apply(  # type: ignore[no-untyped-call]
        pre, threshold, dtype, bandwidth
    )
    return steps.sum(-1)


def _jumprelu_kernel(
    pre: Tensor, threshold: Tensor, *, dtype: torch.dtype, bandwidth: float
) -> Tensor:
    # One comparison straight into a float block (0/1), then a float sum; see _counts._l0_kernel.
    return torch.gt(pre, threshold, out=torch.empty_like(pre)).sum(-1, dtype=dtype)


def _jumprelu_gradients(
    inputs: Tensors,
    grad_rows: Tensor,
    dtype: torch.dtype,
    needs: tuple[bool, ...],
    *,
    bandwidth: float,
) -> Gradients:
    """The threshold's straight-through gradient, as in ``_HeavisideStep.backward``."""
    pre, threshold = inputs
    assert pre is not None
    assert threshold is not None
    if not needs[1]:
        return None, None
    # The window has derivative 0: detached, so a double backward differentiates the upstream.
    features, upstream = pre.shape[-1], grad_rows.to(dtype)
    pre, threshold = pre.detach(), threshold.detach()
    if torch.compiler.is_compiling():  # the compiled backward: one fused masked column sum
        near = (pre.to(dtype) - threshold.to(dtype)).abs() < bandwidth / 2
        total = torch.where(near, upstream.unsqueeze(-1), 0).reshape(-1, features).sum(0)
    else:  # in row blocks: a 0/1 window in place, then a matrix-vector product per block
        total = torch.zeros(features, dtype=dtype, device=pre.device)
        for block in _rowops.row_blocks(pre):
            window = (pre[block].to(dtype) - threshold.to(dtype)).abs_().lt_(bandwidth / 2)
            total.addmv_(window.reshape(-1, features).T, upstream[block].reshape(-1))
    return None, total.mul(-1 / bandwidth).to(threshold.dtype)


JUMPRELU_L0 = RowOp(_jumprelu_formula, _jumprelu_kernel, _jumprelu_gradients)


def jumprelu_loss(
    pre_activations: object,
    threshold: object,
    bandwidth: object,
    reduce: object,
    mask: object,
    strategy: Strategy = EAGER,
) -> Tensor:
    """The checked JumpReLU L0 through the shared mechanism, eager or fused (``strategy``)."""
    pre = check_activations("pre_activations", pre_activations)
    threshold = check_feature_vector("threshold", threshold, pre)
    bandwidth = check_positive_float("bandwidth", bandwidth)
    dtype = accumulation_dtype(pre.dtype, threshold.dtype)
    if 1 / bandwidth > torch.finfo(dtype).max:
        raise ValueError(
            f"`bandwidth` must be at least 1 / {torch.finfo(dtype).max:g} (its inverse, the "
            f"threshold gradient's scale, must be finite in {dtype}), got {bandwidth!r}."
        )
    options = {"bandwidth": bandwidth}
    return row_term(
        JUMPRELU_L0,
        (pre,),
        (threshold,),
        reduce=reduce,
        mask=mask,
        options=options,
        strategy=strategy,
    )


def jumprelu_l0(
    pre_activations: Float[Tensor, "batch *component feature"],
    threshold: Float[Tensor, " feature"],
    *,
    bandwidth: float | int,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""The L0 penalty of JumpReLU SAEs, with the straight-through threshold gradient.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} H(\pi_{b,c,f} - \theta_f), \qquad
        \frac{\partial \mathcal{L}}{\partial \theta_f} = -\frac{1}{\varepsilon}
        \sum_{b,c} g_{b,c} \, \mathbb{1}\big[|\pi_{b,c,f} - \theta_f| < \varepsilon / 2\big]

    with :math:`H(u) = 1` if :math:`u > 0` else 0, :math:`\pi` = ``pre_activations``,
    :math:`\theta` = ``threshold``, :math:`\varepsilon` = ``bandwidth`` and :math:`g` the upstream
    gradient of each row (Rajamanoharan et al. 2024, "Jumping Ahead", with a rectangle kernel).
    The forward is the exact count; no gradient flows to ``pre_activations``, as in the paper.
    Any ``(batch, *component, feature)`` shape works. Then ``mask`` and ``reduce`` as in
    :func:`l2_reconstruction`.

    Shapes:
        - ``pre_activations``: ``(batch, *component, feature)``; ``threshold``: ``(feature,)``.
        - ``mask`` and the result: as in :func:`l1_absolute`.

    Raises:
        ValueError: ``bandwidth`` is not a positive Python number, ``threshold`` is not
            ``(feature,)``, and the errors of :func:`l1_absolute` for ``pre_activations``.
        TypeError: ``threshold`` is not a floating-point tensor.

    Example:
        >>> import torch
        >>> from sae_losses import jumprelu_l0
        >>> pre = torch.tensor([[0.95, 1.05, 2.0]])
        >>> threshold = torch.ones(3, requires_grad=True)
        >>> l0 = jumprelu_l0(pre, threshold, bandwidth=0.2)  # 1.05 and 2.0 are above 1
        >>> l0
        tensor(2., grad_fn=<MeanBackward1>)
        >>> l0.backward()
        >>> threshold.grad  # -1/0.2 where |pre - 1| < 0.1: the first two
        tensor([-5., -5., -0.])
    """
    return jumprelu_loss(pre_activations, threshold, bandwidth, reduce, mask)
