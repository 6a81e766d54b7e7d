"""Tests for l2_reconstruction and l1_absolute against float64 references and the seed's cases."""

import inspect
import pathlib

import hypothesis.strategies as st
import jaxtyping
import pytest
import torch
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter

import sae_losses
from helpers import l1_reference, l2_reference, randn
from sae_losses import (
    _rowops,
    fused_l1_absolute,
    fused_l2_reconstruction,
    l1_absolute,
    l2_reconstruction,
)

# The suite runs with the jaxtyping + beartype hook on, which rejects bad shapes and dtypes
# before the function body runs. The error-message tests call the bodies directly.
l2_unchecked = inspect.unwrap(l2_reconstruction)
l1_unchecked = inspect.unwrap(l1_absolute)

REDUCE_MODES = ["none", "mean", "sum"]
SHAPES = [(5, 7), (4, 3, 6), (3, 2, 4, 5), (1, 1)]


# --- the seed library's published cases -----------------------------------------------------


def test_seed_l2_example():
    # sparse_autoencoder's L2ReconstructionLoss docstring: MSEs of 4 and 2, mean 3.
    source = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])
    decoded = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    torch.testing.assert_close(l2_reconstruction(decoded, source), torch.tensor([3.0]))
    torch.testing.assert_close(
        l2_reconstruction(decoded, source, reduce="none"), torch.tensor([[4.0], [2.0]])
    )


def test_seed_l1_example():
    # sparse_autoencoder's L1AbsoluteLoss docstring: L1 of 2 and 1, mean 1.5.
    learned = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
    torch.testing.assert_close(l1_absolute(learned), torch.tensor([1.5]))


@pytest.mark.parametrize("num_components", [1, 2])
@pytest.mark.parametrize(
    ("fill_decoded", "fill_source", "expected"),
    [(0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (-1.0, 1.0, 4.0), (1.0, -1.0, 4.0)],
)
def test_seed_l2_constant_cases(num_components, fill_decoded, fill_source, expected):
    # Constant inputs: every squared error is (fill_decoded - fill_source)^2, so is every mean.
    decoded = torch.full((3, num_components, 5), fill_decoded)
    source = torch.full((3, num_components, 5), fill_source)
    torch.testing.assert_close(
        l2_reconstruction(decoded, source), torch.full((num_components,), expected)
    )


@pytest.mark.parametrize("num_components", [1, 2])
@pytest.mark.parametrize(("fill", "expected"), [(0.0, 0.0), (1.0, 4.0), (-1.0, 4.0)])
def test_seed_l1_constant_cases(num_components, fill, expected):
    # 4 features of |fill| each: the per-row sum is 4 |fill|, and so is the mean over rows.
    learned = torch.full((3, num_components, 4), fill)
    torch.testing.assert_close(l1_absolute(learned), torch.full((num_components,), expected))


def test_seed_composed_sae_loss():
    # Zeros source and ones decoded give L2 = 1 per component; 4 learned features of 1 give
    # L1 = 4, so l2 + 0.01 * l1 = 1.04 for each of the 2 components.
    source = torch.zeros(2, 2, 2)
    decoded = torch.ones(2, 2, 2)
    learned = torch.ones(2, 2, 4)
    loss = l2_reconstruction(decoded, source) + 0.01 * l1_absolute(learned)
    torch.testing.assert_close(loss, torch.tensor([1.04, 1.04]))


# --- float64 references across shapes, reduce modes and dtypes ------------------------------

DTYPE_TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float16: 1e-5,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES))
def test_l2_matches_float64_reference(shape, reduce, dtype):
    decoded, source = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    result = l2_reconstruction(decoded, source, reduce=reduce)
    # Half inputs are compared with the float64 result on the same (rounded) inputs.
    expected = l2_reference(decoded, source, reduce)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.shape == expected.shape
    rtol = DTYPE_TOLERANCES[dtype]
    torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCES))
def test_l1_matches_float64_reference(shape, reduce, dtype):
    learned = randn(*shape, dtype=dtype, seed=3)
    result = l1_absolute(learned, reduce=reduce)
    expected = l1_reference(learned, reduce)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.shape == expected.shape
    torch.testing.assert_close(result.double(), expected, rtol=DTYPE_TOLERANCES[dtype], atol=0)


def test_result_shapes_follow_the_component_axes():
    x = torch.ones(8, 3, 2, 5)  # (batch, seq, component, feature)
    assert l2_reconstruction(x, x, reduce="none").shape == (8, 3, 2)
    assert l2_reconstruction(x, x).shape == (3, 2)
    assert l1_absolute(x, reduce="sum").shape == (3, 2)
    assert l1_absolute(x[:, 0, 0]).shape == ()


