"""The accumulator laws, one suite over every accumulator class.

Modelled on torchmetrics' ``MetricTester`` (rows split over several instances, as over ranks,
then merged, against one stream and a float64 reference) and torcheval's class tester (merge,
checkpoint and copy round trips). A new accumulator class is one entry of ``REGISTRY``, and a
public Accumulator subclass without one fails ``test_every_public_accumulator_class_has_an_entry``.

Exact laws are checked with ``==``; the laws that hold only to rounding are checked to ``TOL``:
every float64 field of the two results agrees within ``TOL`` times (1 + its largest magnitude),
and so does ``compute()``. The results differ by a few dozen float64 roundings (each at most
2**-53 ~ 1.1e-16 relative) on at most 64 rows with offsets up to 100: about 1e-14 of the scale.
``TOL`` leaves a margin of 100, and is far below what a real bug moves (one row of 64: ~1e-2).
"""

import copy
import dataclasses
import functools
import io
import itertools
import pickle
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings

import sae_losses
from helpers import randn
from logits_cases import ce_rows, kl_rows
from sae_losses import (
    StreamingFVU,
    StreamingMean,
    StreamingReconstructionBias,
    StreamingSpliceScores,
)
from sae_losses._accumulator import Accumulator

TOL = 1e-12
OFFSETS = (0.0, 2.0, 100.0)


def mean_rows(shape, n, seed, dtype):
    """``(values,)``: ``offset + N(0, 1)``, shaped ``(n, *shape)``."""
    return (OFFSETS[seed % 3] + randn(n, *shape, dtype=dtype, seed=seed),)


def fvu_rows(shape, n, seed, dtype):
    """``(decoded, source)``: ``source = offset + N(0, 1)``, ``decoded = source + N(0, 0.5^2)``."""
    source = OFFSETS[seed % 3] + randn(n, *shape, dtype=torch.float64, seed=seed)
    decoded = source + 0.5 * randn(n, *shape, dtype=torch.float64, seed=seed + 1)
    return decoded.to(dtype), source.to(dtype)


def fvu_reference(rows):
    """Float64 two-pass FVU: the mean of the rows first, then the deviations about it."""
    decoded, source = (t.double() for t in rows)
    if len(source) < 2:
        return torch.full(source.shape[1:-1], torch.nan, dtype=torch.float64)
    error = (decoded - source).square().sum((0, -1))
    return error / (source - source.mean(0)).square().sum((0, -1))


def bias_rows(shape, n, seed, dtype):
    """``(decoded, source)`` shaped ``(n, *shape, 6)``: ``source = offset + N(0, 1)`` and the
    decoded rows shrunk to 0.8 of it plus ``N(0, 0.3^2)``, so the inner products sum far from 0."""
    source = OFFSETS[seed % 3] + randn(n, *shape, 6, dtype=torch.float64, seed=seed)
    decoded = 0.8 * source + 0.3 * randn(n, *shape, 6, dtype=torch.float64, seed=seed + 1)
    return decoded.to(dtype), source.to(dtype)


def bias_reference(rows):
    """Float64 sum of the squared norms over the sum of the inner products, over every row."""
    decoded, source = (t.double() for t in rows)
    return decoded.square().sum((0, -1)) / (decoded * source).sum((0, -1))


VOCAB = 11


def splice_rows(shape, n, seed, dtype):
    """``(clean, spliced, ablated, targets, kl_keep)`` for ``n`` tokens (``shape`` is always ()).

    Each target is the clean run's top logit (by 6) and the ablated run's bottom one, and the
    spliced logits are the clean ones plus noise: CE_clean < CE_spliced < CE_ablated on every
    row, so the scores' denominators stay far from 0. ``kl_keep`` drops every third row from the
    KL terms only, so ``kl_count`` differs from ``count``.
    """
    offset = OFFSETS[seed % 3]
    targets = (seed + 7 * torch.arange(n)) % VOCAB
    hot = torch.zeros(n, VOCAB, dtype=torch.float64).scatter(1, targets[:, None], 6.0)
    clean = offset + randn(n, VOCAB, dtype=torch.float64, seed=seed) + hot
    spliced = clean + 0.7 * randn(n, VOCAB, dtype=torch.float64, seed=seed + 1)
    ablated = offset + randn(n, VOCAB, dtype=torch.float64, seed=seed + 2) - hot
    kl_keep = (seed + torch.arange(n)) % 3 != 0
    return clean.to(dtype), spliced.to(dtype), ablated.to(dtype), targets, kl_keep


