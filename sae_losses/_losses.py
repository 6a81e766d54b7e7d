"""The two SAE loss ops: L2 reconstruction error and L1 sparsity penalty.

Both reduce over the feature axis first (one value per row), then over the batch axis as
``reduce`` says. In eager mode the rows are processed in blocks of about 2 MiB, so the
``batch x feature`` temporary (``decoded - source`` or ``|learned|``) stays in cache instead of
making a round trip to memory; a custom autograd function keeps only the inputs for backward.
Under ``torch.compile`` the plain formula is traced instead, so inductor can fuse it.
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from sae_losses._checks import (
    accumulation_dtype,
    check_activations,
    check_reduce,
    reduce_batch,
    shape_str,
)

# Elements per block of rows: 2 MiB of float32, which 2 threads split into one 1 MiB L2 cache each.
_BLOCK_ELEMENTS = 1 << 19


def _rows_per_block(x: Tensor) -> int:
    return max(1, _BLOCK_ELEMENTS // math.prod(x.shape[1:]))


def _needs_grad(*tensors: Tensor) -> bool:
    return any(t.requires_grad for t in tensors) and torch.is_grad_enabled()


def _difference(decoded: Tensor, source: Tensor, dtype: torch.dtype) -> Tensor:
    # If either input already has the accumulation dtype, torch's promotion computes in it.
    if dtype in (decoded.dtype, source.dtype):
        return torch.sub(decoded, source)
    # Two half-precision inputs are subtracted in float32, not rounded to half first.
    return decoded.to(dtype).sub_(source)


def _l2_rows(decoded: Tensor, source: Tensor, dtype: torch.dtype) -> Tensor:
    if decoded.numel() <= _BLOCK_ELEMENTS:  # one block: skip the bookkeeping
        return _difference(decoded, source, dtype).square_().mean(-1)
    rows_per_block = _rows_per_block(decoded)
    rows = torch.empty(decoded.shape[:-1], dtype=dtype, device=decoded.device)
    for d, s, out in zip(
        decoded.split(rows_per_block),
        source.split(rows_per_block),
        rows.split(rows_per_block),
        strict=True,
    ):
        # One read of the cached block (square_ then mean would make three passes over it).
        torch.linalg.vector_norm(_difference(d, s, dtype), dim=-1, out=out)
    return rows.square_().div_(decoded.shape[-1])


def _l1_rows(learned: Tensor, dtype: torch.dtype) -> Tensor:
    if learned.numel() <= _BLOCK_ELEMENTS:
        return (
            learned.abs().sum(-1) if learned.dtype == dtype else learned.abs().sum(-1, dtype=dtype)
        )
    rows_per_block = _rows_per_block(learned)
    rows = torch.empty(learned.shape[:-1], dtype=dtype, device=learned.device)
    for z, out in zip(learned.split(rows_per_block), rows.split(rows_per_block), strict=True):
        torch.sum(z.abs(), dim=-1, dtype=dtype, out=out)
    return rows


def l2_rows_formula(decoded: Tensor, source: Tensor, dtype: torch.dtype) -> Tensor:
    """The per-row L2 as one expression, for ``torch.compile`` to trace and fuse."""
    return (decoded.to(dtype) - source.to(dtype)).square().mean(-1)


def l1_rows_formula(learned: Tensor, dtype: torch.dtype) -> Tensor:
    """The per-row L1 as one expression, for ``torch.compile`` to trace and fuse."""
    return learned.to(dtype).abs().sum(-1)


def check_l2_inputs(decoded: object, source: object, reduce: object) -> torch.dtype:
    """Validate :func:`l2_reconstruction`'s arguments; return the accumulation dtype."""
    check_activations("decoded", decoded)
    check_activations("source", source)
    if decoded.shape != source.shape:
        raise ValueError(
            "`decoded` and `source` must have the same shape, "
            f"got {shape_str(decoded)} and {shape_str(source)}."
        )
    check_reduce(reduce)
    return accumulation_dtype(decoded.dtype, source.dtype)


def check_l1_inputs(learned: object, reduce: object) -> torch.dtype:
    """Validate :func:`l1_absolute`'s arguments; return the accumulation dtype."""
    check_activations("learned", learned)
    check_reduce(reduce)
    return accumulation_dtype(learned.dtype)


