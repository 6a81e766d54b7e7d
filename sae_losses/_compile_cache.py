"""The compile cache of the fused strategy: one compiled function per kind of input, or eager.

A module of its own because it is the one piece of ``sae_losses._fused`` with state: which kinds
were compiled, which fell back to the eager kernels, and whether the fallback has warned.

Each combination of dtypes, ranks, stride orders, ``requires_grad`` flags and options gets its
own compiled function, so it compiles once (plus one dynamic-shape recompile when the batch size
first changes) and no combination counts against another's recompile limit. Where one kind of
input cannot be compiled (no C++ compiler, no Triton, dynamo's recompile limit for an exotic
layout, or a runtime type checker whose wrappers dynamo cannot trace), that kind runs the eager
kernels from then on, with the same numbers, and every other kind is unaffected; the first build
failure warns once.
"""

import functools
import inspect
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sae_losses._rowops import RowSpec

__all__ = ["fresh_copy", "run_compiled"]

_warned: list[str] = []  # the first build failure, once it has been reported
_eager_keys: set[tuple[Any, ...]] = set()  # input kinds whose kernels could not be compiled


@functools.cache
def _compiled(function: Callable[..., Any], key: tuple[Any, ...]) -> Callable[..., Any]:
    # Dynamo counts recompiles per code object, not per torch.compile wrapper: each key gets a
    # fresh copy of the function's code, so each has its own budget. A runtime type checker
    # (jaxtyping's import hook) wraps the function: compile the function it wraps.
    del key
    return torch.compile(fresh_copy(function), fullgraph=True)


def fresh_copy(function: Callable[..., Any]) -> Callable[..., Any]:
    """The function a runtime type checker wraps, with a code object of its own."""
    original = inspect.unwrap(function)
    return types.FunctionType(
        original.__code__.replace(),
        original.__globals__,
        original.__name__,
        original.__defaults__,
        original.__closure__,
    )


def _layout(t: Tensor) -> tuple[int, ...]:
    """The order of the strides (a transpose or an expand differs from a contiguous tensor)."""
    strides = t.stride()
    return tuple(sorted(range(t.ndim), key=lambda d: (-strides[d], d)))


def _signature(value: Any) -> Any:
    """What a compiled kernel specialises on: dtypes, ranks, layouts, grad flags and options."""
    if isinstance(value, Tensor):
        return (value.dtype, value.ndim, value.requires_grad, _layout(value), 0 in value.stride())
    if isinstance(value, RowSpec):
        return (value.op, value.n_batched, value.dtype, _signature(dict(value.options)))
    if isinstance(value, tuple | list):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return value


def run_compiled(eager: Callable[..., Any], function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` compiled for this kind of ``args``, or ``eager(*args)`` for a kind
    that could not be compiled."""
    key = (function, _signature(args))
    if key not in _eager_keys:
        try:
            return _compiled(function, key)(*args)
        except Exception as error:
            if not _is_compile_failure(error):
                raise
            _eager_keys.add(key)
            if _is_build_failure(error) and not _warned:
                _warned.append(f"{type(error).__name__}: {error}".splitlines()[0])
                warnings.warn(
                    "sae_losses: torch.compile could not build the fused kernels "
                    f"({_warned[0]}); inputs of that kind run the eager kernels from now on.",
                    RuntimeWarning,
                    stacklevel=5,
                )
    return eager(*args)


def _is_build_failure(error: Exception) -> bool:
    """Inductor could not build a kernel: no C++ compiler, no Triton, a broken toolchain."""
    from torch._dynamo.exc import BackendCompilerFailed

    failures: tuple[type[Exception], ...] = (BackendCompilerFailed, OSError)
    try:
        from torch._inductor.exc import InductorError

        failures += (InductorError,)
    except ImportError:  # older torch raises BackendCompilerFailed
        pass
    return isinstance(error, failures)


def _is_compile_failure(error: Exception) -> bool:
    """A build failure, dynamo's recompile limit for one kind of input (exotic layouts), or code
    dynamo cannot trace (a runtime type checker's wrappers, such as jaxtyping's import hook)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, Unsupported

    return _is_build_failure(error) or isinstance(error, FailOnRecompileLimitHit | Unsupported)
