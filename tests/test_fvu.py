"""Tests for the fraction of variance unexplained: the batch function and StreamingFVU.

References are float64 two-pass formulas: the mean of the rows first, then the squared
deviations about it. The numerics bar streams 10^6 float32 rows with feature offsets up to 1e5.
"""

import inspect

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from helpers import randn
from sae_losses import StreamingFVU, _rowops, fraction_of_variance_unexplained

# The suite runs with the jaxtyping + beartype hook, which rejects bad shapes and dtypes before
# the body runs. The error-message tests call the bodies directly.
fvu_unchecked = inspect.unwrap(fraction_of_variance_unexplained)
update_unchecked = inspect.unwrap(StreamingFVU.update)

SHAPES = [(9, 7), (6, 3, 5), (4, 3, 2, 6)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance per input dtype: the inputs are rounded to the dtype first and the
# reference reads the rounded values, so only the accumulation dtype's rounding remains.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def fvu_reference(decoded, source, mask=None):
    """Float64 two-pass FVU per component: the mean of the kept rows first, then deviations."""
    decoded, source = decoded.double(), source.double()
    if mask is not None:
        decoded, source = decoded[mask], source[mask]
    mean = source.mean(0)
    return (decoded - source).square().sum((0, -1)) / (source - mean).square().sum((0, -1))


def reconstruction(*shape, dtype=torch.float32, seed=0, offset=3.0, noise=0.3):
    """``(decoded, source)``: ``source = offset + N(0, 1)``, ``decoded = source + noise``."""
    source = offset + randn(*shape, dtype=torch.float64, seed=seed)
    decoded = source + noise * randn(*shape, dtype=torch.float64, seed=seed + 1)
    return decoded.to(dtype), source.to(dtype)


# --- fraction_of_variance_unexplained ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_fvu_matches_the_float64_two_pass_reference(shape, dtype):
    decoded, source = reconstruction(*shape, dtype=dtype, seed=3)
    result = fraction_of_variance_unexplained(decoded, source)
    assert result.shape == shape[1:-1]
    expected_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    assert result.dtype == expected_dtype
    expected = fvu_reference(decoded, source)
    torch.testing.assert_close(result.double(), expected, rtol=RTOL[dtype], atol=0)


def test_batch_fvu_is_exact_at_a_large_offset():
    # A massive-activation feature: 1e4 + N(0, 1) in float32. The variance about the batch mean
    # must not cancel (a one-pass float32 sum of squares would lose every digit here).
    decoded, source = reconstruction(512, 2, 16, seed=5, offset=1e4, noise=0.1)
    result = fraction_of_variance_unexplained(decoded, source)
    torch.testing.assert_close(result.double(), fvu_reference(decoded, source), rtol=1e-5, atol=0)


def test_batch_fvu_closed_form_example():
    # Mean (2, 2): variance 1 + 4 + 1 + 4 = 10; squared error 1 + 1 = 2.
    source = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    decoded = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert fraction_of_variance_unexplained(decoded, source).item() == pytest.approx(0.2)


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_equals_the_fvu_of_the_kept_rows(shape):
    decoded, source = reconstruction(*shape, seed=7)
    mask = torch.arange(shape[0]) % 3 != 1
    # Dropped rows hold NaN: harmless in the value and in the gradients.
    decoded[~mask], source[~mask] = torch.nan, torch.nan
    decoded.requires_grad_()
    source.requires_grad_()
    result = fraction_of_variance_unexplained(decoded, source, mask=mask)
    kept_decoded = decoded.detach()[mask].requires_grad_()
    kept_source = source.detach()[mask].requires_grad_()
    kept = fraction_of_variance_unexplained(kept_decoded, kept_source)
    torch.testing.assert_close(result, kept, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        result.double(), fvu_reference(decoded.detach(), source.detach(), mask), rtol=1e-5, atol=0
    )

    weights = torch.linspace(1, 2, result.numel()).reshape(result.shape)
    (result * weights).sum().backward()
    (kept * weights).sum().backward()
    for full, part in ((decoded.grad, kept_decoded.grad), (source.grad, kept_source.grad)):
        assert torch.isfinite(full).all()
        assert (full[~mask] == 0).all()
        torch.testing.assert_close(full[mask], part, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("rows", "mask"),
    [
        (0, None),
        (1, None),
        (4, torch.tensor([False, True, False, False])),
        (4, torch.zeros(4, dtype=torch.bool)),
    ],
    ids=["no rows", "one row", "mask keeps one row", "mask keeps none"],
)
def test_fewer_than_two_rows_give_nan(rows, mask):
    decoded, source = reconstruction(rows, 3, 4, seed=9)
    result = fraction_of_variance_unexplained(decoded, source, mask=mask)
    assert result.shape == (3,)
    assert torch.isnan(result).all()


def test_zero_source_variance():
    # Every source row equal: the variance is exactly 0. A positive error gives +inf, none NaN.
    source = torch.full((5, 2, 3), 2.5)
    decoded = source.clone()
    decoded[:, 0] += 0.25
    result = fraction_of_variance_unexplained(decoded, source)
    assert result[0].item() == float("inf")
    assert torch.isnan(result[1])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(6, 4), (5, 2, 3)])