def test_mixed_dtypes_promote_then_accumulate_in_float32():
    decoded, source = randn(6, 9, dtype=torch.bfloat16, seed=4), randn(6, 9, seed=5)
    result = l2_reconstruction(decoded, source, reduce="none")
    assert result.dtype == torch.float32
    torch.testing.assert_close(
        result.double(), l2_reference(decoded, source, "none"), rtol=1e-5, atol=0
    )


def test_half_precision_differences_are_not_rounded_to_half():
    # 256 and 2^-8 are exact in bf16 but their difference is not (it needs 17 mantissa bits):
    # rounded to bf16 it would be 256 and the mean squared error 32768, not 255.99609375^2 / 2.
    decoded = torch.tensor([[256.0, 0.0]], dtype=torch.bfloat16)
    source = torch.tensor([[2.0**-8, 0.0]], dtype=torch.bfloat16)
    expected = (256.0 - 2.0**-8) ** 2 / 2
    assert l2_reconstruction(decoded, source).item() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("reduce", REDUCE_MODES)
def test_many_row_blocks_give_the_same_result(monkeypatch, reduce):
    # Force blocks of 2 rows, so the blocked loop, its last partial block and the output slices
    # are all exercised on small inputs.
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * 3 * 4)
    decoded, source = randn(9, 3, 4, seed=6), randn(9, 3, 4, seed=7)
    # float32 results: a few roundings (the blocked L2 takes a norm, then squares it).
    for requires_grad in (False, True):
        d = decoded.clone().requires_grad_(requires_grad)
        torch.testing.assert_close(
            l2_reconstruction(d, source, reduce=reduce).double(),
            l2_reference(decoded, source, reduce),
            rtol=1e-6,
            atol=0,
        )
        torch.testing.assert_close(
            l1_absolute(d, reduce=reduce).double(), l1_reference(decoded, reduce), rtol=1e-6, atol=0
        )


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 12),
    features=st.integers(1, 9),
    cut=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
def test_sum_over_a_batch_is_the_sum_over_any_split(batch, features, cut, seed):
    cut = min(cut, batch)
    decoded, source = (
        randn(batch, features, dtype=torch.float64, seed=seed),
        randn(batch, features, dtype=torch.float64, seed=seed + 1),
    )
    whole = l2_reconstruction(decoded, source, reduce="sum")
    parts = l2_reconstruction(decoded[:cut], source[:cut], reduce="sum") + l2_reconstruction(
        decoded[cut:], source[cut:], reduce="sum"
    )
    torch.testing.assert_close(whole, parts)
    torch.testing.assert_close(
        l1_absolute(decoded, reduce="sum"),
        l1_absolute(decoded[:cut], reduce="sum") + l1_absolute(decoded[cut:], reduce="sum"),
    )


# --- empty batches, layout, inputs left alone -----------------------------------------------


def test_empty_batch():
    x = torch.ones(0, 3, 4)
    assert l2_reconstruction(x, x, reduce="none").shape == (0, 3)
    torch.testing.assert_close(l2_reconstruction(x, x, reduce="sum"), torch.zeros(3))
    assert torch.isnan(l2_reconstruction(x, x, reduce="mean")).all()
    assert l1_absolute(x, reduce="none").shape == (0, 3)
    torch.testing.assert_close(l1_absolute(x, reduce="sum"), torch.zeros(3))
    assert torch.isnan(l1_absolute(x)).all()


def test_non_contiguous_inputs():
    base_d, base_s = randn(6, 10, 8, seed=8), randn(6, 10, 8, seed=9)
    decoded, source = base_d.transpose(0, 1)[:, ::2], base_s.transpose(0, 1)[:, ::2]
    assert not decoded.is_contiguous()
    torch.testing.assert_close(
        l2_reconstruction(decoded, source, reduce="none").double(),
        l2_reference(decoded, source, "none"),
    )
    torch.testing.assert_close(
        l1_absolute(decoded, reduce="none").double(), l1_reference(decoded, "none")
    )


