"""Shared helpers of the real-peer conformance suite (peer_tests/).

Every test in peer_tests/ imports a real, installed peer package (one venv per peer, built by
`make test-peers`; pins in peers/<peer>.txt) and compares a number the peer computes with the
number a public ``sae_losses`` call computes on the same tensors. Tolerances:

- ``F64``: both sides compute in float64, so they agree to float64 rounding (1e-12).
- ``F32``: the peer computes in float32 (its own ``.float()``, float32 state or a float32 model),
  so only float32 rounding holds. The relative tolerance is a few float32 epsilons times the
  length of the sums involved, as stated where it is used.
"""

import torch

F64 = {"rtol": 1e-12, "atol": 1e-12}
F32 = {"rtol": 1e-5, "atol": 1e-6}
# A peer that "differs in substance" differs by far more than rounding.
SUBSTANTIAL = 1e-3


def randn(*shape, dtype=torch.float64, seed=0):
    """Seeded normal values, drawn in float64 and rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def close(actual, expected, tol=F64):
    """``actual`` (a sae_losses number) equals ``expected`` (the peer's) within ``tol``."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, **tol)


def differ(a, b, by=SUBSTANTIAL):
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    assert abs(a - b) > by, f"expected a substantial difference, got {a!r} and {b!r}"


def grads(value, inputs):
    """Gradients of ``value`` to each of ``inputs`` (zeros where it does not depend on one)."""
    inputs = list(inputs)
    found = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs, strict=True)]


def close_grads(ours, peer, inputs, tol=F64):
    """The gradients of two scalars to the same leaves agree, leaf by leaf."""
    inputs = list(inputs)
    for ours_grad, peer_grad in zip(grads(ours, inputs), grads(peer, inputs), strict=True):
        close(ours_grad, peer_grad, tol)
