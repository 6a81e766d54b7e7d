"""Sparsity terms: L1 (optionally decoder-norm weighted), Lp, L0 and the JumpReLU L0 penalty.

Each is a formula, a kernel where the formula is slow, and a docstring; the shared row-op
mechanism of :mod:`sae_losses._rowops` does the rest (blocks, autograd, mask, reduce).
"""

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._checks import (
    Reduce,
    accumulation_dtype,
    check_activations,
    check_feature_vector,
    check_positive_float,
    check_reduce,
)
from sae_losses._masks import check_mask
from sae_losses._rowops import EAGER, Grads, Kernels, Params, RowOp, reduce_rows, row_values

__all__ = ["L1", "jumprelu_l0", "l0_norm", "l1_absolute", "l1_loss", "lp_sparsity"]

Mask = Bool[Tensor, " batch"] | Float[Tensor, " batch"] | None


def _absolute(learned: Tensor, dtype: torch.dtype) -> Tensor:
    return learned.abs() if learned.dtype == dtype else learned.to(dtype).abs_()


def _l1_formula(learned: Tensor, weight: Tensor | None, *, dtype: torch.dtype) -> Tensor:
    absolute = learned.to(dtype).abs()
    return (absolute if weight is None else absolute * weight.to(dtype)).sum(-1)


def _l1_kernel(learned: Tensor, weight: Tensor | None, *, dtype: torch.dtype) -> Tensor:
    if weight is None:
        return learned.abs().sum(-1, dtype=dtype)
    return _absolute(learned, dtype).mul_(weight).sum(-1)


def _l1_grads(
    tensors: Params, grad_rows: Tensor, dtype: torch.dtype, needs: tuple[bool, ...]
) -> Grads:
    """d/dz = sign(z) w g (0 at z = 0); d/dw = sum over rows of g |z|."""
    learned, weight = tensors
    assert learned is not None
    grad_learned = grad_weight = None
    if needs[0]:
        grad = torch.sign(learned).to(dtype).mul_(grad_rows.unsqueeze(-1))
        grad_learned = (grad if weight is None else grad.mul_(weight)).to(learned.dtype)
    if weight is not None and needs[1]:
        features = learned.shape[-1]
        absolute = _absolute(learned, dtype).reshape(-1, features)
        grad_weight = (grad_rows.reshape(-1) @ absolute).to(weight.dtype)
    return grad_learned, grad_weight


L1 = RowOp("l1_absolute", _l1_formula, _l1_kernel, _l1_grads)


def _positive_power(x: Tensor, p: float) -> Tensor:
    """``x ** p`` for ``x >= 0``, with gradient 0 (not inf or NaN) at ``x = 0``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1).pow(p), 0)


def _lp_formula(
    learned: Tensor, weight: Tensor | None, *, dtype: torch.dtype, p: float, root: bool
) -> Tensor:
    scaled = learned.to(dtype) if weight is None else learned.to(dtype) * weight.to(dtype)
    total = _positive_power(scaled.abs(), p).sum(-1)
    return _positive_power(total, 1 / p) if root else total


LP = RowOp("lp_sparsity", _lp_formula)


def _l0_formula(learned: Tensor, *, dtype: torch.dtype, threshold: float) -> Tensor:
    return (learned.abs() > threshold).sum(-1, dtype=dtype)


def _l0_kernel(learned: Tensor, *, dtype: torch.dtype, threshold: float) -> Tensor:
    # count_nonzero counts a bool block about 1.4x faster than sum(dtype=...) on the CPU.
    return torch.count_nonzero(learned.abs() > threshold, dim=-1).to(dtype)


L0 = RowOp("l0_norm", _l0_formula, _l0_kernel, differentiable=False)


def _largest_value_at_most(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value <= ``threshold``, so ``|z| > it`` holds iff ``|z| > threshold``.

    A Python threshold compared with a half tensor is rounded to half first: 0.3 becomes
    0.30078125 in bfloat16, and a bfloat16 0.30078125 would no longer count as above 0.3.
    """
    rounded = torch.tensor(threshold, dtype=dtype)
    if rounded.item() > threshold:
        rounded = torch.nextafter(rounded, torch.tensor(-float("inf"), dtype=dtype))
    return float(rounded.item())


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
    return torch.count_nonzero(pre > threshold, dim=-1).to(dtype)