def l2_grads_formula(
    decoded: Tensor, source: Tensor, grad_rows: Tensor, need_decoded: bool, need_source: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the per-row L2: d/d(decoded) = 2 (decoded - source) / F, times the upstream."""
    scale = grad_rows.unsqueeze(-1) * (2.0 / decoded.shape[-1])
    grad = torch.sub(decoded, source).mul_(scale)
    grad_decoded = grad.to(decoded.dtype) if need_decoded else None
    grad_source = grad.neg().to(source.dtype) if need_source else None
    return grad_decoded, grad_source


def l1_grad_formula(learned: Tensor, grad_rows: Tensor) -> Tensor:
    """Gradient of the per-row L1: sign(learned) times the upstream; sign(0) = 0."""
    return torch.sign(learned).mul_(grad_rows.unsqueeze(-1))


class _L2Rows(torch.autograd.Function):
    """Per-row L2 that saves only its inputs; the kernels are the eager or the compiled ones."""

    @staticmethod
    def forward(ctx, decoded, source, dtype, rows_kernel, grads_kernel):
        ctx.save_for_backward(decoded, source)
        ctx.grads_kernel = grads_kernel
        return rows_kernel(decoded, source, dtype)

    @staticmethod
    def backward(ctx, grad_rows):
        decoded, source = ctx.saved_tensors
        need_decoded, need_source = ctx.needs_input_grad[:2]
        grads = ctx.grads_kernel(decoded, source, grad_rows, need_decoded, need_source)
        return *grads, None, None, None


class _L1Rows(torch.autograd.Function):
    """Per-row L1 that saves only its input; the kernels are the eager or the compiled ones."""

    @staticmethod
    def forward(ctx, learned, dtype, rows_kernel, grad_kernel):
        ctx.save_for_backward(learned)
        ctx.grad_kernel = grad_kernel
        return rows_kernel(learned, dtype)

    @staticmethod
    def backward(ctx, grad_rows):
        (learned,) = ctx.saved_tensors
        return ctx.grad_kernel(learned, grad_rows), None, None, None


def l2_loss(decoded, source, reduce, rows_kernel=_l2_rows, grads_kernel=l2_grads_formula):
    """Check, compute the per-row L2 with the given kernels, and reduce over the batch axis.

    Under ``torch.compile`` the plain formula is traced instead of the kernels. Outside it, the
    autograd function is used only when a gradient is needed.
    """
    dtype = check_l2_inputs(decoded, source, reduce)
    if torch.compiler.is_compiling():
        rows = l2_rows_formula(decoded, source, dtype)
    elif _needs_grad(decoded, source):
        rows = _L2Rows.apply(decoded, source, dtype, rows_kernel, grads_kernel)
    else:
        rows = rows_kernel(decoded, source, dtype)
    return reduce_batch(rows, reduce)


def l1_loss(learned, reduce, rows_kernel=_l1_rows, grad_kernel=l1_grad_formula):
    """Check, compute the per-row L1 with the given kernels, and reduce over the batch axis."""
    dtype = check_l1_inputs(learned, reduce)
    if torch.compiler.is_compiling():
        rows = l1_rows_formula(learned, dtype)
    elif _needs_grad(learned):
        rows = _L1Rows.apply(learned, dtype, rows_kernel, grad_kernel)
    else:
        rows = rows_kernel(learned, dtype)
    return reduce_batch(rows, reduce)


def l2_reconstruction(
    decoded: Float[Tensor, "batch *component feature"],
    source: Float[Tensor, "batch *component feature"],
    *,
    reduce: str = "mean",
) -> Float[Tensor, "..."]:
    r"""Reconstruction error: the mean over features of the squared error, per row.

    .. math::

        \ell_{b,c} = \frac{1}{F} \sum_{f=1}^{F} (\hat{x}_{b,c,f} - x_{b,c,f})^2

    and then ``reduce`` over the batch axis ``b`` only:
    ``"none"`` returns :math:`\ell` itself, ``"mean"`` returns :math:`\frac{1}{B}\sum_b \ell_{b,c}`
    and ``"sum"`` returns :math:`\sum_b \ell_{b,c}`. (``reduce`` is a string here; in
    ``torch.nn`` losses the string option is called ``reduction``.)

    This is the mean over features, as in the ``sparse_autoencoder`` library. SAELens and
    ``dictionary_learning`` sum over features instead; multiply by ``decoded.shape[-1]`` to get
    that convention.

    Shapes:
        - ``decoded``, ``source``: ``(batch, *component, feature)``, identical shapes.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise
          (a 0-d tensor for 2-D inputs).

    Half-precision inputs are accumulated in float32 and give a float32 result; float32 and
    float64 stay as they are. An empty batch gives an empty ``"none"`` result, zeros for
    ``"sum"`` and NaN for ``"mean"``, like ``torch.mean``.

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: the shapes differ (there is no broadcasting), an input has fewer than 2
            dimensions or no features, or ``reduce`` is not one of the three modes.

    Example:
        >>> import torch
        >>> from sae_losses import l2_reconstruction
        >>> source = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])  # (batch=2, component=1, feature=2)
        >>> decoded = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
        >>> l2_reconstruction(decoded, source, reduce="none")  # (4 + 4) / 2 and (4 + 0) / 2
        tensor([[4.],
                [2.]])
        >>> l2_reconstruction(decoded, source)
        tensor([3.])
    """
    return l2_loss(decoded, source, reduce)


def l1_absolute(
    learned: Float[Tensor, "batch *component feature"],
    *,
    reduce: str = "mean",
) -> Float[Tensor, "..."]:
    r"""Sparsity penalty: the sum over features of the absolute activations, per row.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} |z_{b,c,f}|

    and then ``reduce`` over the batch axis ``b`` only, exactly as in
    :func:`l2_reconstruction`. Divide by ``learned.shape[-1]`` for the mean over features.
    The gradient at :math:`z = 0` is 0.

    Shapes:
        - ``learned``: ``(batch, *component, feature)``, the SAE's hidden activations.
        - result: ``(batch, *component)`` for ``"none"``, ``(*component)`` otherwise.

    The dtype policy and the empty-batch results are those of :func:`l2_reconstruction`.

    Raises:
        TypeError: ``learned`` is not a floating-point tensor.
        ValueError: ``learned`` has fewer than 2 dimensions or no features, or ``reduce`` is not
            one of the three modes.

    Example:
        >>> import torch
        >>> from sae_losses import l1_absolute
        >>> learned = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, -1.0, 0.0]]])  # L1 of 2 and 1
        >>> l1_absolute(learned, reduce="none")
        tensor([[2.],
                [1.]])
        >>> l1_absolute(learned)
        tensor([1.5000])
        >>> l1_absolute(learned, reduce="sum")
        tensor([3.])
    """
    return l1_loss(learned, reduce)
