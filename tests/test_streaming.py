"""Tests for StreamingMean: which laws hold exactly and which to rounding, its precision, its
errors and compile. The laws every accumulator shares are in tests/test_accumulators.py."""

import inspect
import itertools

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter

from sae_losses import StreamingMean, l2_reconstruction

# The suite runs with the jaxtyping + beartype hook, whose check fires before the body on
# annotated arguments. The error-message tests call the bodies directly.
update_unchecked = inspect.unwrap(StreamingMean.update)
init_unchecked = inspect.unwrap(StreamingMean.__init__)


def construct_unchecked(total, count):
    mean = object.__new__(StreamingMean)
    init_unchecked(mean, total, count)
    return mean


def accumulate(chunks, shape=()):
    mean = StreamingMean.empty(shape)
    for chunk in chunks:
        mean = mean.update(chunk)
    return mean


# Integer-valued rows make every float64 sum exact, so the laws can be checked with ==.
integer_rows = st.lists(
    st.lists(st.integers(-1000, 1000), min_size=2, max_size=2), min_size=0, max_size=20
).map(lambda rows: torch.tensor(rows, dtype=torch.float32).reshape(-1, 2))


def test_mean_is_row_weighted():
    # The seed's case: 1 row of 1.0 and then 3 rows of 0.0 give 1/4, not (1 + 0) / 2.
    mean = accumulate([torch.tensor([1.0]), torch.tensor([0.0, 0.0, 0.0])])
    assert mean.compute().item() == 0.25
    assert mean.count.item() == 4


def split(rows, cuts):
    bounds = sorted({min(c, len(rows)) for c in cuts} | {0, len(rows)})
    return [rows[a:b] for a, b in itertools.pairwise(bounds)]


# Issue 16, item 16: what holds exactly, bit for bit, for any finite rows.
finite_rows = st.lists(
    st.lists(st.floats(-1e300, 1e300, width=64), min_size=2, max_size=2), max_size=20
).map(lambda rows: torch.tensor(rows, dtype=torch.float64).reshape(-1, 2))


@settings(max_examples=50, deadline=None)
@given(a=finite_rows, b=finite_rows, c=finite_rows, cuts=st.lists(st.integers(0, 20), max_size=5))
def test_count_identity_and_two_way_commutativity_are_exact(a, b, c, cuts):
    x, y, z = (accumulate([rows], (2,)) for rows in (a, b, c))
    # `count` is an int64 sum: exact for any split and any merge order.
    assert accumulate(split(a, cuts), (2,)).count.item() == len(a)
    n = len(a) + len(b) + len(c)
    assert x.merge(y).merge(z).count.item() == x.merge(y.merge(z)).count.item() == n
    # empty() is an identity: total + 0.0 is total (== compares -0.0 and 0.0 as equal).
    assert x.merge(StreamingMean.empty((2,))) == x == StreamingMean.empty((2,)).merge(x)
    # IEEE addition is commutative, so a two-way merge is too, bit for bit.
    assert torch.equal(x.merge(y).total, y.merge(x).total)


@settings(max_examples=50, deadline=None)
@given(
    a=integer_rows, b=integer_rows, c=integer_rows, cuts=st.lists(st.integers(0, 20), max_size=5)
)
def test_integer_rows_below_2_to_the_53_give_exact_totals_in_any_order(a, b, c, cuts):
    # Every partial sum is an integer below 2**53, so exact in float64: any split and any merge
    # order gives the same bits, and the exact sum.
    assert accumulate(split(a, cuts), (2,)) == accumulate([a], (2,))
    exact = [sum(int(v) for v in column) for column in torch.cat([a, b, c]).T.tolist()]
    x, y, z = (accumulate([rows], (2,)) for rows in (a, b, c))
    assert x.merge(y).merge(z) == x.merge(y.merge(z)) == z.merge(x).merge(y)
    assert x.merge(y).merge(z).total.tolist() == exact


def test_associativity_and_splitting_hold_only_to_rounding():
    # (1e16 + 1) + 1 rounds to 1e16 (the float64 spacing there is 2); 1e16 + (1 + 1) is exact.
    x, y, z = (accumulate([torch.tensor([v], dtype=torch.float64)]) for v in (1e16, 1.0, 1.0))
    left, right = x.merge(y).merge(z), x.merge(y.merge(z))
    assert left.total.item() == 1e16
    assert right.total.item() == 1e16 + 2
    assert left.count.item() == right.count.item() == 3  # the count stays exact
    rows = torch.tensor([1e16, 1.0, 1.0], dtype=torch.float64)
    one_by_one, ones_together = accumulate(rows.split(1)), accumulate([rows[:1], rows[1:]])
    assert one_by_one.total.item() == 1e16
    assert ones_together.total.item() == 1e16 + 2
    # The documented bound: each total is within (n - 1) 2**-53 sum |v| of the exact sum.
    exact, bound = 10**16 + 2, (len(rows) - 1) * 2.0**-53 * (10**16 + 2)
    for total in (left.total, right.total, one_by_one.total, ones_together.total):
        assert abs(int(total.item()) - exact) <= bound


