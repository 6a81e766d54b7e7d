"""Tests for AuxK: auxk_reconstruction and auxk_loss.

The float64 reference is the dense formula written independently: each row's dead latents ranked
by ``sort``, the first ``k_aux`` kept, ReLU, a dense ``(batch, latent)`` activation, a matmul and
the two-pass FVU. Hand-worked cases cover ties, fewer dead latents than ``k_aux``, none dead and
one row; then gradcheck, masks, compile, what is saved and allocated, and the error messages.
"""

import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter

from helpers import SavedTensors, randn
from sae_losses import _auxk_decode, auxk_loss, auxk_reconstruction

reconstruction_unchecked = inspect.unwrap(auxk_reconstruction)
loss_unchecked = inspect.unwrap(auxk_loss)
ROOT = Path(__file__).resolve().parent.parent


def dense_reference(pre, dead, weight, k_aux):
    """Float64 ê: ranks by a descending sort of the dead pre-activations; the first k_aux count."""
    pre, weight = pre.double(), weight.double()
    ranked = torch.where(dead, pre, -torch.inf).sort(dim=1, descending=True).indices
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(pre.shape[1]).expand_as(pre))
    chosen = dead & (rank < k_aux)
    return torch.where(chosen, pre.relu(), 0) @ weight


def loss_reference(pre, dead, weight, residual, k_aux, keep=None):
    if keep is not None:
        pre, residual = pre[keep], residual[keep]
    e_hat, e = dense_reference(pre, dead, weight, k_aux), residual.double()
    if not dead.any():
        return torch.zeros((), dtype=torch.float64)
    return (e_hat - e).square().sum() / (e - e.mean(0)).square().sum()


def draw(batch, latents, model, *, seed, dtype=torch.float64, dead_fraction=0.5):
    """Pre-activations (no ties, |pi| >= 0.1), a dead mask, a decoder and a residual."""
    pre = randn(batch, latents, dtype=torch.float64, seed=seed)
    pre = (pre + 0.1 * pre.sign()).to(dtype)
    dead = torch.rand(latents, generator=torch.Generator().manual_seed(seed)) < dead_fraction
    weight = randn(latents, model, dtype=dtype, seed=seed + 1)
    residual = randn(batch, model, dtype=dtype, seed=seed + 2)
    return pre, dead, weight, residual


# --- hand-worked cases ----------------------------------------------------------------------

W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])


def test_fewer_dead_latents_than_k_aux_fill_nothing():
    # Latents 1 and 2 are dead; the live ones are larger but never chosen. k_aux 3 > 2 dead:
    # ê = 0.5 W_1 + 2 W_2 = (2, 2.5).
    pre = torch.tensor([[9.0, 0.5, 2.0, 8.0]])
    dead = torch.tensor([False, True, True, False])
    assert torch.equal(auxk_reconstruction(pre, dead, W, k_aux=3), torch.tensor([[2.0, 2.5]]))


def test_ties():
    dead = torch.tensor([True, True, False, True])
    # A tie inside the selection is decided: both count, ê = 2 W_0 + 2 W_1 = (2, 2).
    pre = torch.tensor([[2.0, 2.0, 5.0, 1.0]])
    assert torch.equal(auxk_reconstruction(pre, dead, W, k_aux=2), torch.tensor([[2.0, 2.0]]))
    # A tie at the boundary: topk picks one of the two, ê = 2 W_0 or 2 W_1.
    chosen = auxk_reconstruction(pre, dead, W, k_aux=1)
    assert chosen.tolist() in ([[2.0, 0.0]], [[0.0, 2.0]])
    # A dead latent tied with a live one: the live one is never chosen, ê = 5 W_3.
    pre = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    assert torch.equal(auxk_reconstruction(pre, dead, W, k_aux=1), torch.tensor([[10.0, 0.0]]))


def test_negative_and_infinite_pre_activations_add_nothing():
    pre = torch.tensor([[-1.0, -torch.inf, 3.0, -2.0]], requires_grad=True)
    e_hat = auxk_reconstruction(pre, torch.ones(4, dtype=torch.bool), W, k_aux=4)
    assert torch.equal(e_hat, torch.tensor([[3.0, 3.0]]))  # 3 W_2 only
    e_hat.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[0.0, 0.0, 2.0, 0.0]]))  # W_2 . (1, 1)


def test_nan_in_a_dead_latent_gives_nan_and_in_a_live_one_nothing():
    dead = torch.tensor([True, True, False, False])
    pre = torch.tensor([[1.0, torch.nan, torch.nan, 0.5]])
    assert auxk_reconstruction(pre, dead, W, k_aux=1).isnan().all()
    pre = torch.tensor([[1.0, 0.5, torch.nan, torch.nan]])  # live latents are not in the term
    assert torch.equal(auxk_reconstruction(pre, dead, W, k_aux=2), torch.tensor([[1.0, 0.5]]))


