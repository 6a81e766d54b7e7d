"""The schema of an entry in the term registry (tests/terms.py): :class:`Term` and :class:`Arg`.

A :class:`Term` says how to call a public term (data arguments positional), how to draw its
inputs from a seed, which of them take gradients, whether it takes ``reduce`` and which masks,
its float64 reference, and what the contract tests should know about its numbers.
"""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import sae_losses

REDUCE_MODES = ("none", "mean", "sum")

# A draw makes one input from (shape, dtype, seed): drawn in float64, then rounded to dtype.
Draw = Callable[[tuple[int, ...], torch.dtype, int], Tensor]

BATCHED_AXES = ("batch", "*", "feature")
PARAM_AXES = ("feature",)


@dataclasses.dataclass(frozen=True)
class Arg:
    """One data argument that is not shaped like the default: a draw and its axes.

    Axes are ``"batch"``, ``"*"`` (the component axes: zero or more), ``"feature"`` (the tests'
    last size) or any other name, sized by :attr:`Term.sizes`.
    """

    draw: Draw
    axes: tuple[str, ...]


def arg(draw, *axes):
    return Arg(draw, axes)


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
    """One public term as the contract tests see it: ``term(*inputs, reduce=..., mask=...)``.

    ``inputs`` are the data arguments, positional: the ``batched`` ones (batch axis first, by
    default shaped ``(batch, *component, feature)``), then the ``params`` shared by every row (by
    default ``(feature,)``). An entry may give a draw alone (default axes) or an :class:`Arg`.
    """

    name: str  # the test id
    function: str  # its name in sae_losses.__all__, looked up at call time
    # (*inputs) -> (positional arguments, keyword options) of the public call
    bind: Callable[..., tuple[tuple[Tensor, ...], dict[str, Any]]]
    batched: tuple[Draw | Arg, ...]
    reference: Callable[..., Tensor]  # reference(*inputs, reduce=, mask=): float64, independent
    params: tuple[Draw | Arg, ...] = ()
    sizes: tuple[tuple[str, int], ...] = ()  # the sizes of axes other than batch, *, feature
    grads: tuple[int, ...] = ()  # the inputs that get a gradient (indices into inputs)
    reduce: bool = True  # takes reduce= (without it: one result over the batch, or per row)
    masks: str | None = "weights"  # "weights": bool or float row weights; "bool"; None: no mask
    # Above the one-call threshold its eager path computes in row blocks (_rowops.row_blocks).
    blocked: bool = True
    # The size of its values where they are sums of signed terms (a cosine: 1): their rounding is
    # relative to it, not to each value, which may cancel to near 0. None: sums of non-negative
    # terms, each value as exact as the tolerance relative to itself.
    value_scale: float | None = None
    # Relative tolerances against the float64 reference that differ from the tests' defaults, by
    # input dtype: where the term documents rounding inside to the input dtype (a half decode).
    rtol: tuple[tuple[torch.dtype, float], ...] = ()
    # A ratio of sums over the batch (the FVU): NaN below 2 rows.
    ratio: bool = False
    # Its gradient entries are differences of rounded terms (a ratio of sums; tanh's 1 - tanh^2),
    # exact to the tolerance relative to the largest entry, not each to itself.
    gradients_to_largest: bool = False
    # A compiled term (calling it eagerly runs torch.compile): the eager term with the same
    # values and gradients. Tests compute their expected side with it, and carry the compile mark.
    eager: str | None = None
    # Contracts it is known to fail, with why: (contract, reason). The tests of that contract
    # mark it xfail(strict=True), so the failure stays visible and its fix shows.
    known_failures: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        return self.name

    def args(self) -> list[Arg]:
        """Every input's draw and axes, batched ones first."""
        return [
            a if isinstance(a, Arg) else Arg(a, BATCHED_AXES if i < self.n_batched else PARAM_AXES)
            for i, a in enumerate((*self.batched, *self.params))
        ]

    @property
    def n_batched(self) -> int:
        return len(self.batched)

    @property
    def components(self) -> bool:
        """Whether it takes component axes between the batch axis and the last one."""
        return any("*" in a.axes for a in self.args())

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The tests' default ``(*component, feature)``: 2 components if it takes them."""
        return (2, 5) if self.components else (5,)

    @property
    def default_axes(self) -> bool:
        """Whether every input has the default axes, so its result is ``(batch, *component)``
        (reduce "none") or ``(*component)``."""
        return not any(isinstance(a, Arg) for a in (*self.batched, *self.params))

    @property
    def compiled(self) -> bool:
        return self.eager is not None

    @property
    def float_masks(self) -> bool:
        return self.masks == "weights"

    @property
    def mask_kinds(self) -> tuple[str, ...]:
        return {"weights": ("none", "bool", "float"), "bool": ("none", "bool"), None: ("none",)}[
            self.masks
        ]

    @property
    def reduces(self) -> tuple[str | None, ...]:
        return REDUCE_MODES if self.reduce else (None,)

    def shape_of(self, index, batch, shape):
        """The shape of input ``index`` for a batch and a ``(*component, feature)``."""
        sizes = {"batch": batch, "feature": shape[-1], **dict(self.sizes)}
        dims = []
        for axis in self.args()[index].axes:
            dims.extend(shape[:-1] if axis == "*" else [sizes[axis]])
        return tuple(dims)

    def axis_of(self, index, axis):
        """The dimension of input ``index`` named ``axis`` (negative after ``*``), or None."""
        axes = self.args()[index].axes
        if axis not in axes:
            return None
        at = axes.index(axis)
        return at - len(axes) if "*" in axes[:at] else at

    def inputs(self, batch, shape=None, dtype=torch.float64, seed=0, requires_grad=False):
        """Seeded inputs for ``batch`` rows of ``shape = (*component, feature)``."""
        shape = self.example_shape if shape is None else tuple(shape)
        assert self.components or len(shape) == 1, f"{self.name} takes no component axes"
        drawn = [
            a.draw(self.shape_of(i, batch, shape), dtype, seed + 101 * i)
            for i, a in enumerate(self.args())
        ]
        return [t.requires_grad_(requires_grad and t.is_floating_point()) for t in drawn]

    def index(self, inputs, keep):
        """The inputs with the batched ones indexed by ``keep``; params are shared by every row."""
        return [t[keep] if i < self.n_batched else t for i, t in enumerate(inputs)]

    def __call__(self, *inputs, reduce=None, mask=None, unchecked=False, function=None):
        """The public call. ``unchecked``: the body without the runtime type check's wrapper."""
        public = getattr(sae_losses, function or self.function)
        if unchecked:
            public = inspect.unwrap(public)
        args, options = self.bind(*inputs)
        if reduce is not None:
            assert self.reduce, f"{self.name} takes no reduce"
            options["reduce"] = reduce
        if mask is not None:
            assert self.masks, f"{self.name} takes no mask"
            options["mask"] = mask
        return public(*args, **options)

    def expected(self, *inputs, reduce=None, mask=None):
        """The same call through the eager twin of a compiled term (itself otherwise)."""
        return self(*inputs, reduce=reduce, mask=mask, function=self.eager)

    def float64_reference(self, *inputs, reduce=None, mask=None):
        return self.reference(*inputs, reduce=reduce or "mean", mask=mask)
