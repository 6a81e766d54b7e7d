"""The three logits the splice scores take: ``(batch, vocab)``, one row per token, one shape.

:class:`StreamingSpliceScores` scores token rows, so the clean, spliced and ablated logits must
already be flat (a ``(batch, seq, vocab)`` batch is passed as ``logits.flatten(0, 1)``), and the
three runs must score the same rows over the same vocabulary.
"""

from torch import Tensor

from sae_losses._checks import check_floating, check_same_shape, shape_str

__all__ = ["check_splice_logits"]


def _check_logits(name: str, logits: object) -> Tensor:
    logits = check_floating(name, logits)
    if logits.ndim != 2:
        raise ValueError(
            f"`{name}` must have shape (batch, vocab), one row per token (flatten (batch, seq) "
            f"first), got shape {shape_str(logits)}."
        )
    return logits


def check_splice_logits(
    clean_logits: object, spliced_logits: object, ablated_logits: object
) -> tuple[Tensor, Tensor, Tensor]:
    """The checked clean, spliced and ablated logits, in that order."""
    clean = _check_logits("clean_logits", clean_logits)
    spliced = _check_logits("spliced_logits", spliced_logits)
    ablated = _check_logits("ablated_logits", ablated_logits)
    check_same_shape("`clean_logits` and `spliced_logits`", clean, spliced)
    check_same_shape("`clean_logits` and `ablated_logits`", clean, ablated)
    return clean, spliced, ablated