def test_gradcheck(shape, masked):
    decoded, source = reconstruction(*shape, dtype=torch.float64, seed=11)
    mask = (torch.arange(shape[0]) != 2) if masked else None
    assert torch.autograd.gradcheck(
        lambda d, s: fraction_of_variance_unexplained(d, s, mask=mask),
        (decoded.requires_grad_(), source.requires_grad_()),
    )


@pytest.mark.parametrize("masked", [False, True])
def test_only_the_inputs_are_saved_for_backward(masked):
    batch, components, features = 64, 4, 32
    decoded, source = reconstruction(batch, components, features, seed=13)
    decoded.requires_grad_()
    source.requires_grad_()
    mask = (torch.arange(batch) % 5 != 0) if masked else None
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fraction_of_variance_unexplained(decoded, source, mask=mask).sum()
    assert saved, "nothing saved: the hooks saw no autograd graph"
    big = [t for t in saved if t.numel() >= batch * features]
    assert all(t.data_ptr() in {decoded.data_ptr(), source.data_ptr()} for t in big), [
        tuple(t.shape) for t in big
    ]
    loss.backward()  # the hooks did not break the graph
    assert decoded.grad is not None
    assert source.grad is not None


# --- StreamingFVU ---------------------------------------------------------------------------
# The laws every accumulator shares (merge, identity, copies, checkpoints, hashing, negative
# counts) are in tests/test_accumulators.py; these tests are StreamingFVU's own.


def stream(chunks, shape=(2, 3)):
    fvu = StreamingFVU.empty(shape)
    for decoded, source in chunks:
        fvu = fvu.update(decoded.clone(), source.clone())
    return fvu


