"""torch.func transforms over every differentiable op, vmap over large samples, and errors under
dynamic shapes.

Under ``torch.func`` the ops run their plain formula; these tests check that it gives what eager
autograd (the blocked kernels and hand-written gradients) gives, in float64.
"""

import inspect

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import sae_losses
from helpers import randn

# The ops are looked up when a test runs, so each test fails on its own when one is missing.
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _away_from_zero(x):
    """|x| >= 0.1: keeps |z| off its kink at 0 without changing the sign pattern."""
    return (x.abs() + 0.1) * x.sign()


# name -> (loss(*tensors, reduce), make(shape, seed) -> tensors, the argnums that get gradients)
CASES = {
    "l2_reconstruction": (
        lambda d, s, reduce="mean": sae_losses.l2_reconstruction(d, s, reduce=reduce),
        lambda shape, seed: (
            randn(*shape, dtype=torch.float64, seed=seed),
            randn(*shape, dtype=torch.float64, seed=seed + 1),
        ),
        (0, 1),
    ),
    "l1_absolute_weighted": (
        lambda z, w, reduce="mean": sae_losses.l1_absolute(z, weight=w, reduce=reduce),
        lambda shape, seed: (
            _away_from_zero(randn(*shape, dtype=torch.float64, seed=seed)),
            randn(shape[-1], dtype=torch.float64, seed=seed + 1).abs() + 0.5,
        ),
        (0, 1),
    ),
    "lp_sparsity": (
        lambda z, w, reduce="mean": sae_losses.lp_sparsity(z, p=0.5, weight=w, reduce=reduce),
        lambda shape, seed: (
            _away_from_zero(randn(*shape, dtype=torch.float64, seed=seed)),
            randn(shape[-1], dtype=torch.float64, seed=seed + 1).abs() + 0.5,
        ),
        (0, 1),
    ),
    "lp_sparsity_root": (
        lambda z, w, reduce="mean": sae_losses.lp_sparsity(
            z, p=3.0, weight=w, root=True, reduce=reduce
        ),
        lambda shape, seed: (
            _away_from_zero(randn(*shape, dtype=torch.float64, seed=seed)),
            randn(shape[-1], dtype=torch.float64, seed=seed + 1).abs() + 0.5,
        ),
        (0, 1),
    ),
    # The JumpReLU L0 has a gradient for the threshold only (straight-through, bandwidth 1).
    "jumprelu_l0": (
        lambda pre, threshold, reduce="mean": sae_losses.jumprelu_l0(
            pre, threshold, bandwidth=1.0, reduce=reduce
        ),
        lambda shape, seed: (
            randn(*shape, dtype=torch.float64, seed=seed),
            0.3 * randn(shape[-1], dtype=torch.float64, seed=seed + 1),
        ),
        (1,),
    ),
    # No reduce: the FVU is one number per component, over the whole batch.
    "fraction_of_variance_unexplained": (
        lambda d, s, reduce=None: sae_losses.fraction_of_variance_unexplained(d, s),
        lambda shape, seed: (
            randn(*shape, dtype=torch.float64, seed=seed),
            randn(*shape, dtype=torch.float64, seed=seed + 1),
        ),
        (0, 1),
    ),
}


def eager_grads(loss, tensors, argnums):
    """The gradients by eager autograd (the blocked kernels and their autograd functions)."""
    leaves = [t.clone().requires_grad_(i in argnums) for i, t in enumerate(tensors)]
    return torch.autograd.grad(loss(*leaves), [leaves[i] for i in argnums])


def _assert_all_close(found, expected):
    assert len(found) == len(expected)
    for f, e in zip(found, expected, strict=True):
        torch.testing.assert_close(f, e, **TOL)


def _nonzero(grads):
    """Guard against a vacuous comparison: some gradient must be non-zero."""
    assert any(g.abs().sum() > 0 for g in grads)


