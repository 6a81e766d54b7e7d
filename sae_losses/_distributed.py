"""all_reduce: sum every StreamingMean in a pytree across ranks with one collective.

All accumulators are packed into one float64 buffer (each ``total`` flattened, then its
``count``), reduced once, and unpacked. Counts travel as float64, which is exact below 2**53 rows.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from sae_losses._streaming import StreamingMean


def _is_accumulator(x: object) -> bool:
    return isinstance(x, StreamingMean)


def _pack(accumulators: list[StreamingMean]) -> torch.Tensor:
    parts = []
    for mean in accumulators:
        parts += [mean.total.reshape(-1), mean.count.reshape(1).to(torch.float64)]
    return torch.cat(parts)


def _unpack(buffer: torch.Tensor, accumulators: list[StreamingMean]) -> list[StreamingMean]:
    reduced, offset = [], 0
    for mean in accumulators:
        size = mean.total.numel()
        total = buffer[offset : offset + size].reshape(mean.total.shape)
        count = buffer[offset + size].to(torch.int64)
        reduced.append(StreamingMean(total=total, count=count))
        offset += size + 1
    return reduced


class PendingAllReduce:
    """The handle ``all_reduce(..., async_op=True)`` returns; ``wait()`` gives the reduced tree."""

    def __init__(self, work: Any, finish: Callable[[], Any]) -> None:
        self._work = work
        self._finish = finish

    def wait(self) -> Any:
        """Block until the collective is done and return the reduced tree (same on every call)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
            result = self._finish()
            self._finish = lambda: result
        return self._finish()


def all_reduce(tree: Any, *, group: dist.ProcessGroup | None = None, async_op: bool = False) -> Any:
    """Sum every :class:`StreamingMean` in ``tree`` over all ranks of ``group``.

    ``tree`` is a StreamingMean or any pytree (dict, list, tuple, ...) whose leaves are all
    StreamingMeans; the result has the same structure. Whatever the number of accumulators, this
    issues exactly one collective. Ranks may have seen different numbers of rows, or none.

    Every rank of ``group`` must call ``all_reduce`` the same number of times, with trees of the
    same structure and shapes. A rank that skips a call (say, an evaluation loop that breaks early
    on one rank) leaves the others waiting forever: that is the hang users report in torchmetrics.

    When ``torch.distributed`` is unavailable or not initialised, ``tree`` is returned unchanged,
    so the same code runs on one process. Inside ``torch.compile`` it uses functional collectives
    and traces with ``fullgraph=True``.

    Args:
        tree: the accumulators to reduce.
        group: the process group; the default group when None.
        async_op: return a handle whose ``wait()`` gives the reduced tree, so the caller can
            overlap the collective with other work. Under ``torch.compile`` the collective is
            already scheduled by the compiler, and the handle's ``wait()`` returns at once.

    Raises:
        TypeError: a leaf of ``tree`` is not a StreamingMean.

    Example (one process, so nothing to sum):
        >>> import torch
        >>> from sae_losses import StreamingMean, all_reduce
        >>> metrics = {"l2": StreamingMean.empty().update(torch.tensor([1.0, 3.0]))}
        >>> all_reduce(metrics)["l2"].compute()
        tensor(2., dtype=torch.float64)
        >>> all_reduce(metrics, async_op=True).wait()["l2"].count
        tensor(2)
    """
    accumulators, spec = pytree.tree_flatten(tree, is_leaf=_is_accumulator)
    for leaf in accumulators:
        if not _is_accumulator(leaf):
            raise TypeError(
                f"all_reduce reduces StreamingMean leaves only, got a {type(leaf).__name__}."
            )

    def finish(buffer: torch.Tensor) -> Any:
        return pytree.tree_unflatten(_unpack(buffer, accumulators), spec)

    if not accumulators or not (dist.is_available() and dist.is_initialized()):
        return PendingAllReduce(None, lambda: tree) if async_op else tree

    buffer = _pack(accumulators)
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        reduced = funcol.all_reduce(buffer, "sum", group or dist.group.WORLD)
        result = finish(reduced)
        return PendingAllReduce(None, lambda: result) if async_op else result

    work = dist.all_reduce(buffer, group=group, async_op=async_op)
    if async_op:
        return PendingAllReduce(work, lambda: finish(buffer))
    return finish(buffer)
