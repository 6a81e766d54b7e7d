"""torch.func transforms over every term (tests/terms.py): grad, jacrev, vmap of grad, vmap
without grad above the one-call threshold, masks under vmap, and functional_call of a whole SAE.

Under ``torch.func`` the terms run their plain formula; these tests check that it gives what eager
autograd (the blocked kernels and hand-written gradients) gives, in float64. A compiled term
runs its plain formula here too; its expected side is its eager twin.
"""

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import sae_losses
from helpers import RowBlocksSpy, blocked_rows, one_call_elements, randn
from sae_losses import _rowops
from terms import cases

TOL = {"rtol": 1e-10, "atol": 1e-12}


def eager_grads(loss, tensors, argnums):
    """The gradients by eager autograd (the blocked kernels and their autograd functions)."""
    leaves = [t.clone().requires_grad_(i in argnums) for i, t in enumerate(tensors)]
    return torch.autograd.grad(loss(*leaves), [leaves[i] for i in argnums])


def assert_all_close(found, expected):
    assert len(found) == len(expected)
    for f, e in zip(found, expected, strict=True):
        torch.testing.assert_close(f, e, **TOL)


def assert_nonzero(grads):
    """Guard against a vacuous comparison: some gradient must be non-zero."""
    assert any(g.abs().sum() > 0 for g in grads)


DIFFERENTIABLE = cases(lambda term: term.grads)


# --- grad, jacrev, vmap(grad) ---------------------------------------------------------------------


@pytest.mark.parametrize("term", DIFFERENTIABLE)
def test_func_grad_matches_eager_autograd(term):
    tensors = term.inputs(6, (5,), seed=1)
    found = grad(lambda *xs: term(*xs).sum(), argnums=term.grads)(*tensors)
    expected = eager_grads(lambda *xs: term.expected(*xs).sum(), tensors, term.grads)
    assert_nonzero(expected)
    assert_all_close(found, expected)


@pytest.mark.parametrize("term", DIFFERENTIABLE)
def test_jacrev_matches_eager_autograd_jacobian(term):
    tensors = term.inputs(4, seed=2)  # (batch, component, feature): a (4, 2) or (2,) result
    reduce = "none" if term.reduce else None

    def per_row(call):
        def rows(*wanted):
            full = list(tensors)
            for i, t in zip(term.grads, wanted, strict=True):
                full[i] = t
            return call(*full, reduce=reduce)

        return rows

    wanted = tuple(tensors[i] for i in term.grads)
    found = jacrev(per_row(term), argnums=tuple(range(len(wanted))))(*wanted)
    expected = torch.autograd.functional.jacobian(per_row(term.expected), wanted)
    assert_nonzero(expected)
    assert_all_close(found, expected)


@pytest.mark.parametrize("term", DIFFERENTIABLE)
def test_vmap_of_grad_matches_a_loop_of_eager_autograd(term):
    # An ensemble of 3 SAEs, each with its own batch and its own weight or threshold.
    members = [term.inputs(6, (5,), seed=10 * k) for k in range(3)]
    stacked = [torch.stack(parts) for parts in zip(*members, strict=True)]
    found = vmap(grad(lambda *xs: term(*xs).sum(), argnums=term.grads))(*stacked)
    for k, tensors in enumerate(members):
        expected = eager_grads(lambda *xs: term.expected(*xs).sum(), tensors, term.grads)
        assert_nonzero(expected)
        assert_all_close(tuple(g[k] for g in found), expected)


# --- vmap without grad above the one-call threshold, masks under vmap -----------------------------

FEATURES = 256
# Blocks of 128 rows of 256 features: the threshold, and so the samples, 16 times smaller than
# the shipped 2^19 (the dispatch does not depend on the block size; the spy checks the path).
SMALL_BLOCK_ELEMENTS = 1 << 15


@pytest.mark.parametrize("term", cases(lambda term: term.blocked))
def test_vmap_over_samples_above_the_one_call_threshold_matches_a_loop(monkeypatch, term):
    # Each sample is over ONE_CALL_BLOCKS * BLOCK_ELEMENTS elements: eagerly, the blocked path.
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", SMALL_BLOCK_ELEMENTS)
    rows = blocked_rows(FEATURES)
    assert rows * FEATURES > one_call_elements()
    samples = [term.inputs(rows, (FEATURES,), seed=30 + k) for k in range(2)]
    stacked = [torch.stack(parts) for parts in zip(*samples, strict=True)]
    reduce = "none" if term.reduce else None
    found = vmap(lambda *xs: term(*xs, reduce=reduce))(*stacked)
    spy = RowBlocksSpy.install(monkeypatch)
    expected = torch.stack([term.expected(*sample, reduce=reduce) for sample in samples])
    assert spy.blocked() >= 2, spy.calls  # the loop's eager calls really took the blocked path
    torch.testing.assert_close(found, expected, **TOL)


def vmap_masks(term):
    keep = torch.tensor([True, False, True, True, False, True, True])
    kinds = {"bool": keep, "float": torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0, 3.0]).double()}
    return {kind: mask for kind, mask in kinds.items() if kind == "bool" or term.float_masks}


@pytest.mark.parametrize("term", cases(lambda term: term.masks))
def test_masked_terms_under_vmap_match_a_loop(term):
    # The mask is shared by every ensemble member (in_dims None); the rows it drops hold NaN.
    for mask in vmap_masks(term).values():
        members = [term.inputs(7, (5,), seed=40 + 10 * k) for k in range(3)]
        for tensors in members:
            for t in tensors[: term.n_batched]:
                t[mask == 0] = torch.nan
        stacked = [torch.stack(parts) for parts in zip(*members, strict=True)]
        in_dims = (0,) * len(stacked) + (None,)

        def loss(*xs, call=term):
            *inputs, mask = xs
            return call(*inputs, mask=mask).sum()

        found = vmap(loss, in_dims=in_dims)(*stacked, mask)
        assert torch.isfinite(found).all()
        for k, tensors in enumerate(members):
            torch.testing.assert_close(found[k], loss(*tensors, mask, call=term.expected), **TOL)
        if not term.grads:
            continue
        grads = vmap(grad(loss, argnums=term.grads), in_dims=in_dims)(*stacked, mask)
        for k, tensors in enumerate(members):
            expected = eager_grads(
                lambda *xs, mask=mask: loss(*xs, mask, call=term.expected), tensors, term.grads
            )
            for i, g, e in zip(term.grads, grads, expected, strict=True):
                assert torch.isfinite(g[k]).all()
                if i < term.n_batched:
                    assert not g[k][mask == 0].any()
                torch.testing.assert_close(g[k], e, **TOL)


# --- a whole SAE ----------------------------------------------------------------------------------


class TinySAE(torch.nn.Module):
    """A one-layer SAE whose loss uses every differentiable term."""

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