def test_long_float32_stream_does_not_drift():
    # 20,000 updates of 4,095 float32 values near 1000. A float32 running sum (what a
    # torchmetrics state holds) is off by about 1e-4 here; the float64 state must be within 1e-10.
    generator = torch.Generator().manual_seed(0)
    values = 1000 + torch.rand(20_000, 4_095, generator=generator)
    reference = values.double().sum() / values.numel()

    mean, float32_total = StreamingMean.empty(), torch.zeros(())
    for batch in values:
        mean = mean.update(batch)
        float32_total += batch.sum()
    assert mean.count.item() == values.numel()
    assert abs(mean.compute().item() / reference.item() - 1) < 1e-10
    float32_drift = abs(float32_total.item() / values.numel() / reference.item() - 1)
    assert float32_drift > 1e-5  # measured 1.1e-4: the test can tell the two apart


def test_update_detaches_and_accumulates_in_float64():
    rows = torch.tensor([[0.5, 1.5]], dtype=torch.bfloat16, requires_grad=True)
    mean = StreamingMean.empty((2,)).update(rows * 2)
    assert mean.total.dtype == torch.float64
    assert not mean.total.requires_grad
    assert mean.total.grad_fn is None
    torch.testing.assert_close(mean.compute(), torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_update_takes_loss_rows_with_components():
    decoded, source = torch.ones(4, 3, 5), torch.zeros(4, 3, 5)
    mean = StreamingMean.empty((3,)).update(l2_reconstruction(decoded, source, reduce="none"))
    torch.testing.assert_close(mean.compute(), torch.ones(3, dtype=torch.float64))


def test_empty_computes_nan():
    assert torch.isnan(StreamingMean.empty((2, 3)).compute()).all()
    assert StreamingMean.empty((2, 3)).compute().shape == (2, 3)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: StreamingMean.empty((3,)).update(torch.ones(2, 4)),
            ValueError,
            r"`values` must have shape \(batch, \*\(3,\)\), got \(2, 4\)\.",
        ),
        (
            lambda: update_unchecked(StreamingMean.empty(), torch.tensor(1.0)),
            ValueError,
            r"`values` must have shape \(batch, \*\(\)\), got \(\)\.",
        ),
        (
            lambda: update_unchecked(StreamingMean.empty(), torch.ones(2, dtype=torch.complex64)),
            TypeError,
            r"`values` must be a real tensor, got a torch\.complex64 tensor of shape \(2,\)\.",
        ),
        (
            lambda: update_unchecked(StreamingMean.empty(), [1.0, 2.0]),
            TypeError,
            r"`values` must be a real tensor, got list\.",
        ),
        (
            lambda: StreamingMean.empty((2,)).merge(StreamingMean.empty((3,))),
            ValueError,
            r"cannot merge accumulators of different shapes, got \(2,\) and \(3,\)\.",
        ),
        (
            lambda: StreamingMean.empty().merge(0.5),
            TypeError,
            r"can only merge a StreamingMean, got float\.",
        ),
        (
            lambda: construct_unchecked(torch.zeros(2), torch.tensor(0)),
            TypeError,
            r"`total` must be a float64 tensor, got a torch\.float32 tensor of shape \(2,\)\.",
        ),
        (
            lambda: construct_unchecked(torch.zeros(2, dtype=torch.float64), torch.tensor([0])),
            TypeError,
            r"`count` must be a 0-d int64 tensor, got a torch\.int64 tensor of shape \(1,\)\.",
        ),
        (
            lambda: StreamingMean.from_state_dict({"total": torch.zeros(())}),
            ValueError,
            r"a StreamingMean state has the keys 'count' and 'total', got \['total'\]\.",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.compile
def test_compiled_step_takes_and_returns_the_accumulator_without_recompiling():
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(mean, decoded, source):
        return mean.update(l2_reconstruction(decoded, source, reduce="none"))

    generator = torch.Generator().manual_seed(0)
    compiled, eager = StreamingMean.empty((2,)), StreamingMean.empty((2,))
    for batch in (2, 3, 5, 8, 13, 21):
        decoded = torch.randn(batch, 2, 4, generator=generator)
        source = torch.randn(batch, 2, 4, generator=generator)
        compiled = step(compiled, decoded, source)
        eager = eager.update(l2_reconstruction(decoded, source, reduce="none"))
    assert isinstance(compiled, StreamingMean)
    assert compiled.count.item() == eager.count.item() == 52
    torch.testing.assert_close(compiled.total, eager.total, rtol=1e-6, atol=0)
    assert counter.frame_count <= 2


@pytest.mark.compile
def test_merge_and_compute_trace_with_fullgraph():
    # fullgraph=True fails on any data-dependent Python branch or host read in the traced code.
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(a, b, values):
        merged = a.merge(b).update(values)
        return merged, merged.compute()

    generator = torch.Generator().manual_seed(0)
    compiled = eager = StreamingMean.empty((2,))
    for batch in (2, 3, 5, 8):
        values = torch.randn(batch, 2, generator=generator)
        other = StreamingMean.empty((2,)).update(values[:1])
        compiled, result = step(compiled, other, values)
        eager = eager.merge(other).update(values)
    assert compiled == eager
    torch.testing.assert_close(result, eager.compute(), rtol=1e-12, atol=0)
    assert counter.frame_count <= 2