# --- grad, jacrev, vmap(grad), functional_call ------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_func_grad_matches_eager_autograd(name):
    loss, make, argnums = CASES[name]
    tensors = make((6, 5), seed=1)
    found = grad(loss, argnums=argnums)(*tensors)
    expected = eager_grads(loss, tensors, argnums)
    _nonzero(expected)
    _assert_all_close(found, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_jacrev_matches_eager_autograd_jacobian(name):
    loss, make, argnums = CASES[name]
    tensors = make((4, 2, 5), seed=2)  # (batch, component, feature): a (4, 2) or (2,) result

    def per_row(*wanted):
        full = list(tensors)
        for i, t in zip(argnums, wanted, strict=True):
            full[i] = t
        return loss(*full, reduce="none")

    wanted = tuple(tensors[i] for i in argnums)
    found = jacrev(per_row, argnums=tuple(range(len(argnums))))(*wanted)
    expected = torch.autograd.functional.jacobian(per_row, wanted)
    _nonzero(expected)
    _assert_all_close(found, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_of_grad_matches_a_loop_of_eager_autograd(name):
    # An ensemble of 3 SAEs, each with its own batch and its own weight or threshold.
    loss, make, argnums = CASES[name]
    members = [make((6, 5), seed=10 * k) for k in range(3)]
    stacked = [torch.stack(parts) for parts in zip(*members, strict=True)]
    found = vmap(grad(loss, argnums=argnums))(*stacked)
    for k, tensors in enumerate(members):
        expected = eager_grads(loss, tensors, argnums)
        _nonzero(expected)
        _assert_all_close(tuple(g[k] for g in found), expected)


class TinySAE(torch.nn.Module):
    """A one-layer SAE whose loss uses every differentiable op."""

    def __init__(self, d_in: int = 6, d_sae: int = 8) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(d_in, d_sae, dtype=torch.float64)
        self.decoder = torch.nn.Linear(d_sae, d_in, dtype=torch.float64)
        self.threshold = torch.nn.Parameter(torch.zeros(d_sae, dtype=torch.float64))
        with torch.no_grad():
            for seed, parameter in enumerate(self.parameters()):
                parameter.copy_(0.5 * randn(*parameter.shape, dtype=torch.float64, seed=seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.encoder(x)
        latent = torch.relu(pre)  # exact zeros: the L1 and Lp gradients there are 0
        decoded = self.decoder(latent)
        weight = self.decoder.weight.norm(dim=0)  # the decoder-norm-weighted penalties
        return (
            sae_losses.l2_reconstruction(decoded, x)
            + 1e-2 * sae_losses.l1_absolute(latent, weight=weight)
            + 1e-3 * sae_losses.lp_sparsity(latent, p=0.5, weight=weight)
            + 1e-2 * sae_losses.jumprelu_l0(pre, self.threshold, bandwidth=1.0)
            + sae_losses.fraction_of_variance_unexplained(decoded, x)
        )


def test_grad_of_functional_call_matches_backward():
    model = TinySAE()
    x = randn(16, 6, dtype=torch.float64, seed=20)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    found = grad(lambda p: functional_call(model, p, (x,)))(params)
    model(x).backward()
    assert found.keys() == params.keys()
    for name, parameter in model.named_parameters():
        assert parameter.grad.abs().sum() > 0, name
        torch.testing.assert_close(found[name], parameter.grad, **TOL)


# --- vmap without grad, masks under vmap ------------------------------------------------------

# Each sample has 1024 * 600 = 614400 > 2^19 elements: the eager ops would take the blocked path.
LARGE = (1024, 600)


def _vmapped_value_cases():
    return {
        "l2_reconstruction": lambda d, s, w: sae_losses.l2_reconstruction(d, s, reduce="none"),
        "l1_absolute": lambda d, s, w: sae_losses.l1_absolute(d, reduce="sum"),
        "l1_absolute_weighted": lambda d, s, w: sae_losses.l1_absolute(d, weight=w),
        "lp_sparsity": lambda d, s, w: sae_losses.lp_sparsity(d, p=0.5, weight=w),
        "l0_norm": lambda d, s, w: sae_losses.l0_norm(d, threshold=0.5, reduce="none"),
        "jumprelu_l0": lambda d, s, w: sae_losses.jumprelu_l0(d, w, bandwidth=0.1),
        "fraction_of_variance_unexplained": lambda d, s, w: (
            sae_losses.fraction_of_variance_unexplained(d, s)
        ),
    }


@pytest.mark.parametrize("name", list(_vmapped_value_cases()))
def test_vmap_over_samples_above_one_block_matches_a_loop(name):
    op = _vmapped_value_cases()[name]
    decoded = randn(2, *LARGE, dtype=torch.float64, seed=30)
    source = randn(2, *LARGE, dtype=torch.float64, seed=31)
    weight = randn(2, LARGE[-1], dtype=torch.float64, seed=32).abs()
    found = vmap(op)(decoded, source, weight)
    expected = torch.stack([op(decoded[k], source[k], weight[k]) for k in range(2)])
    torch.testing.assert_close(found, expected, **TOL)


def test_masked_ops_under_vmap_match_a_loop():
    # The mask is shared by every ensemble member (in_dims None); the rows it drops hold NaN.
    decoded = randn(3, 7, 5, dtype=torch.float64, seed=40)
    source = randn(3, 7, 5, dtype=torch.float64, seed=41)
    mask = torch.tensor([True, False, True, True, False, True, True])
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0, 3.0], dtype=torch.float64)
    decoded[:, ~mask] = torch.nan

    def loss(d, s, mask, weights):
        return (
            sae_losses.l2_reconstruction(d, s, mask=mask, reduce="none").sum()
            + sae_losses.l2_reconstruction(d, s, mask=mask)
            + sae_losses.l1_absolute(d, mask=weights, reduce="sum")
            + sae_losses.fraction_of_variance_unexplained(d, s, mask=mask)
        )

    found = vmap(loss, in_dims=(0, 0, None, None))(decoded, source, mask, weights)
    found_grads = vmap(grad(loss), in_dims=(0, 0, None, None))(decoded, source, mask, weights)
    for k in range(3):
        torch.testing.assert_close(found[k], loss(decoded[k], source[k], mask, weights), **TOL)
        (expected_grad,) = eager_grads(
            lambda d, s: loss(d, s, mask, weights), (decoded[k], source[k]), (0,)
        )
        assert torch.isfinite(found_grads[k]).all()
        assert torch.equal(found_grads[k][~mask], torch.zeros_like(found_grads[k][~mask]))
        torch.testing.assert_close(found_grads[k], expected_grad, **TOL)
    assert torch.isfinite(found).all()


@pytest.mark.compile
def test_vmap_over_the_fused_functions_matches_a_loop():
    torch._dynamo.reset()
    decoded = randn(3, 6, 2, 5, dtype=torch.float64, seed=50)
    source = randn(3, 6, 2, 5, dtype=torch.float64, seed=51)
    found_l2 = vmap(sae_losses.fused_l2_reconstruction)(decoded, source)
    found_l1 = vmap(lambda z: sae_losses.fused_l1_absolute(z, reduce="none"))(decoded)
    found_grad = vmap(grad(lambda d, s: sae_losses.fused_l2_reconstruction(d, s).sum()))(
        decoded, source
    )
    for k in range(3):
        torch.testing.assert_close(
            found_l2[k], sae_losses.l2_reconstruction(decoded[k], source[k]), **TOL
        )
        torch.testing.assert_close(
            found_l1[k], sae_losses.l1_absolute(decoded[k], reduce="none"), **TOL
        )
        (expected_grad,) = eager_grads(
            lambda d, s: sae_losses.l2_reconstruction(d, s).sum(), (decoded[k], source[k]), (0,)
        )
        torch.testing.assert_close(found_grad[k], expected_grad, **TOL)


# --- errors under dynamic shapes ---------------------------------------------------------------


def _chain(error: BaseException):
    """The exception and everything it was raised from or while handling."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


@pytest.mark.compile
def test_shape_error_survives_dynamic_shape_compilation():
    torch._dynamo.reset()
    # inspect.unwrap: the runtime type check (when on) would reject the shapes before the body.
    compiled = torch.compile(
        inspect.unwrap(sae_losses.l2_reconstruction), dynamic=True, fullgraph=True
    )
    # Dynamo wraps the ValueError (in torch 2.13 an Unsupported, a RuntimeError, raised from it).
    with pytest.raises((ValueError, RuntimeError)) as caught:
        compiled(torch.ones(2, 3), torch.ones(2, 4))
    message = "`decoded` and `source` must have the same shape, got (2, 3) and (2, 4)."
    messages = [str(error) for error in _chain(caught.value)]
    assert any(message in text for text in messages), messages
