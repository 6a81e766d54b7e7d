"""What every immutable accumulator shares: construction checks, equality, checkpoints, pytrees.

An accumulator is a frozen dataclass of tensor fields (float64 statistics and an int64 ``count``)
with ``merge`` as its combining law. This base gives it:

- checks on every path that builds one: the dataclass constructor, :meth:`from_state_dict` and
  unpickling (so copies too) check dtypes, shapes and devices, and that ``count`` is not
  negative (a read of one number; skipped on the meta device, which has no values). ``update``
  and ``merge`` build their results with :meth:`_trusted`, which checks no values, so they
  never sync with the device. So does the pytree path that ``torch.compile`` and
  :func:`all_reduce` use: it checks metadata only;
- :meth:`_check_mergeable`, the checks every ``merge`` starts with: the same type, on the same
  device;
- equality by value (on the host; for tests and checks) and no hash, since the fields are
  mutable tensors;
- ``state_dict`` / ``from_state_dict`` for checkpoints that load with ``weights_only=True``;
- packing into one flat float64 buffer (int64 fields as their bits, so exact to 2**63), and
  rebuilding from the buffers every rank gathered, for :func:`all_reduce`.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from sae_losses._checks import describe

__all__ = ["Accumulator", "check_state_tensor", "register_accumulator"]

A = TypeVar("A", bound="Accumulator")


class Accumulator:
    """Base of the frozen-dataclass accumulators; subclasses define fields and ``merge``."""

    count: Tensor
    _field_names: ClassVar[tuple[str, ...]]

    def _check_metadata(self) -> None:
        raise NotImplementedError

    def merge(self: A, other: A) -> A:
        raise NotImplementedError

    def __post_init__(self) -> None:
        self._check_metadata()
        has_values = self.count.device.type != "meta"
        if has_values and not torch.compiler.is_compiling() and bool(self.count < 0):
            raise ValueError(f"`count` must not be negative, got {int(self.count)}.")

    def _check_mergeable(self, other: object) -> None:
        """The checks every ``merge`` starts with; metadata only, so no device sync.

        Raises:
            TypeError: ``other`` is not an accumulator of this type.
            ValueError: ``other`` is on another device (a merge would move or drop its rows).
        """
        if not isinstance(other, type(self)):
            raise TypeError(f"can only merge a {type(self).__name__}, got {type(other).__name__}.")
        if other.count.device != self.count.device:
            raise ValueError(
                "cannot merge accumulators on different devices, "
                f"got {self.count.device} and {other.count.device}."
            )

    @classmethod
    def _trusted(cls: type[A], *values: Tensor) -> A:
        """Build from values this library computed: metadata checks only, no device sync."""
        self = object.__new__(cls)
        for field, value in zip(_fields(cls), values, strict=True):
            object.__setattr__(self, field, value)
        self._check_metadata()
        return self

    def _values(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in _fields(type(self)))

    def __eq__(self, other: object) -> bool:
        """Equal state, compared on the host: for tests and checks, not for hot loops."""
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Accumulator)
        return all(
            a.shape == b.shape and bool(torch.equal(a, b))
            for a, b in zip(self._values(), other._values(), strict=True)
        )

    __hash__ = None  # type: ignore[assignment]  # equal by value, and the fields are mutable

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Tensor, ...]]:
        # Unpickling and copying go through the constructor, so they are checked too.
        return (type(self), self._values())

    def state_dict(self) -> dict[str, Tensor]:
        """The state as plain tensors, loadable with ``torch.load(weights_only=True)``."""
        return dict(zip(_fields(type(self)), self._values(), strict=True))

    @classmethod
    def from_state_dict(cls: type[A], state: dict[str, Tensor]) -> A:
        """Rebuild an accumulator from :meth:`state_dict`'s output, with every check.

        Raises:
            ValueError: the keys are not the fields, or ``count`` is negative.
            TypeError: a value has the wrong type or dtype.
        """
        names = _fields(cls)
        if set(state) != set(names):
            *rest, last = map(repr, sorted(names))
            raise ValueError(
                f"a {cls.__name__} state has the keys {', '.join(rest)} and {last}, "
                f"got {sorted(state)}."
            )
        return cls(**state)

    def _pack(self) -> Tensor:
        """Every field, flattened into one float64 buffer; int64 fields as their bits (exact)."""
        # A bit-cast, not a conversion: float64 holds integers exactly only up to 2**53.
        return torch.cat([v.reshape(-1).view(torch.float64) for v in self._values()])

    def _unpack(self: A, buffer: Tensor) -> A:
        values, offset = [], 0
        for value in self._values():
            part = buffer[offset : offset + value.numel()].reshape(value.shape)
            values.append(part.view(value.dtype))  # int64 fields: the bits _pack stored
            offset += value.numel()
        return self._trusted(*values)

    def _merge_gathered(self: A, rows: Tensor) -> A:
        """Merge every rank's packed state in rank order: the same result on every rank."""
        states = [self._unpack(row) for row in rows.unbind(0)]
        return functools.reduce(lambda a, b: a.merge(b), states)


def _fields(cls: type[Accumulator]) -> tuple[str, ...]:
    return cls._field_names


def check_state_tensor(name: str, value: object, dtype: torch.dtype, ndim: int | None) -> Tensor:
    if (
        not isinstance(value, Tensor)
        or value.dtype != dtype
        or (ndim is not None and value.ndim != ndim)
    ):
        rank = "" if ndim is None else f"{ndim}-d "
        raise TypeError(f"`{name}` must be a {rank}{str(dtype)[6:]} tensor, got {describe(value)}.")
    return value


def register_accumulator(cls: type[A]) -> type[A]:
    """Make ``cls`` unhashable (the dataclass decorator replaces ``__hash__``) and a pytree."""
    cls.__hash__ = None  # type: ignore[assignment]
    # Read by the traced methods: dynamo cannot trace dataclasses.fields on a class.
    cls._field_names = tuple(field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]
    pytree.register_pytree_node(
        cls,
        lambda acc: (list(acc._values()), None),
        lambda children, _: cls._trusted(*children),
        serialized_type_name=f"sae_losses.{cls.__name__}",
    )
    return cls
