"""The fingerprint of a TokensSinceFired state, by which the ranks check that they agree.

Each rank sums its fingerprint and its square into the same collective as its step's counts; the
ranks agree exactly when the square of the sum is the world size times the sum of the squares
(Cauchy-Schwarz). :func:`mismatch_message` is the error when they do not.
"""

import torch
from torch import Tensor

__all__ = ["mismatch_message", "state_fingerprint"]

# The fingerprint is below 2**15, so every rank's square, summed over up to 2**16 ranks, and the
# square of their sum stay exact in int64.
_PRIMES = (1019, 1021, 32749)


def state_fingerprint(since_fired: Tensor, tokens: Tensor) -> Tensor:
    """A checksum of the state, in [0, 2**15): equal on every rank while the ranks agree."""
    small, medium, large = _PRIMES
    positions = torch.arange(since_fired.shape[0], device=since_fired.device) % small + 1
    total = ((since_fired % medium) * positions).sum() + tokens % medium
    return (total % large).reshape(1)


def mismatch_message(world: int) -> str:
    return (
        f"TokensSinceFired.update: the {world} ranks hold different states (their fingerprints "
        "differ). Every rank must start from the same state (the same checkpoint, or empty()) "
        "and call update once per step, on the same tracker, with its own rows."
    )
