"""torch.compile(fullgraph=True) over every term (tests/terms.py) and over composed objectives:
the plain formula traces, matches eager in value and gradient, padded rows stay inert, and a
change of batch size recompiles once at most.
"""

import inspect

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import sae_losses
from helpers import l1_reference, l2_reference, randn
from sae_losses import jumprelu_l0, l0_norm, l1_absolute, l2_reconstruction, lp_sparsity
from terms import cases_with_masks

pytestmark = pytest.mark.compile

BATCH_SIZES = (4, 5, 8)  # one recompile at the first change, none at the second


def padded_mask(batch, kind):
    """Drops rows 1, 4, ... and the last (padding); keeps at least 2. Float: row weights."""
    keep = torch.arange(batch) % 3 != 1
    keep[batch - 1] = False
    return keep if kind == "bool" else keep * torch.linspace(0.5, 2.0, batch)


def assert_same_gradients(args, eager_args):
    for a, e in zip(args, eager_args, strict=True):
        if e.grad is None:
            assert a.grad is None or not a.grad.any()
        else:
            torch.testing.assert_close(a.grad, e.grad)
            assert a.grad.isfinite().all()


# Terms that take a mask, with one (and a NaN-padded row); the others without.
@pytest.mark.parametrize(
    ("term", "mask_kind"),
    cases_with_masks(lambda t: t.masks, kinds=("bool", "float"))
    + cases_with_masks(lambda t: not t.masks),
)
def test_compiled_term_matches_eager_without_recompiling(term, mask_kind):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda *a, mask: term(*a, mask=mask), backend=counter, fullgraph=True)
    for batch in BATCH_SIZES:
        inputs = term.inputs(batch, dtype=torch.float32, seed=batch)
        mask = None
        if mask_kind != "none":
            mask = padded_mask(batch, mask_kind)
            for t in inputs[: term.n_batched]:
                t[batch - 1] = torch.nan  # a padded row
        args = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        eager_args = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        result = compiled(*args, mask=mask)
        expected = term.expected(*eager_args, mask=mask)
        torch.testing.assert_close(result, expected)
        assert result.isfinite().all()
        assert result.requires_grad == expected.requires_grad == bool(term.grads)
        if term.grads:
            result.sum().backward()
            expected.sum().backward()
        assert_same_gradients(args, eager_args)
    assert counter.frame_count <= 2


def sae_objective(learned, pre, w_dec_norm, threshold, mask):
    return (
        l1_absolute(learned, weight=w_dec_norm, mask=mask)
        + 0.1 * lp_sparsity(learned, p=0.5, weight=w_dec_norm, mask=mask)
        + 0.1 * lp_sparsity(learned, p=2.0, root=True, mask=mask)
        + 0.01 * l0_norm(learned, threshold=0.1, mask=mask)
        + jumprelu_l0(pre, threshold, bandwidth=0.5, mask=mask)
    )


def test_compiled_objective_matches_eager_without_recompiling():
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(sae_objective, backend=counter, fullgraph=True)
    for batch in (2, 3, 5, 8, 13, 21):
        learned = randn(batch, 2, 6, seed=batch)
        pre = randn(batch, 2, 6, seed=batch + 100)
        w_dec_norm = randn(6, seed=1).abs() + 0.5
        threshold = randn(6, seed=2) * 0.3
        mask = torch.arange(batch) % 3 != 1
        mask[batch - 1] = False
        learned[batch - 1] = torch.nan  # a padded row
        pre[batch - 1] = torch.nan
        args = [t.clone().requires_grad_() for t in (learned, pre, w_dec_norm, threshold)]
        eager_args = [t.detach().clone().requires_grad_() for t in args]
        result = compiled(*args, mask)
        expected = sae_objective(*eager_args, mask)
        torch.testing.assert_close(result, expected)
        assert result.isfinite().all()
        result.sum().backward()
        expected.sum().backward()
        assert_same_gradients(args, eager_args)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("mark_dynamic", [False, True])
def test_batch_size_changes_compile_two_graphs_or_one_with_mark_dynamic(mark_dynamic):
    # The first change of batch size recompiles once (2 graphs), then no more;
    # torch._dynamo.mark_dynamic on the batch axis of every input gives a single graph.
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def sae_loss(decoded, source, learned):
        return l2_reconstruction(decoded, source) + 0.01 * l1_absolute(learned)

    frames = []
    for batch in (2, 3, 5, 8, 13, 21):
        decoded, source = randn(batch, 2, 6, seed=batch), randn(batch, 2, 6, seed=batch + 1)
        learned = randn(batch, 2, 10, seed=batch + 2)
        if mark_dynamic:
            for tensor in (decoded, source, learned):
                torch._dynamo.mark_dynamic(tensor, 0)
        expected = l2_reference(decoded, source, "mean") + 0.01 * l1_reference(learned, "mean")
        torch.testing.assert_close(sae_loss(decoded, source, learned).double(), expected)
        frames.append(counter.frame_count)
    assert frames == ([1] * 6 if mark_dynamic else [1, 2, 2, 2, 2, 2])


def test_inductor_compiled_gradients_match_eager():
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda d, s: l2_reconstruction(d, s, reduce="sum") + l1_absolute(d, reduce="sum"),
        fullgraph=True,
    )
    decoded = randn(5, 7, dtype=torch.bfloat16, seed=19).requires_grad_()
    source = randn(5, 7, dtype=torch.bfloat16, seed=20)
    compiled(decoded, source).backward()
    grad_compiled = decoded.grad.clone()
    decoded.grad = None
    (
        l2_reconstruction(decoded, source, reduce="sum") + l1_absolute(decoded, reduce="sum")
    ).backward()
    torch.testing.assert_close(grad_compiled, decoded.grad)


def exception_chain(error: BaseException):
    """The exception and everything it was raised from or while handling."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


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
    messages = [str(error) for error in exception_chain(caught.value)]
    assert any(message in text for text in messages), messages
