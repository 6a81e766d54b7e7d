"""matryoshka_l2: float64 references, the incremental backward against plain autograd of the
naive formula, gradcheck, masks, torch.func, compile, saved bytes, half precision and errors.

The reference decodes every prefix from scratch, ``b + z[:, :w] @ W[:w]``, in float64: nothing
of the incremental forward or of the walk-down backward is shared with it.
"""

import inspect
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter
from torch.func import grad, jacrev, vmap

from helpers import SavedTensors, randn
from sae_losses import l2_reconstruction, matryoshka_l2

ROOT = Path(__file__).resolve().parent.parent
BATCH, D_SAE, D_MODEL = 7, 12, 5
WIDTHS = [2, 5, 9, 12]


def naive_rows(z, w_dec, x, b_dec, widths):
    """``(batch, G)``: each prefix decoded from scratch, then the mean squared error."""
    bias = 0 if b_dec is None else b_dec
    return torch.stack([(bias + z[:, :w] @ w_dec[:w] - x).square().mean(-1) for w in widths], -1)


def reference(z, w_dec, x, b_dec, widths, reduce="mean", mask=None):
    """The float64 naive rows, weighted by the mask (exactly 0 where it is 0), then reduced."""
    rows = naive_rows(z.double(), w_dec.double(), x.double(), _double(b_dec), widths)
    w = torch.ones(rows.shape[0], dtype=torch.float64) if mask is None else mask.double()
    rows = torch.where(w[:, None] != 0, rows * w[:, None], 0)
    return {"none": rows, "sum": rows.sum(0), "mean": rows.sum(0) / w.sum()}[reduce]


def _double(t):
    return None if t is None else t.double()


def inputs(batch=BATCH, d_sae=D_SAE, d_model=D_MODEL, dtype=torch.float64, seed=0, grad=True):
    """Sparse non-negative latents (a third exact zeros), a decoder, a source and a bias."""
    z = randn(batch, d_sae, dtype=torch.float64, seed=seed).relu() + 0.0
    z = torch.where(z < 0.3, 0, z)
    tensors = [
        z,
        randn(d_sae, d_model, dtype=torch.float64, seed=seed + 1) / d_model**0.5,
        randn(batch, d_model, dtype=torch.float64, seed=seed + 2),
        randn(d_model, dtype=torch.float64, seed=seed + 3),
    ]
    return [t.to(dtype).requires_grad_(grad) for t in tensors]


def call(z, w_dec, x, b_dec, widths=WIDTHS, **options):
    return matryoshka_l2(z, w_dec, x, widths=widths, decoder_bias=b_dec, **options)


# --- values --------------------------------------------------------------------------------------


def test_hand_worked_prefixes():
    z = torch.tensor([[1.0, 2.0, 0.5]])
    w_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    x = torch.tensor([[1.0, 3.0]])
    # Width 1: (1, 0) - (1, 3) = (0, -3), mean 4.5. Width 2: (1, 2): (0, -1), 0.5.
    # Width 3: (2, 3): (1, 0), 0.5. With bias (1, 1), width 2: (2, 3): (1, 0), 0.5.
    none = matryoshka_l2(z, w_dec, x, widths=[1, 2, 3], reduce="none")
    assert torch.equal(none, torch.tensor([[4.5, 0.5, 0.5]]))
    biased = matryoshka_l2(z, w_dec, x, widths=(2,), decoder_bias=torch.ones(2), reduce="none")
    assert torch.equal(biased, torch.tensor([[0.5]]))


