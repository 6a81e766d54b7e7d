r"""The CE-loss and KL scores of an SAE spliced into its model, over a whole evaluation set.

Each is a ratio of means over every scored row of the set (not a mean of per-batch ratios), so
this is an accumulator of sums that :func:`all_reduce` combines in the same single collective as
every other metric.

An evaluation loop keeps one of each and replaces it::

    >>> import torch
    >>> from sae_losses import StreamingSpliceScores
    >>> clean = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # logits of 2 tokens, vocabulary of 2
    >>> spliced = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # the SAE spliced in
    >>> ablated = torch.zeros(2, 2)  # the activations zero-ablated
    >>> targets = torch.tensor([0, 1])
    >>> scores = StreamingSpliceScores.empty()
    >>> for rows in (slice(0, 1), slice(1, 2)):
    ...     scores = scores.update(clean[rows], spliced[rows], ablated[rows], targets[rows])
    >>> round(float(scores.compute()["ce_loss_score"]), 4)  # (0.6931 - 0.3133) / (0.6931 - 0.1269)
    0.6709

Our token rule: a row is one token's next-token prediction, and every term is a token-weighted
mean over the rows ``mask`` keeps; the same rows for all five terms unless ``kl_mask`` is given.
``docs/evaluation.md`` builds the masks that reproduce SAELens, SAEBench and dictionary_learning.
"""

import dataclasses
from typing import TypedDict

import torch
from jaxtyping import Bool, Float, Float64, Int64
from torch import Tensor

from sae_losses._accumulator import Accumulator, check_state_tensor, register_accumulator
from sae_losses._accumulator_fields import kept_rows, one_device
from sae_losses._checks import shape_str
from sae_losses._cross_entropy import cross_entropy
from sae_losses._kl import kl_divergence
from sae_losses._masks import check_mask
from sae_losses._splice_logits import check_splice_logits

__all__ = ["SpliceScores", "StreamingSpliceScores"]


class SpliceScores(TypedDict):
    """What :meth:`StreamingSpliceScores.compute` returns: five float64 means and two scores."""

    ce_clean: Tensor
    ce_spliced: Tensor
    ce_ablated: Tensor
    kl_spliced: Tensor
    kl_ablated: Tensor
    ce_loss_score: Tensor
    kl_div_score: Tensor