JUMPRELU_L0 = RowOp("jumprelu_l0", _jumprelu_formula, _jumprelu_kernel)


def _check_learned(
    learned: object, weight: object, reduce: object, mask: object
) -> tuple[Tensor, Tensor | None, Reduce, Tensor | None, torch.dtype]:
    """The checked arguments of the ops on ``learned``, and the accumulation dtype."""
    learned = check_activations("learned", learned)
    reduce = check_reduce(reduce)
    mask = check_mask(mask, learned)
    if weight is None:
        return learned, None, reduce, mask, accumulation_dtype(learned.dtype)
    weight = check_feature_vector("weight", weight, learned)
    return learned, weight, reduce, mask, accumulation_dtype(learned.dtype, weight.dtype)


def l1_loss(
    learned: object, weight: object, reduce: object, mask: object, kernels: Kernels = EAGER
) -> Tensor:
    """Check the arguments, then the per-row L1 through the shared mechanism (eager or fused).

    The arguments are typed ``object`` because this is where unchecked input is checked.
    """
    learned, weight, reduce, mask, dtype = _check_learned(learned, weight, reduce, mask)
    rows = row_values(L1, (learned,), (weight,), dtype=dtype, mask=mask, kernels=kernels)
    return reduce_rows(rows, reduce, mask)


def l1_absolute(
    learned: Float[Tensor, "batch *component feature"],
    *,
    weight: Float[Tensor, " feature"] | None = None,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""Sparsity penalty: the (weighted) sum over features of the absolute activations, per row.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} w_f \, |z_{b,c,f}|

    with :math:`w = 1` when ``weight`` is None, then ``mask`` and ``reduce`` over the batch axis
    exactly as in :func:`l2_reconstruction`. Divide by ``learned.shape[-1]`` for the mean over
    features. ``weight=W_dec.norm(dim=1)`` gives the decoder-norm-weighted L1 of SAELens's
    standard SAE and of Anthropic's April 2024 training recipe. Gradients flow to ``learned``
    and to ``weight``; the gradient at :math:`z = 0` is 0.

    Shapes:
        - ``learned``: ``(batch, *component, feature)``, the SAE's hidden activations.
        - ``weight``: ``(feature,)``, broadcast over the batch and component axes only.
        - ``mask``: ``(batch,)``, bool or floating row weights, as in :func:`l2_reconstruction`.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise.

    The dtype policy and the empty-batch results are those of :func:`l2_reconstruction`.

    Raises:
        TypeError: ``learned`` or ``weight`` is not a floating-point tensor, or ``mask`` is
            neither bool nor floating.
        ValueError: ``learned`` has fewer than 2 dimensions or no features, ``weight`` is not
            ``(feature,)``, ``mask`` is not ``(batch,)``, or ``reduce`` is not one of the modes.

    Example:
        >>> import torch
        >>> from sae_losses import l1_absolute
        >>> learned = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, -1.0, 0.0]]])  # L1 of 2 and 1
        >>> l1_absolute(learned, reduce="none")
        tensor([[2.],
                [1.]])
        >>> l1_absolute(learned)
        tensor([1.5000])
        >>> l1_absolute(learned, weight=torch.tensor([1.0, 2.0, 3.0]), reduce="none")
        tensor([[4.],
                [2.]])
    """
    return l1_loss(learned, weight, reduce, mask)


def lp_sparsity(
    learned: Float[Tensor, "batch *component feature"],
    *,
    p: float | int,
    weight: Float[Tensor, " feature"] | None = None,
    root: bool = False,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""Lp sparsity penalty, per row: :math:`\sum_f (w_f |z_f|)^p`, or its p-th root.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} |w_f z_{b,c,f}|^p
        \quad\text{or, with ``root=True``,}\quad
        \Big(\sum_{f=1}^{F} |w_f z_{b,c,f}|^p\Big)^{1/p}

    ``root=False`` is dictionary_learning's "Lp^p" (used for p-annealing); ``root=True`` is
    SAELens's ``(z * w).norm(p)``. ``p = 1`` without a root equals :func:`l1_absolute`. The
    gradient at :math:`z = 0` is 0 for every ``p``, including ``p < 1``, where the naive formula
    gives inf or NaN; with ``root=True`` a row of zeros also has gradient 0. Then ``mask`` and
    ``reduce`` as in :func:`l2_reconstruction`.

    Shapes: as :func:`l1_absolute`.

    Raises:
        ValueError: ``p`` is not a positive Python number, and the errors of :func:`l1_absolute`.

    Example:
        >>> import torch
        >>> from sae_losses import lp_sparsity
        >>> learned = torch.tensor([[3.0, -4.0]])
        >>> lp_sparsity(learned, p=2.0)  # 9 + 16
        tensor(25.)
        >>> lp_sparsity(learned, p=2.0, root=True)  # the Euclidean norm
        tensor(5.)
    """
    learned, weight, reduce, mask, dtype = _check_learned(learned, weight, reduce, mask)
    options = {"p": check_positive_float("p", p), "root": bool(root)}
    rows = row_values(LP, (learned,), (weight,), dtype=dtype, mask=mask, options=options)
    return reduce_rows(rows, reduce, mask)


