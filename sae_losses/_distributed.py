"""all_reduce: combine every accumulator of a pytree across ranks, checked, in one collective.

Each rank packs its tree into one float64 buffer: a fingerprint of the tree (its containers,
key paths, accumulator types and shapes, and the buffer's length) and then every accumulator's
state, its dict leaves in sorted key order so insertion order does not matter, and its int64
counts as their bits, so they stay exact above 2**53. One ``all_gather`` gives every rank every
rank's buffer. Each rank then checks that all fingerprints equal its own, and merges the states
in rank order with the accumulators' own ``merge``: sums for :class:`StreamingMean`, Chan's
exact update for :class:`StreamingFVU`. Every rank computes the same result, bit for bit. A rank
whose own tree fails its checks still sends a buffer, fingerprint -1 (no valid tree's), then
raises: had it left the collective, the others' call would pair with its next one.

Why a gather and not a sum: a sum of the ranks' ``(count, mean, M2)`` cannot be combined
exactly without a reference point every rank agrees on (see ``benchmarks/README.md``), and
metric buffers are kilobytes, so gathering ``world_size`` of them costs what a sum costs.
"""

from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, cast, overload

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from sae_losses._accumulator import Accumulator
from sae_losses._tree_checks import (
    INVALID_FINGERPRINT,
    describe_tree,
    is_accumulator,
    local_error,
    mismatch_message,
    tree_fingerprint,
)

__all__ = ["PendingAllReduce", "all_reduce"]

T = TypeVar("T")
_HEADER = 2  # fingerprint, buffer length


class PendingAllReduce(Generic[T]):
    """The handle ``all_reduce(..., async_op=True)`` returns; ``wait()`` gives the reduced tree."""

    def __init__(self, work: Any, finish: Callable[[], T]) -> None:
        self._work = work
        self._finish = finish

    def wait(self) -> T:
        """Block until the collective is done; check and return the reduced tree.

        Raises:
            ValueError: the ranks passed different trees.
        """
        if self._work is not None:
            self._work.wait()
            self._work = None
            result = self._finish()
            self._finish = lambda: result
        return self._finish()


@overload
def all_reduce(
    tree: T, *, group: dist.ProcessGroup | None = None, async_op: Literal[False] = False
) -> T: ...


@overload
def all_reduce(
    tree: T, *, group: dist.ProcessGroup | None = None, async_op: Literal[True]
) -> PendingAllReduce[T]: ...