@pytest.mark.parametrize("reduce", ["none", "mean", "sum"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("widths", [WIDTHS, [12], [3], [1, 4, 7]])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(reduce, dtype, rtol, widths, bias):
    z, w_dec, x, b_dec = inputs(dtype=dtype, grad=False)
    b_dec = b_dec if bias else None
    result = call(z, w_dec, x, b_dec, widths, reduce=reduce)
    expected = reference(z, w_dec, x, b_dec, widths, reduce)
    assert result.dtype == dtype
    assert result.shape == ((BATCH, len(widths)) if reduce == "none" else (len(widths),))
    torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=0)


def test_the_last_width_d_sae_is_the_full_reconstructions_l2():
    z, w_dec, x, b_dec = inputs(grad=False)
    full = l2_reconstruction(z @ w_dec + b_dec, x, reduce="none")
    torch.testing.assert_close(
        call(z, w_dec, x, b_dec, reduce="none")[:, -1], full, rtol=1e-13, atol=0
    )


@settings(max_examples=40, deadline=None)
@given(
    widths=st.sets(st.integers(1, D_SAE), min_size=1, max_size=6).map(sorted),
    batch=st.integers(0, 9),
    cut=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_each_entry_depends_on_its_own_width_only_and_sums_over_a_split(widths, batch, cut, seed):
    # Laws: column i equals the call with widths[i] alone, and "sum" is additive over the batch.
    z, w_dec, x, b_dec = inputs(batch=batch, seed=seed, grad=False)
    rows = call(z, w_dec, x, b_dec, widths, reduce="none")
    for i, w in enumerate(widths):
        torch.testing.assert_close(rows[:, i], call(z, w_dec, x, b_dec, [w], reduce="none")[:, 0])
    cut = min(cut, batch)
    parts = [slice(None, cut), slice(cut, None)]
    split = sum(call(z[p], w_dec, x[p], b_dec, widths, reduce="sum") for p in parts)
    torch.testing.assert_close(call(z, w_dec, x, b_dec, widths, reduce="sum"), split)


def test_empty_batch():
    z, w_dec, x, b_dec = inputs(batch=0)
    assert call(z, w_dec, x, b_dec, reduce="none").shape == (0, len(WIDTHS))
    assert torch.equal(call(z, w_dec, x, b_dec, reduce="sum"), torch.zeros(4, dtype=torch.float64))
    assert call(z, w_dec, x, b_dec).isnan().all()
    call(z, w_dec, x, b_dec, reduce="sum").sum().backward()
    assert torch.equal(w_dec.grad, torch.zeros_like(w_dec))


def test_non_contiguous_inputs():
    z, w_dec, x, b_dec = inputs(grad=False)
    zt, wt, xt = z.T.contiguous().T, w_dec.T.contiguous().T, x.T.contiguous().T
    assert not zt.is_contiguous()
    torch.testing.assert_close(
        call(zt, wt, xt, b_dec), reference(z, w_dec, x, b_dec, WIDTHS), rtol=1e-12, atol=0
    )


# --- gradients -----------------------------------------------------------------------------------

GRAD_WIDTHS = [WIDTHS, [12], [4], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 10]]


def naive_grads(tensors, widths, cotangent, mask=None):
    """Plain autograd of the naive formula (every prefix decoded from scratch), indexed rows."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    z, w_dec, x, b_dec = leaves
    keep = slice(None) if mask is None else mask != 0
    weight = 1 if mask is None else mask[keep, None].double()
    rows = naive_rows(z[keep], w_dec, x[keep], b_dec, widths) * weight
    grads = torch.autograd.grad(rows, leaves, cotangent[keep])
    return grads


@pytest.mark.parametrize("widths", GRAD_WIDTHS, ids=str)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_incremental_backward_equals_autograd_of_the_naive_formula(widths, mask_kind):
    tensors = inputs(seed=4)
    mask = {None: None, "bool": torch.arange(BATCH) % 3 != 1}.get(mask_kind)
    if mask_kind == "float":
        mask = torch.linspace(0.5, 2.0, BATCH, dtype=torch.float64) * (torch.arange(BATCH) % 3 != 1)
    cotangent = randn(BATCH, len(widths), dtype=torch.float64, seed=5)
    rows = call(*tensors, widths, reduce="none", mask=mask)
    found = torch.autograd.grad(rows, tensors, cotangent)
    for got, want in zip(found, naive_grads(tensors, widths, cotangent, mask), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # Latents and decoder rows beyond the last width get exactly 0.
    assert torch.equal(found[0][:, widths[-1] :], torch.zeros_like(found[0][:, widths[-1] :]))
    assert torch.equal(found[1][widths[-1] :], torch.zeros_like(found[1][widths[-1] :]))
    assert found[1][: widths[-1]].abs().sum() > 0


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("widths", [WIDTHS, [7]], ids=str)
def test_gradcheck_every_input(widths, mask_kind):
    tensors = inputs(batch=4, d_sae=8, d_model=3, seed=6)
    keep = torch.tensor([True, False, True, True])
    mask = {None: None, "bool": keep, "float": keep * torch.tensor([0.5, 1.0, 2.0, 1.5]).double()}[
        mask_kind
    ]
    widths = [w for w in widths if w <= 8] or [8]
    assert torch.autograd.gradcheck(lambda *t: call(*t, widths, reduce="none", mask=mask), tensors)
    assert torch.autograd.gradgradcheck(lambda *t: call(*t, widths, mask=mask), tensors)


def test_gradcheck_without_bias_and_in_a_retained_graph():
    z, w_dec, x, _ = inputs(batch=4, d_sae=8, d_model=3, seed=7)
    assert torch.autograd.gradcheck(lambda *t: call(*t, None, [2, 8], reduce="sum"), (z, w_dec, x))
    total = call(z, w_dec, x, None, [2, 8]).sum()
    first = torch.autograd.grad(total, (z, w_dec), retain_graph=True)
    second = torch.autograd.grad(total, (z, w_dec))  # the saved residuals were not overwritten
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_torch_func_grad_jacrev_and_vmap_match_eager():
    z, w_dec, x, b_dec = (t.detach() for t in inputs(seed=8))

    def loss(z, w_dec):
        return call(z, w_dec, x, b_dec).sum()

    found = grad(loss, argnums=(0, 1))(z, w_dec)
    expected = naive_grads(
        [z, w_dec, x, b_dec], WIDTHS, torch.ones(BATCH, 4, dtype=torch.float64) / BATCH
    )
    for got, want in zip(found, expected[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    jacobian = jacrev(lambda z: call(z, w_dec, x, b_dec, reduce="none"))(z)
    naive = jacrev(lambda z: naive_rows(z, w_dec, x, b_dec, WIDTHS))(z)
    torch.testing.assert_close(jacobian, naive, rtol=1e-12, atol=1e-14)
    hessian = jacrev(jacrev(lambda w: call(z, w, x, b_dec).sum()))(w_dec)
    naive = jacrev(jacrev(lambda w: naive_rows(z, w, x, b_dec, WIDTHS).mean(0).sum()))(w_dec)
    torch.testing.assert_close(hessian, naive, rtol=1e-12, atol=1e-14)
    stacked = torch.stack([z, z.flip(0)])
    batched = vmap(grad(loss))(stacked, w_dec.expand(2, *w_dec.shape))
    for i in range(2):
        torch.testing.assert_close(batched[i], grad(loss)(stacked[i], w_dec))


def test_forward_mode_is_a_clear_error():
    z, w_dec, x, b_dec = (t.detach() for t in inputs())
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda z: call(z, w_dec, x, b_dec), (z,), (torch.ones_like(z),))


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["none", "mean", "sum"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_masked_rows_are_inert_and_the_mask_equals_indexing(reduce, fill):
    tensors = inputs(seed=9)
    keep = torch.arange(BATCH) % 3 != 1
    dirty = [t.detach().clone() for t in tensors]
    dirty[0][1], dirty[2][4] = fill, fill  # a latent row and a source row the mask drops
    dirty = [t.requires_grad_() for t in dirty]
    result = call(*dirty, reduce=reduce, mask=keep)
    indexed = call(tensors[0][keep], tensors[1], tensors[2][keep], tensors[3], reduce=reduce)
    if reduce == "none":
        assert torch.equal(result[~keep], torch.zeros_like(result[~keep]))
        result, full = result[keep], result
    else:
        full = result
    torch.testing.assert_close(result, indexed, rtol=1e-12, atol=0)
    got = torch.autograd.grad(full.sum(), dirty)
    want = torch.autograd.grad(indexed.sum(), tensors)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.isfinite().all()
        if i in (0, 2):  # batched: the dropped rows get exactly 0, as indexing gives them
            assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_float_weights_and_all_zero_weights():
    tensors = inputs(seed=10, grad=False)
    weights = torch.rand(BATCH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights[2] = 0.0
    for reduce in ("none", "mean", "sum"):
        torch.testing.assert_close(
            call(*tensors, reduce=reduce, mask=weights),
            reference(*tensors, WIDTHS, reduce, weights),
            rtol=1e-12,
            atol=0,
        )
    leaves = [t.requires_grad_() for t in tensors]
    zero = call(*leaves, mask=torch.zeros(BATCH, dtype=torch.float64))
    assert zero.isnan().all()
    for g in torch.autograd.grad(zero.sum(), leaves):
        assert torch.equal(g, torch.zeros_like(g))


# --- compile -------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_compiled_matches_eager_with_at_most_two_graphs_across_batch_sizes(mask_kind):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(
        lambda z, w, x, b, mask: call(z, w, x, b, mask=mask), backend=counter, fullgraph=True
    )
    for batch in (4, 5, 8, 13):
        tensors = [t.detach().float() for t in inputs(batch=batch, seed=batch)]
        tensors[0][batch - 1] = torch.nan  # a padded row
        keep = torch.arange(batch) % 3 != 1
        keep[batch - 1] = False
        mask = keep if mask_kind == "bool" else keep * torch.linspace(0.5, 2.0, batch)
        leaves = [t.clone().requires_grad_() for t in tensors]
        eager_leaves = [t.clone().requires_grad_() for t in tensors]
        result = compiled(*leaves, mask)
        expected = call(*eager_leaves, mask=mask)
        torch.testing.assert_close(result, expected)
        result.sum().backward()
        expected.sum().backward()
        for a, e in zip(leaves, eager_leaves, strict=True):
            assert a.grad.isfinite().all()
            torch.testing.assert_close(a.grad, e.grad)
    assert counter.frame_count <= 2


@pytest.mark.compile
def test_inductor_compiles_it_into_a_training_step():
    torch._dynamo.reset()
    tensors = [t.detach().float().requires_grad_() for t in inputs(seed=11)]
    compiled = torch.compile(lambda *t: call(*t).sum(), fullgraph=True)
    compiled(*tensors).backward()
    expected = [t.detach().clone().requires_grad_() for t in tensors]
    call(*expected).sum().backward()
    for a, e in zip(tensors, expected, strict=True):
        torch.testing.assert_close(a.grad, e.grad)


# --- what is saved for backward ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "residuals"),
    [([96], 1), ([8, 24, 48, 96], 2), (list(range(8, 97, 8)), 2), ([4, 40], 2)],
)
@pytest.mark.parametrize("mask", [None, "bool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_the_inputs_and_at_most_two_residuals(widths, residuals, mask, dtype):
    batch, d_sae, d_model = 64, 96, 16
    tensors = inputs(batch, d_sae, d_model, dtype=dtype)
    mask = None if mask is None else torch.arange(batch) % 2 == 0
    with SavedTensors() as saved:
        call(*tensors, widths, mask=mask)
    beyond = saved.beyond(tensors, min_numel=2 * batch)
    # Whatever G: one or two (batch, d_model) residuals, accumulated in float32 for bfloat16.
    assert [tuple(t.shape) for t in beyond] == [(batch, d_model)] * residuals
    assert all(t.dtype == torch.float32 for t in beyond)
    # Beyond them, only the mean's 0-d denominator and its test (the mask is an input too).
    given = tensors if mask is None else [*tensors, mask]
    assert saved.bytes_beyond(given) <= residuals * batch * d_model * 4 + 8


# --- half precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_within_half_rounding_of_float64(dtype):
    tensors = inputs(batch=16, d_sae=32, d_model=8, dtype=dtype, seed=12)
    widths = [4, 8, 16, 32]
    result = call(*tensors, widths, reduce="none")
    assert result.dtype == torch.float32
    # Each segment's decode is rounded to half once, as latents @ decoder_weight would be.
    torch.testing.assert_close(
        result.double(), reference(*tensors, widths, "none"), rtol=3e-2, atol=1e-3
    )
    grads = torch.autograd.grad(result.sum(), tensors)
    assert [g.dtype for g in grads] == [dtype] * 4
    want = naive_grads(
        [t.double() for t in tensors], widths, torch.ones(16, 4, dtype=torch.float64)
    )
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


def test_half_inputs_accumulate_the_reconstruction_in_float32():
    # Eight segments each add 0.5 to a bias of 256. In bfloat16, 256 + 0.5 rounds back to 256
    # (the spacing there is 2), so a half-precision running reconstruction would stay at 256.
    d_sae = 8
    z = torch.ones(1, d_sae, dtype=torch.bfloat16)
    w_dec = torch.full((d_sae, 1), 0.5, dtype=torch.bfloat16)
    x = torch.zeros(1, 1, dtype=torch.bfloat16)
    b_dec = torch.full((1,), 256.0, dtype=torch.bfloat16)
    rows = call(z, w_dec, x, b_dec, list(range(1, d_sae + 1)), reduce="none")
    assert torch.equal(rows[0], torch.tensor([(256 + 0.5 * k) ** 2 for k in range(1, d_sae + 1)]))


def test_mixed_dtypes_promote():
    z, w_dec, x, b_dec = inputs(grad=False)
    result = call(z.float(), w_dec, x.float(), b_dec.float())
    assert result.dtype == torch.float64
    torch.testing.assert_close(
        result, reference(z.float(), w_dec, x, b_dec, WIDTHS), rtol=1e-6, atol=0
    )


# --- DTensor -------------------------------------------------------------------------------------

PLACEMENTS = {  # latents, decoder_weight, source, decoder_bias, mask
    "batch": ("S0", "R", "S0", "R", "S0"),
    "latent (tensor parallel)": ("S1", "S0", "R", "R", "R"),
    "replicated": ("R", "R", "R", "R", "R"),
}


def dtensor_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from spawn import init_gloo, write_json

    init_gloo(rank, world_size, port)
    mesh = init_device_mesh("cpu", (world_size,))
    kinds = {"R": [Replicate()], "S0": [Shard(0)], "S1": [Shard(1)]}
    outcomes = {}
    for name, placements in PLACEMENTS.items():
        for masked in (False, True):
            full = [t.detach().float().requires_grad_() for t in inputs(batch=8, seed=13)]
            keep = (torch.arange(8) % 3 != 1) if masked else None
            expected = call(*full, mask=keep)
            expected.sum().backward()
            sharded = [
                distribute_tensor(t.detach(), mesh, kinds[p]).requires_grad_()
                for t, p in zip(full, placements, strict=False)
            ]
            mask = None if keep is None else distribute_tensor(keep, mesh, kinds[placements[4]])
            try:
                result = call(*sharded, mask=mask).full_tensor()
                result.sum().backward()
                torch.testing.assert_close(result, expected.detach())
                for d, t in zip(sharded, full, strict=True):
                    torch.testing.assert_close(d.grad.full_tensor(), t.grad)
                outcomes[f"{name}, mask={masked}"] = "ok"
            except Exception as error:  # the parent asserts on what was raised
                outcomes[f"{name}, mask={masked}"] = f"{type(error).__name__}: {error}"[:1000]
    write_json(f"{out_dir}/{rank}.json", outcomes)
    dist.destroy_process_group()


def test_dtensor_values_and_gradients_equal_the_full_tensor_computation(tmp_path):
    from spawn import read_json, start_ranks

    exit_codes = start_ranks(dtensor_worker, 2, tmp_path)
    for rank in range(2):
        outcomes = read_json(tmp_path / f"{rank}.json")
        assert outcomes is not None, f"rank {rank} wrote nothing (exit codes {exit_codes})"
        assert len(outcomes) == 2 * len(PLACEMENTS)
        assert set(outcomes.values()) == {"ok"}, outcomes


# --- errors --------------------------------------------------------------------------------------

# The body's own checks, without the runtime type check's wrapper (which would catch some first).
unchecked = inspect.unwrap(matryoshka_l2)


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ([], r"`widths` must be a non-empty list of Python ints, got \[\]"),
        (5, "`widths` must be a non-empty list of Python ints, got 5"),
        ([2, 4.0], r"Python ints, got \[2, 4.0\]"),
        ([True, 4], r"Python ints, got \[True, 4\]"),
        (torch.tensor([2, 4]), "Python ints, got tensor"),
        ("abc", "Python ints, got 'abc'"),
        ([4, 4], r"`widths` must be strictly increasing, got \[4, 4\]"),
        ([6, 3], r"strictly increasing, got \[6, 3\]"),
        ([0, 3], r"`widths` must lie in 1..d_sae = 1..12 \(latents.shape\[1\]\), got \[0, 3\]"),
        ([-1], r"1..12 \(latents.shape\[1\]\), got \[-1\]"),
        ([3, 13], r"1..12 \(latents.shape\[1\]\), got \[3, 13\]"),
    ],
)
def test_bad_widths_are_value_errors(widths, message):
    z, w_dec, x, _ = inputs(grad=False)
    with pytest.raises(ValueError, match=message):
        unchecked(z, w_dec, x, widths=widths)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"z": torch.ones(7, 12, 1)},
            ValueError,
            r"`latents` must have shape \(batch, d_sae\), got \(7, 12, 1\)",
        ),
        (
            {"x": torch.ones(7, 5, 1)},
            ValueError,
            r"`source` must have shape \(batch, d_model\), got \(7, 5, 1\)",
        ),
        (
            {"x": torch.ones(6, 5)},
            ValueError,
            r"`source` must have shape \(batch, d_model\) = \(7, 5\), got \(6, 5\)",
        ),
        ({"x": torch.ones(7, 0)}, ValueError, r"`source` has an empty feature axis"),
        (
            {"w": torch.ones(5, 12)},
            ValueError,
            r"`decoder_weight` must have shape \(d_sae, d_model\) = \(12, 5\), got \(5, 12\)",
        ),
        (
            {"b": torch.ones(12)},
            ValueError,
            r"`decoder_bias` must have shape \(d_model,\) = \(5,\), got \(12,\)",
        ),
        (
            {"z": torch.ones(7, 12, dtype=torch.int64)},
            TypeError,
            "`latents` must be a floating-point tensor",
        ),
        ({"w": [[1.0]]}, TypeError, "`decoder_weight` must be a torch.Tensor, got list"),
        (
            {"b": torch.ones(5, dtype=torch.float8_e4m3fn)},
            TypeError,
            "`decoder_bias` has dtype torch.float8_e4m3fn",
        ),
        (
            {"w": torch.ones(12, 5, device="meta")},
            ValueError,
            "`decoder_weight` is on meta but `latents` is on cpu",
        ),
        ({"reduce": "max"}, ValueError, "`reduce` must be one of"),
        (
            {"mask": torch.ones(6, dtype=torch.bool)},
            ValueError,
            r"`mask` must have shape \(batch,\) = \(7,\)",
        ),
        (
            {"mask": torch.ones(7, dtype=torch.int64)},
            TypeError,
            "`mask` must be a bool or floating",
        ),
    ],
)
def test_bad_inputs_name_the_argument(change, error, message):
    z, w_dec, x, b_dec = inputs(dtype=torch.float32, grad=False)
    z, w_dec, x, b_dec = (
        change.get(k, v) for k, v in zip("zwxb", (z, w_dec, x, b_dec), strict=True)
    )
    options = {k: change[k] for k in ("reduce", "mask") if k in change}
    with pytest.raises(error, match=message):
        unchecked(z, w_dec, x, widths=[3], decoder_bias=b_dec, **options)


def test_the_runtime_type_check_reads_the_shapes(request):
    if request.config.getoption("--no-typecheck"):
        pytest.skip("this pass runs without the import hook")
    import jaxtyping

    z, w_dec, x, _ = inputs(grad=False)
    with pytest.raises(jaxtyping.TypeCheckError):
        matryoshka_l2(z, w_dec.T, x, widths=[3])


# --- the benchmark script ------------------------------------------------------------------------


def test_benchmark_smoke_run_prints_every_figure():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_matryoshka.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("time against bound", "time against SAELens", "time against dictionary_learning"):
        assert f"- {line}" in result.stdout
    assert result.stdout.count("- peak memory against") == 3
