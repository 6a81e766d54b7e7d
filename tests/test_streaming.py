"""Tests for StreamingMean: its laws, its precision, checkpoints, pytrees and compile."""

import copy
import dataclasses
import inspect
import io
import itertools
import pickle

import hypothesis.strategies as st
import pytest
import torch
import torch.utils._pytree as pytree
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


@settings(max_examples=50, deadline=None)
@given(rows=integer_rows, cuts=st.lists(st.integers(0, 20), max_size=5))
def test_any_split_into_updates_gives_the_same_state(rows, cuts):
    bounds = sorted({min(c, len(rows)) for c in cuts} | {0, len(rows)})
    chunks = [rows[a:b] for a, b in itertools.pairwise(bounds)]
    assert accumulate(chunks, (2,)) == accumulate([rows], (2,))
    torch.testing.assert_close(accumulate([rows], (2,)).total, rows.double().sum(0))


@settings(max_examples=50, deadline=None)
@given(a=integer_rows, b=integer_rows, c=integer_rows)
def test_merge_is_associative_and_commutative(a, b, c):
    a, b, c = (accumulate([rows], (2,)) for rows in (a, b, c))
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(b) == b.merge(a)


@settings(max_examples=30, deadline=None)
@given(a=integer_rows)
def test_empty_is_the_identity_of_merge(a):
    a = accumulate([a], (2,))
    assert a.merge(StreamingMean.empty((2,))) == a
    assert StreamingMean.empty((2,)).merge(a) == a


@settings(max_examples=30, deadline=None)
@given(a=integer_rows, rows=integer_rows)
def test_update_and_merge_leave_their_inputs_unchanged(a, rows):
    a = accumulate([a], (2,))
    a_before, rows_before = StreamingMean(a.total.clone(), a.count.clone()), rows.clone()
    a.update(rows)
    a.merge(a)
    assert a == a_before
    assert torch.equal(rows, rows_before)


def test_merge_of_two_streams_equals_one_stream():
    values = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    left, right = accumulate(values[:12].split(5), (3,)), accumulate(values[12:].split(7), (3,))
    torch.testing.assert_close(
        left.merge(right).compute(), values.double().mean(0), rtol=1e-12, atol=0
    )


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


def test_fields_are_frozen():
    mean = StreamingMean.empty()
    with pytest.raises(dataclasses.FrozenInstanceError):
        mean.total = torch.ones((), dtype=torch.float64)


def test_checkpoint_round_trip():
    mean = accumulate([torch.randn(7, 2), torch.randn(3, 2)], (2,))
    buffer = io.BytesIO()
    torch.save({"l2": mean.state_dict()}, buffer)
    buffer.seek(0)
    restored = StreamingMean.from_state_dict(torch.load(buffer, weights_only=True)["l2"])
    assert restored == mean
    assert restored.update(torch.ones(1, 2)) == mean.update(torch.ones(1, 2))


def test_pytree_round_trip():
    tree = {"l2": accumulate([torch.ones(2, 3)], (3,)), "l1": [StreamingMean.empty()]}
    leaves, spec = pytree.tree_flatten(tree)
    assert [leaf.dtype for leaf in leaves] == [torch.float64, torch.int64] * 2
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert rebuilt["l2"] == tree["l2"]
    assert rebuilt["l1"][0] == tree["l1"][0]
    doubled = pytree.tree_map(lambda t: t * 2, tree)
    assert doubled["l2"].count.item() == 4


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


# Issue 8, item 6: the hash contract, validation on every path that builds an accumulator, and no
# host sync in update, merge or compute.


def test_equal_accumulators_are_unhashable():
    a, b = StreamingMean.empty(), StreamingMean.empty()
    assert a == b
    assert (a != b) is False
    assert a != StreamingMean.empty().update(torch.ones(1))
    with pytest.raises(TypeError, match=r"unhashable type: 'StreamingMean'"):
        hash(a)
    with pytest.raises(TypeError, match=r"unhashable type: 'StreamingMean'"):
        len({a, b})
    with pytest.raises(TypeError, match=r"unhashable type: 'StreamingMean'"):
        hash(a.update(torch.ones(3)).merge(b))  # results of update and merge too


def negative_count_copy(mean, count=-3):
    """A copy of ``mean`` whose count was set past the checks, as corrupted state would be."""
    bad = copy.copy(mean)
    object.__setattr__(bad, "count", torch.tensor(count))
    return bad


NEGATIVE = r"`count` must not be negative, got -3\."


def test_constructor_rejects_a_negative_count():
    with pytest.raises(ValueError, match=NEGATIVE):
        StreamingMean(torch.zeros(2, dtype=torch.float64), torch.tensor(-3))
    with pytest.raises(ValueError, match=r"`count` must not be negative, got -1\."):
        StreamingMean(torch.zeros((), dtype=torch.float64), torch.tensor(-1))
    assert StreamingMean(torch.zeros((), dtype=torch.float64), torch.tensor(0)).count.item() == 0


def test_from_state_dict_rejects_a_negative_count():
    state = accumulate([torch.ones(4, 2)], (2,)).state_dict()
    state["count"] = torch.tensor(-3)
    with pytest.raises(ValueError, match=NEGATIVE):
        StreamingMean.from_state_dict(state)


def test_unpickling_rejects_a_negative_count():
    bad = negative_count_copy(accumulate([torch.ones(4, 2)], (2,)))
    payload = pickle.dumps(bad)  # dumping does not check; loading builds a new one, checked
    with pytest.raises(ValueError, match=NEGATIVE):
        pickle.loads(payload)
    with pytest.raises(ValueError, match=NEGATIVE):
        copy.deepcopy(bad)


def test_unpickling_checks_dtypes():
    bad = copy.copy(StreamingMean.empty((2,)))
    object.__setattr__(bad, "total", torch.zeros(2))  # float32, not float64
    # The library's message, or (with the suite's runtime type check on) jaxtyping's, which
    # rejects the constructor's arguments first.
    message = r"`total` must be a float64 tensor, got a torch\.float32|parameter 'total'"
    with pytest.raises(TypeError, match=message):
        pickle.loads(pickle.dumps(bad))


@pytest.mark.parametrize(
    "duplicate", [copy.copy, copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))]
)
def test_copies_round_trip(duplicate):
    mean = accumulate([torch.randn(7, 2, generator=torch.Generator().manual_seed(0))], (2,))
    duplicated = duplicate(mean)
    assert type(duplicated) is StreamingMean
    assert duplicated == mean
    assert duplicated.total.dtype == torch.float64
    assert duplicated.count.dtype == torch.int64
    assert duplicated.update(torch.ones(1, 2)) == mean.update(torch.ones(1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        duplicated.count = torch.tensor(0)


def test_update_merge_and_compute_do_not_read_values_on_the_host():
    # Meta tensors have no values: any host sync (.item(), bool(), a check of `count < 0`) on
    # this path raises. Only metadata may be read.
    mean = StreamingMean.empty((3,), device="meta")
    rows = torch.empty(5, 3, device="meta")
    merged = mean.update(rows).merge(mean.update(rows[:2]))
    assert merged.total.device.type == merged.count.device.type == "meta"
    assert merged.compute().shape == (3,)
    leaves, spec = pytree.tree_flatten(merged)  # the pytree path compile uses, too
    assert pytree.tree_unflatten(leaves, spec).total.shape == (3,)


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