def test_no_dead_latent_gives_exactly_zero_value_and_gradient():
    pre, _, weight, residual = draw(6, 10, 3, seed=1, dtype=torch.float32)
    pre.requires_grad_()
    weight.requires_grad_()
    dead = torch.zeros(10, dtype=torch.bool)
    assert torch.equal(auxk_reconstruction(pre, dead, weight, k_aux=4), torch.zeros(6, 3))
    one_row = torch.tensor([True] + [False] * 5)
    constant = torch.ones(6, 3)  # no variance: still 0, with no 0 / 0 in the gradient
    for mask, target in ((None, residual), (one_row, residual), (None, constant)):
        loss = auxk_loss(pre, dead, weight, target, k_aux=4, mask=mask)
        assert torch.equal(loss, torch.tensor(0.0))
        grads = torch.autograd.grad(loss, [pre, weight])
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_loss_worked_example_and_one_row():
    # ê = (2, 0), (0.5, 0); e = (2, 1), (0, 0): error 1 + 0.25, variance 1.25 + 1.25.
    pre = torch.tensor([[3.0, 2.0], [3.0, 0.5]])
    dead = torch.tensor([False, True])
    weight = torch.tensor([[5.0, 5.0], [1.0, 0.0]])
    residual = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    assert torch.equal(auxk_loss(pre, dead, weight, residual, k_aux=1), torch.tensor(0.5))
    # One row: ê is defined, the FVU is not.
    assert torch.equal(
        auxk_reconstruction(pre[:1], dead, weight, k_aux=1), torch.tensor([[2.0, 0]])
    )
    assert auxk_loss(pre[:1], dead, weight, residual[:1], k_aux=1).isnan()


def test_residual_is_detached():
    pre, dead, weight, residual = draw(5, 8, 3, seed=2)
    residual.requires_grad_()
    loss = auxk_loss(pre, dead, weight, residual, k_aux=2)
    assert not loss.requires_grad


# --- the float64 reference, gradients, dtypes ----------------------------------------------


@pytest.mark.parametrize(
    ("batch", "latents", "model", "k_aux", "dead_fraction"),
    [(7, 12, 5, 3, 0.5), (9, 20, 4, 8, 0.2), (4, 6, 3, 6, 1.0), (1, 5, 2, 1, 0.5)],
)
@pytest.mark.parametrize("blocked", [False, True])
def test_matches_the_float64_dense_formula(
    batch, latents, model, k_aux, dead_fraction, blocked, monkeypatch
):
    if blocked:  # 2 rows a block: the eager top-k runs in several blocks
        monkeypatch.setattr(_auxk_decode, "SELECT_ELEMENTS", 2 * latents)
    pre, dead, weight, residual = draw(batch, latents, model, seed=batch, dead_fraction=0.5)
    dead = torch.arange(latents) < round(dead_fraction * latents)
    pre.requires_grad_()
    weight.requires_grad_()
    e_hat = auxk_reconstruction(pre, dead, weight, k_aux=k_aux)
    expected = dense_reference(pre, dead, weight, k_aux)
    torch.testing.assert_close(e_hat, expected, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad(e_hat, [pre, weight], residual)
    theirs = torch.autograd.grad(expected, [pre, weight], residual)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if batch >= 2:
        loss = auxk_loss(pre, dead, weight, residual, k_aux=k_aux)
        torch.testing.assert_close(loss, loss_reference(pre, dead, weight, residual, k_aux))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    # ê is in the inputs' dtype, summed in float32 and rounded once; the loss accumulates in
    # float32. The reference reads the same rounded inputs.
    pre, dead, weight, residual = draw(16, 40, 8, seed=3, dtype=dtype)
    e_hat = auxk_reconstruction(pre, dead, weight, k_aux=6)
    assert e_hat.dtype == dtype
    once = dense_reference(pre, dead, weight, 6).to(dtype)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(e_hat, once, rtol=ulp, atol=ulp)
    loss = auxk_loss(pre, dead, weight, residual, k_aux=6)
    assert loss.dtype == torch.float32
    e, x = residual.double(), e_hat.double()
    expected = (x - e).square().sum() / (e - e.mean(0)).square().sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_mixed_dtypes_promote():
    pre, dead, weight, _ = draw(5, 8, 3, seed=4)
    e_hat = auxk_reconstruction(pre.bfloat16(), dead, weight.float(), k_aux=2)
    assert e_hat.dtype == torch.float32
    torch.testing.assert_close(
        e_hat, dense_reference(pre.bfloat16(), dead, weight.float(), 2).float()
    )


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked):
    pre, dead, weight, residual = draw(6, 9, 3, seed=5)
    mask = torch.arange(6) != 2 if masked else None
    inputs = (pre.requires_grad_(), weight.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda p, w: auxk_loss(p, dead, w, residual, k_aux=3, mask=mask), inputs
    )
    assert torch.autograd.gradcheck(lambda p, w: auxk_reconstruction(p, dead, w, k_aux=3), inputs)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0), k_aux=st.integers(1, 9))