@register_accumulator
@dataclasses.dataclass(frozen=True, eq=False)
class StreamingSpliceScores(Accumulator):
    r"""The CE-loss and KL scores of an SAE spliced into a language model, over a whole set.

    .. math::

        \text{CE}_m = \frac{1}{|T|} \sum_{t \in T} \text{CE}(\ell^m_t, y_t), \qquad
        \text{KL}_m = \frac{1}{|T_{KL}|} \sum_{t \in T_{KL}}
            \text{KL}\big(\text{softmax}(\ell^{\text{clean}}_t) \,\|\,
                          \text{softmax}(\ell^m_t)\big)

        \texttt{ce\_loss\_score} = \frac{\text{CE}_{\text{ablated}} - \text{CE}_{\text{spliced}}}
                                        {\text{CE}_{\text{ablated}} - \text{CE}_{\text{clean}}},
        \qquad
        \texttt{kl\_div\_score} = \frac{\text{KL}_{\text{ablated}} - \text{KL}_{\text{spliced}}}
                                       {\text{KL}_{\text{ablated}}}

    for the clean run, the run with the SAE's reconstruction spliced in, and the run with the
    activations zero-ablated, where :math:`T` are the rows every ``mask`` kept and
    :math:`T_{KL}` those every ``kl_mask`` kept (:math:`T` without one). These are SAELens's and
    SAEBench's definitions: means over every scored token, then the scores from the means.
    dictionary_learning's ``frac_recovered`` (the same ratio per batch, averaged over batches)
    is a different number: ``docs/evaluation.md`` shows how to reproduce it.

    Fields:
        ce: ``(3,)`` float64, the summed CE of the clean, spliced and ablated runs.
        kl: ``(2,)`` float64, the summed KL of the spliced and ablated runs from the clean one.
        count: ``()`` int64, the rows the CE sums hold; kl_count: the rows the KL sums hold.

    Laws: as :class:`StreamingMean` (``empty`` is the identity of ``merge``, which is
    associative and commutative to rounding; no device sync; a pytree node).
    """

    ce: Float64[Tensor, "3"]
    kl: Float64[Tensor, "2"]
    count: Int64[Tensor, ""]
    kl_count: Int64[Tensor, ""]

    def _check_metadata(self) -> None:
        check_state_tensor("ce", self.ce, torch.float64, 1)
        check_state_tensor("kl", self.kl, torch.float64, 1)
        check_state_tensor("count", self.count, torch.int64, 0)
        check_state_tensor("kl_count", self.kl_count, torch.int64, 0)
        if self.ce.shape != (3,) or self.kl.shape != (2,):
            raise ValueError(
                f"`ce` and `kl` must have shapes (3,) and (2,), "
                f"got {shape_str(self.ce)} and {shape_str(self.kl)}."
            )
        one_device(self, (self.ce, self.kl, self.count, self.kl_count))

    def __post_init__(self) -> None:
        super().__post_init__()
        has_values = self.kl_count.device.type != "meta"
        if has_values and not torch.compiler.is_compiling() and bool(self.kl_count < 0):
            raise ValueError(f"`kl_count` must not be negative, got {int(self.kl_count)}.")

    @classmethod
    def empty(cls, *, device: torch.device | str | None = None) -> "StreamingSpliceScores":
        """An accumulator that has seen no tokens."""
        count = torch.zeros((), dtype=torch.int64, device=device)
        ce, kl = (torch.zeros(n, dtype=torch.float64, device=device) for n in (3, 2))
        return cls._trusted(ce, kl, count, count.clone())

    def update(
        self,
        clean_logits: Float[Tensor, "batch vocab"],
        spliced_logits: Float[Tensor, "batch vocab"],
        ablated_logits: Float[Tensor, "batch vocab"],
        targets: Int64[Tensor, " batch"],
        *,
        mask: Bool[Tensor, " batch"] | None = None,
        kl_mask: Bool[Tensor, " batch"] | None = None,
    ) -> "StreamingSpliceScores":
        """Add a batch of token rows (detached); return a new accumulator.

        Row ``t`` of each logits tensor predicts ``targets[t]``: for a ``(batch, seq)`` batch,
        pass ``logits.flatten(0, 1)`` (a view), ``tokens.roll(-1, 1).flatten()`` and a mask
        that drops each sequence's last position (``logits[:, :-1]`` would copy). The CE terms
        score the rows ``mask`` keeps, the KL terms those ``kl_mask`` keeps (``mask``'s rows
        when it is None). Dropped rows are inert: their logits may hold NaN and their targets
        anything (``-100`` padding included).

        Raises:
            TypeError: a logits tensor is not floating-point, ``targets`` is not int64, or a
                mask is not bool.
            ValueError: the logits are not ``(batch, vocab)`` of one shape, ``targets`` is
                not ``(batch,)``, or a mask is not ``(batch,)`` on the logits' device.
            RuntimeError: a kept row's target is outside ``[0, vocab)`` (torch's index error;
                a device-side assert on CUDA).
        """
        clean, spliced, ablated = check_splice_logits(clean_logits, spliced_logits, ablated_logits)
        ce_mask = check_mask(mask, clean, weights_allowed=False)
        kl_rows = ce_mask if kl_mask is None else check_mask(kl_mask, clean, weights_allowed=False)
        clean, spliced, ablated = clean.detach(), spliced.detach(), ablated.detach()
        ce = torch.stack(
            [
                cross_entropy(logits, targets, reduce="none", mask=ce_mask).sum(dtype=torch.float64)
                for logits in (clean, spliced, ablated)
            ]
        )
        kl = torch.stack(
            [
                kl_divergence(clean, logits, reduce="none", mask=kl_rows).sum(dtype=torch.float64)
                for logits in (spliced, ablated)
            ]
        )
        return self._trusted(
            self.ce + ce,
            self.kl + kl,
            self.count + kept_rows(ce_mask, clean),
            self.kl_count + kept_rows(kl_rows, clean),
        )

    def merge(self, other: "StreamingSpliceScores") -> "StreamingSpliceScores":
        """Combine two accumulators, e.g. from two ranks' shards; return a new one.

        Raises:
            TypeError: ``other`` is not a StreamingSpliceScores.
            ValueError: the two are on different devices.
        """
        self._check_mergeable(other)
        return self._trusted(
            self.ce + other.ce,
            self.kl + other.kl,
            self.count + other.count,
            self.kl_count + other.kl_count,
        )

    def compute(self) -> SpliceScores:
        """The five means and the two scores, float64 0-d tensors; NaN before any token."""
        ce_clean, ce_spliced, ce_ablated = (self.ce / self.count).unbind()
        kl_spliced, kl_ablated = (self.kl / self.kl_count).unbind()
        return SpliceScores(
            ce_clean=ce_clean,
            ce_spliced=ce_spliced,
            ce_ablated=ce_ablated,
            kl_spliced=kl_spliced,
            kl_ablated=kl_ablated,
            ce_loss_score=(ce_ablated - ce_spliced) / (ce_ablated - ce_clean),
            kl_div_score=(kl_ablated - kl_spliced) / kl_ablated,
        )
