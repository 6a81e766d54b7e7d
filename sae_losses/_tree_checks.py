"""What all_reduce checks about a tree: its rank's own checks, and the fingerprint ranks compare.

A module of its own because it is the one part of ``all_reduce`` about the tree, not the
collective: whether this rank's tree is valid, how to describe it, and the 48-bit fingerprint of
that description that travels with the data, so ranks whose trees differ raise, not mix.
"""

import collections
import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from sae_losses._accumulator import Accumulator

__all__ = [
    "INVALID_FINGERPRINT",
    "describe_tree",
    "is_accumulator",
    "local_error",
    "mismatch_message",
    "tree_fingerprint",
]

INVALID_FINGERPRINT = -1.0  # that of a tree that failed its rank's checks; valid ones are >= 0


def is_accumulator(x: object) -> bool:
    return isinstance(x, Accumulator)


def _structure(spec: pytree.TreeSpec) -> str:
    """The tree's containers, e.g. ``dict('a': list(*, *))``: dict keys sorted, types named."""
    if spec.is_leaf():
        return "*"
    children_of = getattr(spec, "children", None)  # older torch: `children_specs` only
    specs = children_of() if callable(children_of) else spec.children_specs
    children = [_structure(child) for child in specs]
    if isinstance(spec.type, type) and issubclass(spec.type, dict):
        keys = spec.context[-1] if spec.type is collections.defaultdict else spec.context
        children = [f"{k}: {c}" for k, c in sorted(zip(map(repr, keys), children, strict=True))]
    kind = spec.context if isinstance(spec.context, type) else spec.type  # a namedtuple's class
    return f"{getattr(kind, '__qualname__', repr(kind))}({', '.join(children)})"


def describe_tree(paths: list[str], leaves: list[Accumulator], spec: pytree.TreeSpec) -> str:
    described = "; ".join(
        f"{path}: {type(leaf).__name__}{[tuple(v.shape) for v in leaf._values()]}"
        for path, leaf in zip(paths, leaves, strict=True)
    )
    return f"{described or 'an empty tree'}, in {_structure(spec)}"


def _stable_hash(description: str, length: int) -> float:
    """48 bits of a stable hash: exact in float64, and equal across processes."""
    digest = hashlib.blake2b(f"{description}|{length}".encode(), digest_size=6).digest()
    return float(int.from_bytes(digest, "big"))


# hashlib cannot be traced, and the fingerprint is a constant of the tree anyway.
tree_fingerprint: Callable[[str, int], float] = torch._dynamo.assume_constant_result(  # type: ignore[no-untyped-call]
    _stable_hash
)


def mismatch_message(description: str, fingerprints: list[float]) -> str:
    invalid = INVALID_FINGERPRINT in fingerprints
    failed = " (-1: that rank's tree failed its own checks)" if invalid else ""
    return (
        "all_reduce: the ranks passed different trees (tree fingerprints by rank: "
        f"{[int(f) for f in fingerprints]}{failed}). Every rank must pass a tree with the same "
        "keys, the same accumulator types and the same shapes, in the same call. This rank "
        f"passed: {description}."
    )


def local_error(tree: list[Any], leaves: list[Accumulator]) -> Exception | None:
    """What this rank's tree fails, checked before the collective and raised after it."""
    for leaf in tree:
        if not is_accumulator(leaf):
            return TypeError(
                "all_reduce combines StreamingMean and StreamingFVU leaves only, "
                f"got a {type(leaf).__name__}."
            )
    devices = sorted({str(leaf.count.device) for leaf in leaves})
    if len(devices) > 1:
        return ValueError(f"all_reduce: the accumulators are on different devices, {devices}.")
    return None