def test_linear_in_the_decoder_and_positively_homogeneous_in_the_pre_activations(
    seed, scale, k_aux
):
    # The selection does not depend on the decoder, nor on a positive scale of the inputs.
    pre, dead, weight, _ = draw(5, 9, 4, seed=seed)
    other = randn(9, 4, dtype=torch.float64, seed=seed + 7)
    e_hat = auxk_reconstruction(pre, dead, weight, k_aux=k_aux)
    torch.testing.assert_close(
        auxk_reconstruction(pre, dead, weight + other, k_aux=k_aux),
        e_hat + auxk_reconstruction(pre, dead, other, k_aux=k_aux),
    )
    torch.testing.assert_close(
        auxk_reconstruction(scale * pre, dead, weight, k_aux=k_aux), scale * e_hat
    )
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        auxk_reconstruction(
            pre[:, permutation], dead[permutation], weight[permutation], k_aux=k_aux
        ),
        e_hat,
    )


# --- masks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("blocked", [False, True])
def test_masked_rows_are_inert_and_equal_indexing(blocked, monkeypatch):
    if blocked:
        monkeypatch.setattr(_auxk_decode, "SELECT_ELEMENTS", 3 * 16)
    pre, dead, weight, residual = draw(10, 16, 4, seed=6)
    keep = torch.arange(10) % 3 != 1
    pre[~keep] = torch.nan
    residual[~keep] = torch.nan
    pre.requires_grad_()
    weight.requires_grad_()
    masked = auxk_loss(pre, dead, weight, residual, k_aux=4, mask=keep)
    indexed = auxk_loss(pre[keep], dead, weight, residual[keep], k_aux=4)
    torch.testing.assert_close(masked, indexed)
    torch.testing.assert_close(masked, loss_reference(pre, dead, weight, residual, 4, keep))
    grad_pre, grad_weight = torch.autograd.grad(masked, [pre, weight])
    expected_pre, expected_weight = torch.autograd.grad(indexed, [pre, weight])
    assert torch.equal(grad_pre[~keep], torch.zeros_like(grad_pre[~keep]))
    torch.testing.assert_close(grad_pre, expected_pre)
    torch.testing.assert_close(grad_weight, expected_weight)
    assert grad_weight.isfinite().all()


def test_fewer_than_two_kept_rows_give_nan():
    pre, dead, weight, residual = draw(4, 8, 3, seed=7)
    for kept in (0, 1):
        mask = torch.arange(4) < kept
        assert auxk_loss(pre, dead, weight, residual, k_aux=2, mask=mask).isnan()


# --- compile, memory ------------------------------------------------------------------------


@pytest.mark.compile
def test_compiled_matches_eager_without_recompiling():
    # Batch sizes change and so does the number of dead latents (none, some, all): 2 graphs.
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(auxk_loss, backend=counter, fullgraph=True)
    for batch, dead_count in zip((4, 5, 8, 13, 21), (3, 0, 12, 7, 1), strict=True):
        pre, _, weight, residual = draw(batch, 12, 5, seed=batch, dtype=torch.float32)
        dead = torch.arange(12) < dead_count
        mask = torch.arange(batch) % 3 != 1
        pre[1] = torch.nan  # a padded row
        residual[1] = torch.nan
        args = [t.clone().requires_grad_() for t in (pre, weight)]
        eager_args = [t.clone().requires_grad_() for t in (pre, weight)]
        result = compiled(args[0], dead, args[1], residual, k_aux=4, mask=mask)
        expected = auxk_loss(eager_args[0], dead, eager_args[1], residual, k_aux=4, mask=mask)
        torch.testing.assert_close(result, expected)
        assert result.isfinite().all()
        for a, e in zip(
            torch.autograd.grad(result, args),
            torch.autograd.grad(expected, eager_args),
            strict=True,
        ):
            torch.testing.assert_close(a, e)
            assert a.isfinite().all()
    assert counter.frame_count <= 2


@pytest.mark.parametrize("masked", [False, True])
def test_nothing_of_batch_by_latent_size_is_saved(masked):
    batch, latents, model, k_aux = 64, 512, 16, 8
    pre, dead, weight, residual = draw(batch, latents, model, seed=8, dtype=torch.float32)
    pre.requires_grad_()
    weight.requires_grad_()
    mask = torch.arange(batch) % 5 != 0 if masked else None
    with SavedTensors() as saved:
        loss = auxk_loss(pre, dead, weight, residual, k_aux=k_aux, mask=mask)
    beyond = saved.beyond([pre, weight, residual])
    assert beyond, "nothing saved: the hooks saw no autograd graph"
    # The largest are the (batch, k_aux) selection and ê, (batch, model).
    assert max(t.numel() for t in beyond) <= max(batch * k_aux, batch * model)
    loss.backward()
    assert pre.grad is not None
    assert weight.grad is not None


