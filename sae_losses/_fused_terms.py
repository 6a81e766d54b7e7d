"""The fused twins of the count, sparsity and FVU terms: the same calls, generated kernels.

Each is the eager term's checks and one row term with the :data:`~sae_losses._fused.FUSED`
strategy (see ``sae_losses._fused`` for the compile cache and the per-kind fallback, and
``docs/compiled.md`` for when to use them).
"""

from jaxtyping import Bool, Float
from torch import Tensor

from sae_losses._checks import Reduce, check_pair, check_positive_float
from sae_losses._counts import l0_loss
from sae_losses._fused import FUSED
from sae_losses._fvu import fvu_sums, ratio_of_sums
from sae_losses._jumprelu import jumprelu_loss
from sae_losses._masks import Mask
from sae_losses._penalties import LP, check_learned
from sae_losses._row_term import row_term
from sae_losses._tanh import TANH

__all__ = [
    "fused_fraction_of_variance_unexplained",
    "fused_jumprelu_l0",
    "fused_l0_norm",
    "fused_lp_sparsity",
    "fused_tanh_sparsity",
]


def fused_l0_norm(
    learned: Float[Tensor, "batch *component feature"],
    *,
    threshold: float | int = 0.0,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r""":func:`l0_norm`, with the per-row counts computed by one generated kernel.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} \mathbb{1}\big[|z_{b,c,f}| > \text{threshold}\big]

    Same counts (NaN is not active), shapes, mask, dtype policy and errors as :func:`l0_norm`.

    Example:
        >>> import torch
        >>> from sae_losses import fused_l0_norm
        >>> fused_l0_norm(torch.tensor([[0.0, 0.5, -2.0], [0.0, 0.0, 0.1]]), reduce="none")
        tensor([2., 1.])
    """
    return l0_loss(learned, threshold, reduce, mask, FUSED)


def fused_jumprelu_l0(
    pre_activations: Float[Tensor, "batch *component feature"],
    threshold: Float[Tensor, " feature"],
    *,
    bandwidth: float | int,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r""":func:`jumprelu_l0`, with the counts and the threshold gradient as generated kernels.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} H(\pi_{b,c,f} - \theta_f), \qquad
        \frac{\partial \mathcal{L}}{\partial \theta_f} = -\frac{1}{\varepsilon}
        \sum_{b,c} g_{b,c} \, \mathbb{1}\big[|\pi_{b,c,f} - \theta_f| < \varepsilon / 2\big]

    Same values, straight-through gradient, shapes, mask, dtype policy and errors as
    :func:`jumprelu_l0`.

    Example:
        >>> import torch
        >>> from sae_losses import fused_jumprelu_l0
        >>> pre, threshold = torch.tensor([[0.95, 1.05, 2.0]]), torch.ones(3, requires_grad=True)
        >>> fused_jumprelu_l0(pre, threshold, bandwidth=0.2).backward()
        >>> threshold.grad
        tensor([-5., -5., -0.])
    """
    return jumprelu_loss(pre_activations, threshold, bandwidth, reduce, mask, FUSED)


def fused_lp_sparsity(
    learned: Float[Tensor, "batch *component feature"],
    *,
    p: float | int,
    weight: Float[Tensor, " feature"] | None = None,
    root: bool = False,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r""":func:`lp_sparsity`, with the values and the gradients as generated kernels.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} |w_f z_{b,c,f}|^p
        \quad\text{or, with ``root=True``,}\quad
        \Big(\sum_{f=1}^{F} |w_f z_{b,c,f}|^p\Big)^{1/p}

    Same values, gradients (0 at :math:`z = 0`), shapes, mask, dtype policy and errors as
    :func:`lp_sparsity`.

    Example:
        >>> import torch
        >>> from sae_losses import fused_lp_sparsity
        >>> fused_lp_sparsity(torch.tensor([[3.0, -4.0]]), p=2.0, root=True)
        tensor(5.)
    """
    # lp_sparsity's checks and options; _penalties could share them as an lp_loss helper.
    learned, weight = check_learned(learned, weight)
    options = {"p": check_positive_float("p", p), "root": bool(root)}
    return row_term(
        LP, (learned,), (weight,), reduce=reduce, mask=mask, options=options, strategy=FUSED
    )


def fused_tanh_sparsity(
    learned: Float[Tensor, "batch *component feature"],
    *,
    scale: float | int,
    weight: Float[Tensor, " feature"] | None = None,
    reduce: Reduce = "mean",
    mask: Mask = None,
) -> Float[Tensor, "..."]:
    r""":func:`tanh_sparsity`, with the values and the gradients as generated kernels.

    .. math::

        \ell_{b,c} = \sum_{f=1}^{F} \tanh\big(s\, w_f\, |z_{b,c,f}|\big)

    Same values, gradients (the right derivative :math:`s w_f` at :math:`z = 0`), shapes, mask,
    dtype policy and errors as :func:`tanh_sparsity`.

    Example:
        >>> import torch
        >>> from sae_losses import fused_tanh_sparsity
        >>> fused_tanh_sparsity(torch.tensor([[0.0, 0.5, -0.25]]), scale=4.0)
        tensor(1.7256)
    """
    learned, weight = check_learned(learned, weight)
    options = {"scale": check_positive_float("scale", scale)}
    return row_term(
        TANH, (learned,), (weight,), reduce=reduce, mask=mask, options=options, strategy=FUSED
    )


def fused_fraction_of_variance_unexplained(
    decoded: Float[Tensor, "batch *component feature"],
    source: Float[Tensor, "batch *component feature"],
    *,
    mask: Bool[Tensor, " batch"] | None = None,
) -> Float[Tensor, "*component"]:
    r""":func:`fraction_of_variance_unexplained`, its second pass as one generated kernel.

    .. math::

        \text{FVU}_c = \frac{\sum_b \sum_f (\hat{x}_{b,c,f} - x_{b,c,f})^2}
                            {\sum_b \sum_f (x_{b,c,f} - \bar{x}_{c,f})^2}

    The mean of the kept rows is the eager one (a matrix-vector product per block of rows: an
    inductor column sum is slower); the squared error and the squared deviations about the mean
    are one generated kernel that reads ``decoded`` and ``source`` once, and so is their
    gradient. Same values, precision at large offsets, shapes, mask and errors as
    :func:`fraction_of_variance_unexplained`.

    Example:
        >>> import torch
        >>> from sae_losses import fused_fraction_of_variance_unexplained
        >>> source = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
        >>> fused_fraction_of_variance_unexplained(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), source)
        tensor(0.2000)
    """
    decoded, source = check_pair(decoded, source)
    error, variance, count = fvu_sums(decoded, source, mask, strategy=FUSED)
    return ratio_of_sums(error, variance, count)