def l0_norm(
    learned: Float[Tensor, "batch *component feature"],
    *,
    threshold: float | int = 0.0,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r"""The number of active features per row: :math:`\#\{f : |z_f| > \text{threshold}\}`.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} \mathbb{1}\big[|z_{b,c,f}| > \text{threshold}\big]

    then ``mask`` and ``reduce`` as in :func:`l2_reconstruction`. The count is returned in the
    accumulation dtype (float32 for float32 and half inputs, float64 for float64), so it can be
    averaged and streamed. It has no gradient: the result does not require grad. For a
    trainable L0, use :func:`jumprelu_l0`.

    Shapes: as :func:`l1_absolute`, without ``weight``.

    Raises:
        ValueError: ``threshold`` is negative or not a Python number, and the errors of
            :func:`l1_absolute`.

    Example:
        >>> import torch
        >>> from sae_losses import l0_norm
        >>> learned = torch.tensor([[0.0, 0.5, -2.0], [0.0, 0.0, 0.1]])
        >>> l0_norm(learned, reduce="none")
        tensor([2., 1.])
        >>> l0_norm(learned, threshold=1.0, reduce="sum")
        tensor(1.)
    """
    learned, _, reduce, mask, dtype = _check_learned(learned, None, reduce, mask)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
        raise ValueError(f"`threshold` must be a non-negative float, got {threshold!r}.")
    options = {"threshold": _largest_value_at_most(float(threshold), learned.dtype)}
    rows = row_values(L0, (learned,), dtype=dtype, mask=mask, options=options)
    return reduce_rows(rows, reduce, mask)


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
    check_activations("pre_activations", pre_activations)
    reduce = check_reduce(reduce)
    mask = check_mask(mask, pre_activations)
    check_feature_vector("threshold", threshold, pre_activations)
    options = {"bandwidth": check_positive_float("bandwidth", bandwidth)}
    dtype = accumulation_dtype(pre_activations.dtype, threshold.dtype)
    rows = row_values(
        JUMPRELU_L0, (pre_activations,), (threshold,), dtype=dtype, mask=mask, options=options
    )
    return reduce_rows(rows, reduce, mask)