def allocations(run):
    """Sizes of every CPU allocation ``run()`` makes, from a torch.profiler memory trace."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        run()
    events = prof.profiler.kineto_results.events()
    return [e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0]


def test_the_eager_forward_allocates_no_batch_by_latent_float_tensor(monkeypatch):
    batch, latents = 256, 1024
    monkeypatch.setattr(_auxk_decode, "SELECT_ELEMENTS", 32 * latents)
    pre, dead, weight, residual = draw(batch, latents, 16, seed=9, dtype=torch.float32)
    pre.requires_grad_()
    sizes = allocations(lambda: auxk_loss(pre, dead, weight, residual, k_aux=8))
    assert sizes, "the profiler saw no allocation"
    # The largest temporary is a 32-row block of the masked pre-activations.
    assert max(sizes) <= 32 * latents * 4 < batch * latents


def test_benchmark_smoke_run():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_auxk.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "### AuxK forward + backward" in result.stdout
    assert "auxk_loss time / dense formula" in result.stdout
    assert "auxk_loss peak memory / dense formula" in result.stdout


# --- errors ---------------------------------------------------------------------------------

P, D, WD, R = (
    torch.zeros(4, 6),
    torch.zeros(6, dtype=torch.bool),
    torch.zeros(6, 3),
    torch.zeros(4, 3),
)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: reconstruction_unchecked(P[0], D, WD, k_aux=2),
            ValueError,
            r"`pre_activations` must have shape \(batch, latent\), got shape \(6,\)\.",
        ),
        (
            lambda: reconstruction_unchecked(P.long(), D, WD, k_aux=2),
            TypeError,
            r"`pre_activations` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: reconstruction_unchecked(P, D.float(), WD, k_aux=2),
            TypeError,
            r"`dead` must be a bool tensor, got a torch\.float32 tensor of shape \(6,\)\.",
        ),
        (
            lambda: reconstruction_unchecked(P, D[:5], WD, k_aux=2),
            ValueError,
            r"`dead` must have shape \(latent,\) = \(6,\), got shape \(5,\)\.",
        ),
        (
            lambda: reconstruction_unchecked(P, D, WD.T, k_aux=2),
            ValueError,
            r"`decoder_weight` must have shape \(latent, model\) = \(6, model\) with model >= 1, "
            r"got shape \(3, 6\)\.",
        ),
        (
            lambda: reconstruction_unchecked(P, D, WD.to("meta"), k_aux=2),
            ValueError,
            r"`decoder_weight` is on meta but `pre_activations` is on cpu\.",
        ),
        *[
            (
                lambda k=k: reconstruction_unchecked(P, D, WD, k_aux=k),
                ValueError,
                rf"`k_aux` must be a Python int from 1 to the number of latents \(6\), got {k}\.",
            )
            for k in (0, 7, 2.0, True)
        ],
        (
            lambda: loss_unchecked(P, D, WD, R[:3], k_aux=2),
            ValueError,
            r"`residual` must have shape \(batch, model\) = \(4, 3\), got shape \(3, 3\)\.",
        ),
        (
            lambda: loss_unchecked(P, D, WD, R, k_aux=2, mask=torch.ones(4)),
            TypeError,
            r"`mask` must be a bool tensor, got dtype torch\.float32\.",
        ),
        (
            lambda: loss_unchecked(P, D, WD, R, k_aux=2, mask=torch.ones(3, dtype=torch.bool)),
            ValueError,
            r"`mask` must have shape \(batch,\) = \(4,\), got \(3,\)\.",
        ),
    ],
    ids=[
        "pre 1-d",
        "pre integer",
        "dead float",
        "dead length",
        "decoder transposed",
        "decoder device",
        "k_aux 0",
        "k_aux too large",
        "k_aux float",
        "k_aux bool",
        "residual shape",
        "float mask",
        "mask length",
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_every_path_of_the_eager_selection_agrees(monkeypatch):
    # One call, blocks that divide the batch, a partial last block, one row a block.
    pre, dead, weight, _ = draw(12, 10, 3, seed=10)
    results = []
    for rows in (12, 4, 5, 1):
        monkeypatch.setattr(_auxk_decode, "SELECT_ELEMENTS", rows * 10)
        results.append(auxk_reconstruction(pre, dead, weight, k_aux=3))
    for a, b in itertools.pairwise(results):
        assert torch.equal(a, b)