def test_inputs_are_not_modified():
    decoded = randn(4, 2, 5, dtype=torch.bfloat16, seed=10).requires_grad_()
    source = randn(4, 2, 5, dtype=torch.bfloat16, seed=11)
    before = decoded.detach().clone(), source.clone()
    loss = l2_reconstruction(decoded, source).sum() + l1_absolute(decoded).sum()
    loss.backward()
    assert torch.equal(decoded.detach(), before[0])
    assert torch.equal(source, before[1])


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4)])
def test_gradcheck(reduce, shape):
    decoded = randn(*shape, dtype=torch.float64, seed=12).requires_grad_()
    source = randn(*shape, dtype=torch.float64, seed=13).requires_grad_()
    # Keep |learned| away from 0, where |z| has no derivative for finite differences to find.
    learned = randn(*shape, dtype=torch.float64, seed=14)
    learned = ((learned.abs() + 0.1) * learned.sign()).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda d, s: l2_reconstruction(d, s, reduce=reduce), (decoded, source)
    )
    assert torch.autograd.gradcheck(lambda z: l1_absolute(z, reduce=reduce), (learned,))
    assert torch.autograd.gradgradcheck(
        lambda d, s: l2_reconstruction(d, s, reduce=reduce), (decoded, source)
    )


def test_closed_form_gradients():
    decoded = torch.tensor([[1.0, 3.0], [0.0, -2.0]], requires_grad=True)
    source = torch.tensor([[0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    l2_reconstruction(decoded, source).backward()
    # d/dd mean_b mean_f (d - s)^2 = 2 (d - s) / (F B) = (d - s) / 2 here.
    torch.testing.assert_close(decoded.grad, torch.tensor([[0.5, 1.0], [0.0, -1.0]]))
    torch.testing.assert_close(source.grad, -decoded.grad)

    learned = torch.tensor([[2.0, 0.0, -3.0]], requires_grad=True)
    l1_absolute(learned, reduce="sum").backward()
    torch.testing.assert_close(learned.grad, torch.tensor([[1.0, 0.0, -1.0]]))  # 0 at z = 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gradients_flow_back_in_the_input_dtype(dtype):
    decoded = randn(3, 4, dtype=dtype, seed=15).requires_grad_()
    source = randn(3, 4, dtype=dtype, seed=16).requires_grad_()
    (l2_reconstruction(decoded, source) + l1_absolute(decoded)).backward()
    assert decoded.grad.dtype == dtype
    assert source.grad.dtype == dtype
    expected = 2 * (decoded.double() - source.double()) / (4 * 3) + decoded.double().sign() / 3
    torch.testing.assert_close(decoded.grad.double(), expected, rtol=1e-2, atol=1e-2)


def test_only_the_inputs_are_saved_for_backward():
    decoded = randn(64, 32, seed=17).requires_grad_()
    source = randn(64, 32, seed=18)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = l2_reconstruction(decoded, source) + l1_absolute(decoded)
    big = [t for t in saved if t.numel() >= decoded.numel()]
    assert all(t.data_ptr() in {decoded.data_ptr(), source.data_ptr()} for t in big), [
        tuple(t.shape) for t in big
    ]
    loss.backward()  # the hooks did not break the graph


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(2, 4)),
            ValueError,
            r"`decoded` and `source` must have the same shape, got \(2, 3\) and \(2, 4\)\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(1, 3)),
            ValueError,
            r"same shape, got \(2, 3\) and \(1, 3\)\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(3), torch.ones(3)),
            ValueError,
            r"`decoded` must have shape \(batch, \*component, feature\) "
            r"with at least 2 dimensions, got shape \(3,\)\.",
        ),
        (
            lambda: l1_unchecked(torch.tensor(1.0)),
            ValueError,
            r"`learned` must have shape .*\(\)\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 0), torch.ones(2, 0)),
            ValueError,
            r"`decoded` has an empty feature axis: shape \(2, 0\)\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 0)),
            ValueError,
            r"`learned` has an empty feature axis",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int64)),
            TypeError,
            r"`source` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3, dtype=torch.bool)),
            TypeError,
            r"`learned` must be a floating-point tensor, got dtype torch\.bool\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3, dtype=torch.complex64)),
            TypeError,
            r"got dtype torch\.complex64\.",
        ),
        (
            lambda: l2_unchecked([[1.0]], torch.ones(1, 1)),
            TypeError,
            r"`decoded` must be a torch\.Tensor, got list\.",
        ),
        (
            lambda: l1_unchecked(torch.ones(2, 3), reduce="batchmean"),
            ValueError,
            r"`reduce` must be one of 'none', 'mean' or 'sum', got 'batchmean'\.",
        ),
        (
            lambda: l2_unchecked(torch.ones(2, 3), torch.ones(2, 3), reduce=True),
            ValueError,
            r"`reduce` must be one of 'none', 'mean' or 'sum', got True\.",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_runtime_type_check_is_on_in_the_suite(request):
    if request.config.getoption("--no-typecheck"):
        pytest.skip("this pass runs without the import hook")
    # The hook's check fires before the body: a shape mismatch between the two annotated
    # arguments is caught by jaxtyping itself.
    with pytest.raises(jaxtyping.TypeCheckError):
        sae_losses.l2_reconstruction(torch.ones(2, 3), torch.ones(2, 4))


# --- torch.compile -------------------------------------------------------------------------------


@pytest.mark.compile
def test_compiled_losses_do_not_recompile_across_batch_sizes():
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def sae_loss(decoded, source, learned):
        return l2_reconstruction(decoded, source) + 0.01 * l1_absolute(learned)

    for batch in (2, 3, 5, 8, 13, 21):
        decoded, source, learned = (
            randn(batch, 2, 6, seed=batch),
            randn(batch, 2, 6),
            randn(batch, 2, 10),
        )
        expected = l2_reference(decoded, source, "mean") + 0.01 * l1_reference(learned, "mean")
        torch.testing.assert_close(sae_loss(decoded, source, learned).double(), expected)
    assert counter.frame_count <= 2


@pytest.mark.compile
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


# --- numerics: fp16 gradients that overflow half, long feature axes -----------------------------


def _check_fp16_backward_in_float32(l2):
    # decoded - source = 80000 overflows float16 (max 65504); the gradient 2 * 80000 / F = 20000
    # (upstream 1: reduce="sum") does not, so it must come back finite and exact.
    decoded = torch.full((2, 8), 40000.0, dtype=torch.float16, requires_grad=True)
    source = torch.full((2, 8), -40000.0, dtype=torch.float16, requires_grad=True)
    loss = l2(decoded, source, reduce="sum")
    assert loss.dtype == torch.float32
    assert loss.item() == 2 * 80000.0**2
    loss.backward()
    assert decoded.grad.dtype == source.grad.dtype == torch.float16
    assert torch.equal(decoded.grad, torch.full((2, 8), 20000.0, dtype=torch.float16))
    assert torch.equal(source.grad, torch.full((2, 8), -20000.0, dtype=torch.float16))


def test_fp16_backward_computes_in_float32():
    _check_fp16_backward_in_float32(l2_reconstruction)


@pytest.mark.compile
def test_fused_fp16_backward_computes_in_float32():
    torch._dynamo.reset()
    _check_fp16_backward_in_float32(fused_l2_reconstruction)


LONG_FEATURES = 1 << 20


def _relative_error(found, expected):
    return ((found.double() - expected) / expected).abs().max().item()


def _check_long_feature_axis(l2, l1):
    # 3 rows of 2^20 float32 features: one row is over the 2^19-element block size, so the
    # eager ops take the blocked path. A sequential float32 sum drifts here; a cascade sum
    # (or a float64 one) stays within 1e-6 of the float64 value.
    decoded, source = randn(3, LONG_FEATURES, seed=60), randn(3, LONG_FEATURES, seed=61)
    expected_l2 = (decoded.double() - source.double()).square().mean(-1)
    expected_l1 = decoded.double().abs().sum(-1)
    # The inputs discriminate: vector_norm's float32 sums are far more than 1e-6 off.
    norm_l2 = torch.linalg.vector_norm(decoded - source, dim=-1) ** 2 / LONG_FEATURES
    norm_l1 = torch.linalg.vector_norm(decoded, ord=1, dim=-1)
    assert _relative_error(norm_l2, expected_l2) > 5e-6
    assert _relative_error(norm_l1, expected_l1) > 5e-6
    assert _relative_error(l2(decoded, source, reduce="none"), expected_l2) < 1e-6
    assert _relative_error(l1(decoded, reduce="none"), expected_l1) < 1e-6


def test_long_feature_axes_stay_within_1e6_of_float64():
    _check_long_feature_axis(l2_reconstruction, l1_absolute)


@pytest.mark.compile
def test_fused_long_feature_axes_stay_within_1e6_of_float64():
    torch._dynamo.reset()
    _check_long_feature_axis(fused_l2_reconstruction, fused_l1_absolute)


# --- the README's recompile claim ----------------------------------------------------------------


def test_readme_states_the_recompile_and_mark_dynamic():
    # The claim the compile test below checks is the one the README makes.
    readme = " ".join((pathlib.Path(__file__).parents[1] / "README.md").read_text().split())
    assert "do not recompile when the batch size changes" not in readme
    assert "recompiles once (2 graphs" in readme
    assert "torch._dynamo.mark_dynamic(x, 0)" in readme


@pytest.mark.compile
@pytest.mark.parametrize("mark_dynamic", [False, True])
def test_batch_size_changes_compile_two_graphs_or_one_with_mark_dynamic(mark_dynamic):
    # The README: the first change of batch size recompiles once (2 graphs), then no more;
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
