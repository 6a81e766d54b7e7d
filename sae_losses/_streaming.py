"""StreamingMean: an immutable accumulator of row-weighted means.

A loop that reports a metric over many batches keeps one accumulator and replaces it::

    >>> import torch
    >>> from sae_losses import StreamingMean, l2_reconstruction
    >>> metric = StreamingMean.empty()
    >>> for batch in ([1.0], [0.0, 0.0, 0.0]):  # 1 row of 1.0, then 3 rows of 0.0
    ...     metric = metric.update(torch.tensor(batch))
    >>> metric.compute()  # row-weighted: 1 / 4, not the mean of the batch means (1 + 0) / 2
    tensor(0.2500, dtype=torch.float64)

Its contracts:

- ``update`` and ``merge`` return new accumulators and never change their inputs.
- ``empty()`` is the identity of ``merge``, and ``merge`` is associative and commutative.
- Splitting the rows into updates in any way gives the same ``total`` and ``count``.
- The state is float64 (``total``) and int64 (``count``), so long float32 streams do not drift.
- Nothing syncs with the device, and it is a pytree node, so it can be the input and output of a
  ``torch.compile(fullgraph=True)`` step.
"""

import dataclasses

import torch
import torch.utils._pytree as pytree
from jaxtyping import Float64, Int64, Real
from torch import Tensor

from sae_losses._checks import shape_str


def _check_state(total: object, count: object) -> None:
    if not isinstance(total, Tensor) or total.dtype != torch.float64:
        raise TypeError(f"`total` must be a float64 tensor, got {_describe(total)}.")
    if not isinstance(count, Tensor) or count.dtype != torch.int64 or count.ndim != 0:
        raise TypeError(f"`count` must be a 0-d int64 tensor, got {_describe(count)}.")
    if total.device != count.device:
        raise ValueError(
            f"`total` and `count` must be on one device, got {total.device} and {count.device}."
        )


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {shape_str(x)}"
    return type(x).__name__


@dataclasses.dataclass(frozen=True)
class StreamingMean:
    r"""The running mean of per-row values, as a sum and a row count.

    .. math::

        \text{compute}() = \frac{\text{total}}{\text{count}}
        = \frac{\sum_{\text{updates}} \sum_b v_{b,c}}{\sum_{\text{updates}} B}

    Fields:
        total: ``(*component)`` float64, the sum of every row seen.
        count: ``()`` int64, the number of rows seen.

    Example:
        >>> import torch
        >>> from sae_losses import StreamingMean, l1_absolute
        >>> learned = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
        >>> metric = StreamingMean.empty((1,)).update(l1_absolute(learned, reduce="none"))
        >>> metric.compute()
        tensor([1.5000], dtype=torch.float64)
        >>> metric.merge(StreamingMean.empty((1,))) == metric  # empty() is the identity
        True
    """

    total: Float64[Tensor, "*component"]
    count: Int64[Tensor, ""]

    def __post_init__(self) -> None:
        _check_state(self.total, self.count)

    def __eq__(self, other: object) -> bool:
        """Equal state, compared on the host: for tests and checks, not for hot loops."""
        if not isinstance(other, StreamingMean):
            return NotImplemented
        return bool(torch.equal(self.total, other.total) and torch.equal(self.count, other.count))

    __hash__ = None  # equality is by value and the fields are mutable tensors

    @classmethod
    def empty(
        cls, shape: tuple[int, ...] = (), *, device: torch.device | str | None = None
    ) -> "StreamingMean":
        """An accumulator that has seen no rows: ``total`` zeros of ``shape``, ``count`` 0."""
        return cls(
            total=torch.zeros(shape, dtype=torch.float64, device=device),
            count=torch.zeros((), dtype=torch.int64, device=device),
        )

    def update(self, values: Real[Tensor, " batch *component"]) -> "StreamingMean":
        """Add a batch of per-row values shaped ``(batch, *component)``; return a new accumulator.

        The sum over the batch axis is taken in float64, and ``values`` is detached, so the
        accumulator never holds an autograd graph.

        Raises:
            TypeError: ``values`` is not a real (non-complex) tensor.
            ValueError: ``values`` has no batch axis, or its trailing shape is not ``total``'s.
        """
        if not isinstance(values, Tensor) or values.is_complex():
            raise TypeError(f"`values` must be a real tensor, got {_describe(values)}.")
        if values.ndim == 0 or values.shape[1:] != self.total.shape:
            raise ValueError(
                f"`values` must have shape (batch, *{tuple(self.total.shape)}), "
                f"got {shape_str(values)}."
            )
        values = values.detach()
        return StreamingMean(
            total=self.total + values.sum(0, dtype=torch.float64),
            count=self.count + values.shape[0],
        )

    def merge(self, other: "StreamingMean") -> "StreamingMean":
        """Combine two accumulators, e.g. from two shards of the data; return a new one.

        Raises:
            TypeError: ``other`` is not a StreamingMean.
            ValueError: the two ``total`` shapes differ.
        """
        if not isinstance(other, StreamingMean):
            raise TypeError(f"can only merge a StreamingMean, got {type(other).__name__}.")
        if other.total.shape != self.total.shape:
            raise ValueError(
                "cannot merge accumulators of different shapes, "
                f"got {shape_str(self.total)} and {shape_str(other.total)}."
            )
        return StreamingMean(total=self.total + other.total, count=self.count + other.count)

    def compute(self) -> Float64[Tensor, "*component"]:
        """``total / count`` in float64; NaN when no rows were seen (no exception, no sync)."""
        return self.total / self.count

    def state_dict(self) -> dict[str, Tensor]:
        """The state as plain tensors, loadable with ``torch.load(weights_only=True)``."""
        return {"total": self.total, "count": self.count}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "StreamingMean":
        """Rebuild an accumulator from :meth:`state_dict`'s output.

        Raises:
            ValueError: the keys are not exactly ``total`` and ``count``.
            TypeError: a value has the wrong type or dtype.
        """
        if set(state) != {"total", "count"}:
            raise ValueError(
                f"a StreamingMean state has the keys 'count' and 'total', got {sorted(state)}."
            )
        return cls(total=state["total"], count=state["count"])


pytree.register_pytree_node(
    StreamingMean,
    lambda mean: ([mean.total, mean.count], None),
    lambda children, _: StreamingMean(*children),
    serialized_type_name="sae_losses.StreamingMean",
)