def update_splice(accumulator, rows, mask=None):
    """The CE terms score the rows ``mask`` keeps; the KL terms those it and ``kl_keep`` keep."""
    *logits, targets, kl_keep = rows
    kl_mask = kl_keep if mask is None else kl_keep & mask
    return accumulator.update(*logits, targets, mask=mask, kl_mask=kl_mask)


def splice_reference(rows):
    """SAELens's definitions in float64: each mean over its kept tokens, then the scores."""
    clean, spliced, ablated, targets, kl_keep = rows
    ce = [ce_rows(logits, targets).mean() for logits in (clean, spliced, ablated)]
    kl = [kl_rows(clean[kl_keep], logits[kl_keep]).mean() for logits in (spliced, ablated)]
    return {
        "ce_clean": ce[0],
        "ce_spliced": ce[1],
        "ce_ablated": ce[2],
        "kl_spliced": kl[0],
        "kl_ablated": kl[1],
        "ce_loss_score": (ce[2] - ce[1]) / (ce[2] - ce[0]),
        "kl_div_score": (kl[1] - kl[0]) / kl[1],
    }


def update_with_mask(accumulator, rows, mask=None):
    return accumulator.update(*rows, mask=mask)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One accumulator class: what the laws need to build, feed and check it.

    ``compute()`` and ``reference`` may return a tensor or a pytree of them (a dict, say).
    """

    name: str
    shapes: tuple[tuple[int, ...], ...]  # state shapes to test: an accumulator per shape
    empty: Callable[..., object]  # empty(shape, device=None): the accumulator of no rows
    rows: Callable[..., tuple[torch.Tensor, ...]]  # rows(shape, n, seed, dtype): update's inputs
    reference: Callable[[tuple[torch.Tensor, ...]], object]  # float64 compute() of all rows
    # update(accumulator, rows, mask=None) -> the updated accumulator; mask is a (batch,) bool
    update: Callable[..., object] = update_with_mask


REGISTRY = [
    Entry(
        "StreamingMean",
        ((), (2, 3)),
        lambda shape, device=None: StreamingMean.empty(shape, device=device),
        mean_rows,
        lambda rows: rows[0].double().mean(0),
    ),
    Entry(
        "StreamingFVU",
        ((3,), (2, 3)),
        lambda shape, device=None: StreamingFVU.empty(shape, device=device),
        fvu_rows,
        fvu_reference,
    ),
    Entry(
        "StreamingReconstructionBias",
        ((), (3,)),
        lambda shape, device=None: StreamingReconstructionBias.empty(shape, device=device),
        bias_rows,
        bias_reference,
    ),
    Entry(
        "StreamingSpliceScores",
        ((),),  # its state has one shape: the sums of three CE and two KL terms
        lambda shape, device=None: StreamingSpliceScores.empty(device=device),
        splice_rows,
        splice_reference,
        update_splice,
    ),
]
CASES = [(entry, shape) for entry in REGISTRY for shape in entry.shapes]
IDS = [f"{entry.name}{shape}" for entry, shape in CASES]
case = pytest.mark.parametrize(("entry", "shape"), CASES, ids=IDS)
one_per_class = pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])


def test_every_public_accumulator_class_has_an_entry():
    # TokensSinceFired is public but no Accumulator: a per-step tracker without merge or count.
    public = [getattr(sae_losses, name) for name in sae_losses.__all__]
    classes = {c.__name__ for c in public if isinstance(c, type) and issubclass(c, Accumulator)}
    assert classes == {entry.name for entry in REGISTRY}


def rows_of(entry, shape, n, seed=0, dtype=torch.float64):
    return entry.rows(shape, n, seed, dtype)


def take(rows, start, stop):
    return tuple(t[start:stop] for t in rows)


def stream(entry, shape, batches):
    return functools.reduce(entry.update, batches, entry.empty(shape))


def state_of(accumulator):
    return accumulator.state_dict()


def metadata(accumulator):
    """Type, and per field the shape, dtype and device: all a meta accumulator has."""
    fields = state_of(accumulator).items()
    return type(accumulator), [(k, v.shape, v.dtype, v.device) for k, v in fields]


def assert_same_to_rounding(a, b):
    """Equal counts (exact); every float64 field and ``compute()`` equal to TOL of its scale."""
    assert type(a) is type(b)
    assert a.count.item() == b.count.item()
    for name, value in state_of(a).items():
        if value.is_floating_point():
            scale = 1 + value.abs().max().item() if value.numel() else 1
            other = state_of(b)[name]
            torch.testing.assert_close(value, other, rtol=0, atol=TOL * scale, msg=name)
    for got, want in zip(*map(pytree.tree_leaves, (a.compute(), b.compute())), strict=True):
        finite = got[got.isfinite()]
        scale = 1 + (finite.abs().max().item() if finite.numel() else 0)
        torch.testing.assert_close(got, want, rtol=0, atol=TOL * scale, equal_nan=True)


# --- merging: split rows vs one stream, identity, order, chunking -----------------------------


@case
@pytest.mark.parametrize("instances", [1, 2, 3, 5])
def test_rows_split_over_instances_then_merged_equal_one_stream(entry, shape, instances):
    # Uneven shares, with an empty instance among them from 3 on (as with an idle rank); each
    # instance updates in chunks of 4 rows, and the instances merge in order.
    rows = rows_of(entry, shape, 37, seed=3)
    bounds = [0, *sorted((37 * i * i) // (instances * instances) for i in range(1, instances))]
    if instances >= 3:
        bounds[1] = bounds[2]
    bounds.append(37)
    parts = [
        stream(entry, shape, [take(rows, s, min(s + 4, stop)) for s in range(start, stop, 4)])
        for start, stop in itertools.pairwise(bounds)
    ]
    merged = functools.reduce(lambda a, b: a.merge(b), parts)
    one = stream(entry, shape, [rows])
    assert_same_to_rounding(merged, one)
    torch.testing.assert_close(merged.compute(), entry.reference(rows), rtol=TOL, atol=TOL)


@case
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_merging_with_empty_changes_nothing(entry, shape, rows):
    accumulator = stream(entry, shape, [rows_of(entry, shape, rows, seed=5)])
    assert accumulator.merge(entry.empty(shape)) == accumulator
    assert entry.empty(shape).merge(accumulator) == accumulator


@case
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_update_and_merge_leave_their_inputs_unchanged(entry, shape, dtype, masked):
    # float64 matters: there ``rows.to(torch.float64)`` is ``rows`` itself, not a copy.
    accumulator = stream(entry, shape, [rows_of(entry, shape, 5, seed=1)])
    before = type(accumulator)(**{k: v.clone() for k, v in state_of(accumulator).items()})
    rows = rows_of(entry, shape, 6, seed=2, dtype=dtype)
    rows_before = [t.clone() for t in rows]
    mask = torch.tensor([True, False, True, True, False, True]) if masked else None
    entry.update(accumulator, rows, mask)
    accumulator.merge(accumulator)
    assert accumulator == before
    assert all(torch.equal(t, t0) for t, t0 in zip(rows, rows_before, strict=True))


@st.composite
def row_sets(draw, entry, shape, max_rows=24):
    return rows_of(entry, shape, draw(st.integers(0, max_rows)), seed=draw(st.integers(0, 9_999)))


@case
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_merge_order_agrees_to_rounding(entry, shape, data):
    a, b, c = (stream(entry, shape, [data.draw(row_sets(entry, shape))]) for _ in range(3))
    assert_same_to_rounding(a.merge(b).merge(c), a.merge(b.merge(c)))
    assert_same_to_rounding(a.merge(b), b.merge(a))


@case
@settings(max_examples=20, deadline=None)
@given(data=st.data(), cuts=st.lists(st.integers(0, 64), max_size=6))
def test_any_chunking_agrees_to_rounding_and_to_the_reference(entry, shape, data, cuts):
    rows = data.draw(row_sets(entry, shape, max_rows=64))
    n = len(rows[0])
    bounds = sorted({min(c, n) for c in cuts} | {0, n})
    chunked = stream(entry, shape, [take(rows, a, b) for a, b in itertools.pairwise(bounds)])
    assert_same_to_rounding(chunked, stream(entry, shape, [rows]))
    reference = entry.reference(rows)
    torch.testing.assert_close(chunked.compute(), reference, rtol=TOL, atol=TOL, equal_nan=True)


# --- copies and checkpoints, on the CPU and on the meta device (issue 16, item 15) ----------


def through_state_dict(accumulator):
    buffer = io.BytesIO()
    torch.save({"metric": accumulator.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["metric"]
    return type(accumulator).from_state_dict(state)


DUPLICATES = {
    "copy": copy.copy,
    "deepcopy": copy.deepcopy,
    "pickle": lambda a: pickle.loads(pickle.dumps(a)),
    "state_dict": through_state_dict,
}


@case
@pytest.mark.parametrize("duplicate", DUPLICATES.values(), ids=DUPLICATES)
def test_copies_and_checkpoints_round_trip(entry, shape, duplicate):
    accumulator = stream(entry, shape, [rows_of(entry, shape, 7, seed=4)])
    duplicated = duplicate(accumulator)
    assert type(duplicated) is type(accumulator)
    assert duplicated == accumulator
    assert metadata(duplicated) == metadata(accumulator)
    more = rows_of(entry, shape, 3, seed=8)
    assert entry.update(duplicated, more) == entry.update(accumulator, more)
    with pytest.raises(dataclasses.FrozenInstanceError):
        duplicated.count = torch.tensor(0)


@case
@pytest.mark.parametrize("duplicate", DUPLICATES.values(), ids=DUPLICATES)
def test_meta_accumulators_copy_and_checkpoint(entry, shape, duplicate):
    # Meta tensors have no values: a check that reads one (the negative-count check) raised.
    # The cases are StreamingMean.empty(device="meta") and StreamingFVU.empty((3,), ...).
    accumulator = entry.empty(shape, device="meta")
    assert metadata(duplicate(accumulator)) == metadata(accumulator)


@case
def test_update_merge_and_compute_read_no_values_on_the_host(entry, shape):
    # Any host sync (.item(), bool(), a check of `count < 0`) on this path raises on meta.
    accumulator = entry.empty(shape, device="meta")
    rows = tuple(torch.empty_like(t, device="meta") for t in rows_of(entry, shape, 5))
    merged = entry.update(accumulator, rows).merge(entry.update(accumulator, take(rows, 0, 2)))
    assert {v.device.type for v in state_of(merged).values()} == {"meta"}
    shapes = [
        [t.shape for t in pytree.tree_leaves(m.compute())] for m in (merged, entry.empty(shape))
    ]
    assert shapes[0] == shapes[1]
    leaves, spec = pytree.tree_flatten(merged)  # the pytree path compile uses, too
    assert metadata(pytree.tree_unflatten(leaves, spec)) == metadata(merged)


@case
def test_pytree_round_trip(entry, shape):
    accumulator = stream(entry, shape, [rows_of(entry, shape, 4, seed=6)])
    leaves, spec = pytree.tree_flatten({"metric": [accumulator]})
    assert [leaf.dtype for leaf in leaves] == [v.dtype for v in state_of(accumulator).values()]
    assert pytree.tree_unflatten(leaves, spec)["metric"][0] == accumulator


# --- merge checks (issue 16, item 14), hashing, and every constructor path's checks ----------


@one_per_class
def test_merge_rejects_an_accumulator_on_another_device(entry):
    shape = entry.shapes[0]
    cpu = stream(entry, shape, [rows_of(entry, shape, 3, seed=9)])
    meta = entry.empty(shape, device="meta")
    for a, b in ((cpu, meta), (meta, cpu)):
        message = rf"cannot merge accumulators on different devices, got {a.count.device} and "
        with pytest.raises(ValueError, match=message + rf"{b.count.device}\."):
            a.merge(b)


@one_per_class
def test_merge_rejects_another_type(entry):
    other = next(e for e in REGISTRY if e is not entry)
    accumulator = entry.empty(entry.shapes[0])
    for wrong in (other.empty(other.shapes[0]), 0.5):
        message = rf"can only merge a {entry.name}, got {type(wrong).__name__}\."
        with pytest.raises(TypeError, match=message):
            accumulator.merge(wrong)


@case
def test_accumulators_are_unhashable_and_equal_by_value(entry, shape):
    empty, rows = entry.empty(shape), rows_of(entry, shape, 3, seed=2)
    assert empty == entry.empty(shape)
    assert (empty != entry.empty(shape)) is False
    assert entry.update(empty, rows) != empty
    for accumulator in (empty, entry.update(empty, rows), empty.merge(empty)):
        with pytest.raises(TypeError, match=rf"unhashable type: '{entry.name}'"):
            hash(accumulator)
    with pytest.raises(TypeError, match=rf"unhashable type: '{entry.name}'"):
        len({empty, entry.empty(shape)})


def with_field(accumulator, name, value):
    """A copy of ``accumulator`` with ``name`` set past the checks, as corrupted state would be."""
    bad = copy.copy(accumulator)
    object.__setattr__(bad, name, value)
    return bad


CONSTRUCTORS = {
    "constructor": lambda cls, state, bad: cls(**state),
    "from_state_dict": lambda cls, state, bad: cls.from_state_dict(state),
    "pickle": lambda cls, state, bad: pickle.loads(pickle.dumps(bad)),
    "copy": lambda cls, state, bad: copy.copy(bad),
    "deepcopy": lambda cls, state, bad: copy.deepcopy(bad),
}


@case
@pytest.mark.parametrize("path", CONSTRUCTORS.values(), ids=CONSTRUCTORS)
def test_every_constructor_path_rejects_a_negative_count(entry, shape, path):
    accumulator = stream(entry, shape, [rows_of(entry, shape, 4, seed=3)])
    state = {**state_of(accumulator), "count": torch.tensor(-3)}
    bad = with_field(accumulator, "count", torch.tensor(-3))
    with pytest.raises(ValueError, match=r"`count` must not be negative, got -3\."):
        path(type(accumulator), state, bad)


@case
@pytest.mark.parametrize("path", CONSTRUCTORS.values(), ids=CONSTRUCTORS)
def test_every_constructor_path_checks_dtypes(entry, shape, path):
    accumulator = entry.empty(shape)
    name, value = next((k, v) for k, v in state_of(accumulator).items() if v.is_floating_point())
    state = {**state_of(accumulator), name: value.float()}
    # The library's message, or (with the suite's runtime type check on) jaxtyping's, which
    # rejects the constructor's arguments first.
    message = rf"`{name}` must be a float64 tensor, got a torch\.float32|parameter '{name}'"
    with pytest.raises(TypeError, match=message):
        path(type(accumulator), state, with_field(accumulator, name, value.float()))