def assert_close_state(a, b, rtol=1e-12):
    """Equal counts, and float64 state equal to ``rtol`` of its scale (NaN equal to NaN)."""
    assert a.count.item() == b.count.item()
    scale = max(1, a.count.item())  # m2 and error grow like the row count
    mean_scale = 1 + a.mean.abs().max().item()
    torch.testing.assert_close(a.mean, b.mean, rtol=rtol, atol=rtol * mean_scale)
    torch.testing.assert_close(a.m2, b.m2, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(a.error, b.error, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(a.compute(), b.compute(), rtol=rtol, atol=0, equal_nan=True)


def test_update_detaches():
    decoded, source = reconstruction(8, 2, 3, seed=4)
    decoded.requires_grad_()
    source.requires_grad_()
    fvu = StreamingFVU.empty((2, 3)).update(decoded * 2, source * 2)
    for value in fvu.state_dict().values():
        assert value.grad_fn is None
        assert not value.requires_grad
    assert fvu.mean.dtype == fvu.m2.dtype == fvu.error.dtype == torch.float64
    assert fvu.count.dtype == torch.int64


def test_streaming_equals_the_batch_function_on_the_same_rows():
    # 3000 rows of (4, 64): more than one of update's internal row blocks.
    decoded, source = reconstruction(3000, 4, 64, seed=6, offset=50.0, noise=0.2)
    fvu = stream(zip(decoded.split(701), source.split(701), strict=True), (4, 64))
    assert fvu.count.item() == 3000
    batch = fraction_of_variance_unexplained(decoded.double(), source.double())
    torch.testing.assert_close(fvu.compute(), batch, rtol=1e-12, atol=0)
    torch.testing.assert_close(fvu.compute(), fvu_reference(decoded, source), rtol=1e-12, atol=0)
    torch.testing.assert_close(fvu.explained_variance(), 1 - batch, rtol=1e-12, atol=0)
    torch.testing.assert_close(fvu.mean, source.double().mean(0), rtol=1e-12, atol=0)


def test_masked_updates_equal_updates_of_the_kept_rows():
    decoded, source = reconstruction(40, 2, 3, seed=8)
    mask = torch.rand(40, generator=torch.Generator().manual_seed(0)) < 0.6
    decoded[~mask], source[~mask] = torch.nan, torch.inf
    masked = StreamingFVU.empty((2, 3))
    for d, s, m in zip(decoded.split(9), source.split(9), mask.split(9), strict=True):
        masked = masked.update(d, s, mask=m)
    kept = stream([(decoded[mask], source[mask])])
    assert masked.count.item() == mask.sum().item()
    assert_close_state(masked, kept)
    torch.testing.assert_close(masked.compute(), fvu_reference(decoded, source, mask))


@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_masked_update_through_many_row_blocks(monkeypatch, offset):
    # Blocks of 3 rows of (2, 3) (monkeypatched), a mask with a wholly dropped block, NaN and Inf
    # in the dropped rows, and a last partial block: one update equals the kept rows' update.
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 4 * 3 * 6)
    decoded, source = reconstruction(17, 2, 3, seed=9, offset=offset)
    mask = torch.ones(17, dtype=torch.bool)
    mask[[0, 3, 4, 5, 11, 16]] = False  # block 1 (rows 3-5) is all dropped; row 0 is a pivot's
    decoded[~mask], source[~mask] = torch.nan, -torch.inf
    masked = StreamingFVU.empty((2, 3)).update(decoded, source, mask=mask)
    kept = StreamingFVU.empty((2, 3)).update(decoded[mask], source[mask])
    assert masked.count.item() == 11
    assert_close_state(masked, kept, rtol=1e-9)  # pivots differ: float64 rounding at 1e5
    torch.testing.assert_close(
        masked.compute(), fvu_reference(decoded, source, mask), rtol=1e-9, atol=0
    )


def test_streaming_edge_cases():
    empty = StreamingFVU.empty((2, 3))
    assert empty.compute().shape == (2,)
    assert torch.isnan(empty.compute()).all()
    one = empty.update(*reconstruction(1, 2, 3, seed=1))
    assert torch.isnan(one.compute()).all()
    # Identical source rows: zero variance; a positive error gives +inf, no error NaN.
    source = torch.full((4, 2, 3), -1.5)
    decoded = source.clone()
    decoded[:, 0, 1] = 0.0
    fvu = empty.update(decoded[:1], source[:1]).update(decoded[1:], source[1:])
    assert fvu.compute()[0].item() == float("inf")
    assert torch.isnan(fvu.compute()[1])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: StreamingFVU.empty((4, 64)).update(torch.ones(2, 4, 32), torch.ones(2, 4, 32)),
            ValueError,
            r"`source` must have shape \(batch, \*\(4, 64\)\), got \(2, 4, 32\)\.",
        ),
        (
            lambda: update_unchecked(StreamingFVU.empty((3,)), torch.ones(2, 3), torch.ones(2, 4)),
            ValueError,
            r"`decoded` and `source` must have the same shape, got \(2, 3\) and \(2, 4\)\.",
        ),
        (
            lambda: update_unchecked(
                StreamingFVU.empty((3,)), torch.ones(2, 3), torch.ones(2, 3), mask=torch.ones(2)
            ),
            TypeError,
            r"`mask` must be a bool tensor, got dtype torch\.float32\.",
        ),
        (
            lambda: fvu_unchecked(torch.ones(2, 3), torch.ones(2, 3), mask=torch.ones(2)),
            TypeError,
            r"`mask` must be a bool tensor, got dtype torch\.float32\.",
        ),
        (
            lambda: fvu_unchecked(torch.ones(2, 3), torch.ones(3, 3)),
            ValueError,
            r"`decoded` and `source` must have the same shape, got \(2, 3\) and \(3, 3\)\.",
        ),
        (
            lambda: StreamingFVU.empty((3,)).merge(StreamingFVU.empty((4,))),
            ValueError,
            r"cannot merge accumulators of different shapes, got \(3,\) and \(4,\)\.",
        ),
        (
            lambda: StreamingFVU.empty((3,)).merge(0.5),
            TypeError,
            r"can only merge a StreamingFVU, got float\.",
        ),
        (
            lambda: StreamingFVU.from_state_dict({"count": torch.tensor(0)}),
            ValueError,
            r"a StreamingFVU state has the keys 'count', 'error', 'm2' and 'mean', "
            r"got \['count'\]\.",
        ),
    ],
    ids=[
        "shape differs from empty's",
        "decoded and source differ",
        "float mask to update",
        "float mask to the batch function",
        "batch function shapes differ",
        "merge of different shapes",
        "merge of another type",
        "state dict keys",
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- the numerics bar ------------------------------------------------------------------------

BAR_ROWS = 1_000_000
BAR_SHAPE = (4, 64)
BAR_OFFSETS = (3000.0, 1e5)
BAR_NOISE = 0.1
BAR_SEED = 2024


def bar_chunk_sizes():
    """Uneven chunk sizes summing to BAR_ROWS, with an empty and a one-row chunk among them."""
    sizes, total, index = [0, 1], 1, 0
    while total < BAR_ROWS:
        # 1 to 3,989 rows, about 2,000 on average: small enough that each chunk's float64
        # reference temporaries stay in cache, which keeps this test fast.
        size = min(1 + (index * 1_237) % 3_989, BAR_ROWS - total)
        sizes.append(size)
        total += size
        index += 1
    return sizes


def bar_loadings():
    """``c`` of shape (4, 64): 8 features per component near 1 (0.9 to 1.1), the rest 0."""
    generator = torch.Generator().manual_seed(BAR_SEED)
    loadings = torch.zeros(BAR_SHAPE, dtype=torch.float64)
    for component in range(BAR_SHAPE[0]):
        features = torch.randperm(BAR_SHAPE[1], generator=generator)[:8]
        jitter = torch.rand(8, generator=generator, dtype=torch.float64)
        loadings[component, features] = 0.9 + 0.2 * jitter
    loadings[:, 0] = 1.0  # at least one feature exactly at the offset
    return loadings


def bar_draw(index, size):
    """Chunk ``index``'s standard normal part: the same values on every call."""
    generator = torch.Generator().manual_seed(BAR_SEED * 1_000_003 + index)
    return torch.randn(size, *BAR_SHAPE, generator=generator)


def one_pass_fvu(count, sum_x, sum_squared_norm, sum_squared_error):
    """SAELens's streaming formula, in float64 throughout: Var = E|x|^2 - |E x|^2.

    Transcribed from ExplainedVarianceCalculator in decoderesearch/SAELens, sae_lens/evals.py
    @ 191d44eb (``total_variance = mean_squared_norm - mean_x.pow(2).sum()``; FVU is
    ``mse / total_variance``). SAELens sums each batch in the input's dtype (float32) before
    the float64 running sums, so this all-float64 version is its best case.
    """
    mean_x = sum_x / count
    return (sum_squared_error / count) / (sum_squared_norm / count - mean_x.square().sum(-1))


@pytest.fixture
def one_thread():
    """Many small ops on a shared, loaded machine: one thread avoids OpenMP's contention
    (measured here: 13 s of CPU with one thread, over 130 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_numerics_bar_a_million_float32_rows_at_large_offsets():
    """Stream 10^6 float32 rows of ``offset * c + N(0, 1)``; compare with a float64 two-pass."""
    torchmetrics = pytest.importorskip("torchmetrics")
    sizes = bar_chunk_sizes()
    assert sum(sizes) == BAR_ROWS
    loadings = bar_loadings()
    bases = {offset: (offset * loadings).float() for offset in BAR_OFFSETS}
    zeros = torch.zeros(BAR_SHAPE, dtype=torch.float64)
    fvu = {offset: StreamingFVU.empty(BAR_SHAPE) for offset in BAR_OFFSETS}
    sum_x = {offset: zeros.clone() for offset in BAR_OFFSETS}
    sum_squared_norm = {offset: zeros[:, 0].clone() for offset in BAR_OFFSETS}
    # Per feature: the sum of (decoded - source)**2.
    error = {offset: zeros.clone() for offset in BAR_OFFSETS}
    # torchmetrics at the largest offset only, as a printed figure (it costs as much as ours).
    peer = {BAR_OFFSETS[-1]: torchmetrics.ExplainedVariance()}

    # Pass 1: the stream under test, and float64 sums for the reference mean and error.
    for index, size in enumerate(sizes):
        z = bar_draw(index, size)
        # The reconstruction noise is the next row's normal part, scaled: independent of each
        # row's own source, and it saves drawing a second 10^6 x 256 normal sample.
        noise = BAR_NOISE * z.roll(-1, 0)
        for offset in BAR_OFFSETS:
            source = bases[offset] + z  # float32 rows
            decoded = source + noise
            fvu[offset] = fvu[offset].update(decoded, source)
            x = source.double()
            sum_x[offset] += x.sum(0)
            sum_squared_norm[offset] += x.square().sum((0, -1))
            error[offset] += (decoded.double() - x).square_().sum(0)
            if size and offset in peer:  # torchmetrics cannot take an empty batch
                peer[offset].update(decoded.flatten(1), source.flatten(1))

    # Pass 2: the same rows again; float64 squared deviations about the float64 mean.
    means = {offset: sum_x[offset] / BAR_ROWS for offset in BAR_OFFSETS}
    m2 = {offset: zeros.clone() for offset in BAR_OFFSETS}
    for index, size in enumerate(sizes):
        z = bar_draw(index, size)
        for offset in BAR_OFFSETS:
            m2[offset] += ((bases[offset] + z).double() - means[offset]).square_().sum(0)

    failures = []
    for offset in BAR_OFFSETS:
        reference = error[offset].sum(-1) / m2[offset].sum(-1)
        state = fvu[offset]
        assert state.count.item() == BAR_ROWS
        ours = ((state.compute() - reference).abs() / reference).max().item()
        ours_m2 = ((state.m2 - m2[offset]).abs() / m2[offset]).max().item()
        one_pass = one_pass_fvu(
            BAR_ROWS, sum_x[offset], sum_squared_norm[offset], error[offset].sum(-1)
        )
        theirs = ((one_pass - reference).abs() / reference).max().item()
        print(
            f"offset {offset:g}: FVU {reference.mean().item():.6f}; relative error of "
            f"StreamingFVU {ours:.1e} (per-feature M2 {ours_m2:.1e}); "
            f"one-pass float64 sum/sum-of-squares (SAELens) {theirs:.1e}"
        )
        if offset in peer:
            # A figure, not asserted: torchmetrics' ExplainedVariance is another quantity (per
            # column, with a centred error), computed from float32 sums of x and x^2.
            print(
                f"offset {offset:g}: torchmetrics ExplainedVariance (float32 state, uniform "
                f"average over 256 columns) {peer[offset].compute().item():.6f}; our explained "
                f"variance {state.explained_variance().mean().item():.6f}"
            )
        if not ours <= 1e-9:
            failures.append(f"offset {offset:g}: StreamingFVU relative error {ours:.2e} > 1e-9")
        if not ours_m2 <= 1e-9:
            failures.append(f"offset {offset:g}: M2 relative error {ours_m2:.2e} > 1e-9")
        torch.testing.assert_close(state.mean, means[offset], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.error, error[offset].sum(-1), rtol=1e-12, atol=0)
        if offset == 1e5:
            # The test tells designs apart: the one-pass formula misses the bar here.
            assert theirs > 1e-9, f"one-pass formula unexpectedly within 1e-9: {theirs:.1e}"
    assert not failures, failures


# --- compile -----------------------------------------------------------------------------------


@pytest.mark.compile
def test_compiled_update_does_not_recompile_across_batch_sizes():
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(fvu, decoded, source):
        return fvu.update(decoded, source)

    compiled, eager = StreamingFVU.empty((2, 8)), StreamingFVU.empty((2, 8))
    for seed, batch in enumerate((2, 3, 5, 8, 13, 21)):
        decoded, source = reconstruction(batch, 2, 8, seed=10 * seed, offset=30.0)
        compiled = step(compiled, decoded, source)
        eager = eager.update(decoded, source)
    assert isinstance(compiled, StreamingFVU)
    assert compiled.count.item() == eager.count.item() == 52
    assert_close_state(compiled, eager)
    assert counter.frame_count <= 2