def all_reduce(
    tree: T, *, group: dist.ProcessGroup | None = None, async_op: bool = False
) -> T | PendingAllReduce[T]:
    """Combine every accumulator in ``tree`` over all ranks of ``group``, in one collective.

    ``tree`` is a :class:`StreamingMean`, a :class:`StreamingFVU`, or any pytree (dict, list,
    tuple, ...) whose leaves are all accumulators; the result has the same structure, and holds
    what one process would compute from every rank's rows. Ranks may have seen different
    numbers of rows, or none.

    Every rank of ``group`` must call it the same number of times, with trees of the same
    structure (containers included: a list is not a tuple) and shapes. A tree fingerprint
    travels with the data, so a rank whose tree differs gets a ``ValueError`` rather than a
    wrong number; dict key order does not matter. A rank whose own tree fails the checks below
    still takes part, so every rank raises and the ranks stay in step. (Buffers of different
    lengths cannot be gathered: gloo aborts the process that receives more than it expects.) A
    rank that skips a call leaves the others waiting until the process group's timeout: that is
    the hang users report in torchmetrics. Checking the fingerprints reads two numbers per rank
    back to the host: eager ``all_reduce`` is a sync point (as reading a metric is anyway).

    When ``torch.distributed`` is unavailable or not initialised, ``tree`` is returned unchanged.
    Inside ``torch.compile(fullgraph=True)`` it uses functional collectives, and a mismatch, or
    a tree that fails this rank's checks, raises a ``RuntimeError`` with the same message, from
    ``torch._assert_async``: a compiled graph cannot raise a Python error from a value it
    computed.

    Args:
        tree: the accumulators to combine.
        group: the process group; the default group when None.
        async_op: return a handle whose ``wait()`` gives the reduced tree, so the caller can
            overlap the collective with other work. Under ``torch.compile`` the handle's
            ``wait()`` returns at once.

    Raises:
        TypeError: a leaf of ``tree`` is not an accumulator.
        ValueError: this rank is not a member of ``group``, the accumulators are on different
            devices, or the ranks passed different trees.

    Example (one process, so nothing to combine):
        >>> import torch
        >>> from sae_losses import StreamingMean, all_reduce
        >>> metrics = {"l2": StreamingMean.empty().update(torch.tensor([1.0, 3.0]))}
        >>> all_reduce(metrics)["l2"].compute()
        tensor(2., dtype=torch.float64)
        >>> all_reduce(metrics, async_op=True).wait()["l2"].count
        tensor(2)
    """
    with_paths, spec = pytree.tree_flatten_with_path(tree, is_leaf=is_accumulator)
    if not (dist.is_available() and dist.is_initialized()):
        error = local_error([leaf for _, leaf in with_paths], [])
        if error is not None:
            raise error
        return PendingAllReduce(None, lambda: tree) if async_op else tree
    if dist.get_rank(group) < 0:
        raise ValueError(
            "all_reduce: this rank is not a member of `group`; only the group's ranks may call "
            "it with that group."
        )

    order = sorted(
        (i for i, (_, leaf) in enumerate(with_paths) if is_accumulator(leaf)),
        key=lambda i: pytree.keystr(with_paths[i][0]),
    )
    leaves: list[Accumulator] = [with_paths[i][1] for i in order]
    # Checked here, raised after the collective: this rank must still take part in it.
    error = local_error([leaf for _, leaf in with_paths], leaves)
    description = describe_tree([pytree.keystr(with_paths[i][0]) for i in order], leaves, spec)
    sizes = [sum(v.numel() for v in leaf._values()) for leaf in leaves]
    length = _HEADER + sum(sizes)
    if error is None:
        fingerprint = tree_fingerprint(description, length)
        device = leaves[0].count.device if leaves else _group_device(group)
        parts = [leaf._pack() for leaf in leaves]
    else:  # the others get a fingerprint no valid tree has, and raise
        fingerprint, device = INVALID_FINGERPRINT, _group_device(group)
        parts = [torch.zeros(length - _HEADER, dtype=torch.float64, device=device)]
    header = torch.tensor([fingerprint, length], dtype=torch.float64, device=device)
    buffer = torch.cat([header, *parts])
    world = dist.get_world_size(group)

    def finish(gathered: torch.Tensor) -> T:
        rows = gathered.reshape(world, length)
        reduced: list[Accumulator | None] = [None] * len(with_paths)
        offset = _HEADER
        for index, leaf, size in zip(order, leaves, sizes, strict=True):
            reduced[index] = leaf._merge_gathered(rows[:, offset : offset + size])
            offset += size
        result: T = pytree.tree_unflatten(reduced, spec)
        return result

    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        gathered = funcol.all_gather_tensor(buffer, 0, group or cast(Any, dist.group.WORLD))
        fingerprints = gathered.reshape(world, length)[:, 0]
        same = (fingerprints == fingerprint).all() & (fingerprints != INVALID_FINGERPRINT).all()
        message = mismatch_message(description, []) if error is None else str(error)
        torch._assert_async(same, message)
        result = tree if error is not None else finish(gathered)
        return PendingAllReduce(None, lambda: result) if async_op else result

    gathered = torch.empty(world * length, dtype=torch.float64, device=device)
    # all_gather_single is all_gather_into_tensor's new name (torch 2.13 deprecates the old one).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(gathered, buffer, group=group, async_op=async_op and error is None)
    if error is not None:
        raise error

    def check_and_finish() -> T:
        fingerprints = gathered.reshape(world, length)[:, 0].tolist()
        if any(f != fingerprint for f in fingerprints):
            raise ValueError(mismatch_message(description, fingerprints))
        return finish(gathered)

    if async_op:
        return PendingAllReduce(work, check_and_finish)
    return check_and_finish()


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where an empty tree's header goes: the device the backend communicates on."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
