"""Tests for all_reduce: on one process, and across real gloo process groups on localhost."""

import datetime
import functools
import inspect
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch._dynamo.testing import CompileCounterWithBackend

from sae_losses import (
    PendingAllReduce,
    StreamingFVU,
    StreamingMean,
    all_reduce,
    l1_absolute,
    l2_reconstruction,
)
from spawn import (
    capture,
    exception_chain,
    init_gloo,
    read_json,
    run_ranks,
    save_result,
    start_ranks,
    write_json,
)

ROWS, COMPONENTS, FEATURES = 11, 2, 5


def global_data():
    generator = torch.Generator().manual_seed(1234)
    decoded = torch.randn(ROWS, COMPONENTS, FEATURES, generator=generator)
    source = torch.randn(ROWS, COMPONENTS, FEATURES, generator=generator)
    return decoded, source


# Uneven shards of the ROWS rows, with one rank that sees none: (start, stop) per rank.
SHARDS = {2: [(0, 0), (0, ROWS)], 3: [(0, 7), (7, 7), (7, ROWS)]}


def rank_rows(rank, world_size):
    return slice(*SHARDS[world_size][rank])


def local_metrics(decoded, source):
    """The accumulators one rank keeps, updated in chunks of 3 rows."""
    metrics = {
        "l2": StreamingMean.empty((COMPONENTS,)),
        "extra": [StreamingMean.empty((COMPONENTS,)), StreamingMean.empty()],
    }
    for d, s in zip(decoded.split(3), source.split(3), strict=True):
        metrics = {
            "l2": metrics["l2"].update(l2_reconstruction(d, s, reduce="none")),
            "extra": [
                metrics["extra"][0].update(l1_absolute(d, reduce="none")),
                metrics["extra"][1].update(
                    l2_reconstruction(d.flatten(1), s.flatten(1), reduce="none")
                ),
            ],
        }
    return metrics


def expected_means():
    decoded, source = global_data()
    return {
        "l2": l2_reconstruction(decoded.double(), source.double()),
        "l1": l1_absolute(decoded.double()),
        "flat": l2_reconstruction(decoded.flatten(1).double(), source.flatten(1).double()),
    }


def summary(metrics):
    return {
        "l2": metrics["l2"].compute(),
        "l1": metrics["extra"][0].compute(),
        "flat": metrics["extra"][1].compute(),
        "count": metrics["l2"].count,
    }


def eager_worker(rank, world_size, port, out_dir):
    init_gloo(rank, world_size, port)
    try:
        decoded, source = global_data()
        rows = rank_rows(rank, world_size)
        local = local_metrics(decoded[rows], source[rows])
        synced = all_reduce(local)
        pending = all_reduce(local, async_op=True)
        assert isinstance(pending, PendingAllReduce)
        waited = pending.wait()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            all_reduce(local)
        collectives = sum(event.name.startswith("gloo:") for event in prof.events())
        save_result(
            out_dir,
            rank,
            {
                "synced": summary(synced),
                "async": summary(waited),
                "collectives": torch.tensor(collectives),
            },
        )
    finally:
        dist.destroy_process_group()


def compiled_worker(rank, world_size, port, out_dir):
    init_gloo(rank, world_size, port)
    try:
        counter = CompileCounterWithBackend("inductor")

        @torch.compile(backend=counter, fullgraph=True)
        def eval_step(mean, decoded, source):
            mean = mean.update(l2_reconstruction(decoded, source, reduce="none"))
            return mean, all_reduce(mean)

        decoded, source = global_data()
        rows = rank_rows(rank, world_size)
        mean = StreamingMean.empty((COMPONENTS,))
        # Each rank calls the step the same number of times, with its own batch sizes.
        for d, s in zip(decoded[rows].tensor_split(4), source[rows].tensor_split(4), strict=True):
            mean, synced = eval_step(mean, d, s)
        # A rank outside `group` must get the library's ValueError under fullgraph compile too.
        only_rank_0 = dist.new_group([0])
        non_member = ""
        if rank == 1:
            torch._dynamo.reset()
            sync = torch.compile(
                lambda mean: all_reduce(mean, group=only_rank_0), backend="eager", fullgraph=True
            )
            try:
                sync(mean)
                non_member = "returned"
            except Exception as error:  # the parent asserts on what was raised
                non_member = exception_chain(error)
        # Issue 16, item 1 under compile: rank 1's tree fails its checks. Both ranks still
        # gather, both raise (a RuntimeError from the graph), and the next calls pair.
        torch._dynamo.reset()
        sync = torch.compile(all_reduce, backend="aot_eager", fullgraph=True)
        bad_tree = {"a": mean, "b": None} if rank == 1 else {"a": mean}
        bad = capture(lambda: sync(bad_tree), describe=str)
        after = sync({"a": mean})["a"]
        all_bad = capture(lambda: sync({"a": mean, "b": None}), str)  # no valid tree to differ from
        save_result(
            out_dir,
            rank,
            {
                "l2": synced.compute(),
                "count": synced.count,
                "frames": torch.tensor(counter.frame_count),
                "non_member": non_member,
                "bad": bad,
                "after": after.count,
                "all_bad": all_bad,
            },
        )
    finally:
        dist.destroy_process_group()


def test_rank_rows_cover_the_data_unevenly_with_an_empty_rank():
    for world_size in (2, 3):
        sizes = [len(range(ROWS)[rank_rows(r, world_size)]) for r in range(world_size)]
        assert sum(sizes) == ROWS
        assert 0 in sizes
        assert len(set(sizes)) == world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_global_mean(world_size, tmp_path):
    expected = expected_means()
    results = run_ranks(eager_worker, world_size, tmp_path)
    for result in results:
        for key in ("synced", "async"):
            assert result[key]["count"].item() == ROWS
            for name in ("l2", "l1", "flat"):
                torch.testing.assert_close(result[key][name], expected[name], rtol=1e-6, atol=0)
        # One collective for the four accumulators of the tree.
        assert result["collectives"].item() == 1


@pytest.fixture(scope="module")
def compiled_results(tmp_path_factory):
    return run_ranks(compiled_worker, 2, tmp_path_factory.mktemp("compiled"))


@pytest.mark.compile
def test_compiled_step_with_all_reduce(compiled_results):
    expected = expected_means()
    for result in compiled_results:
        assert result["count"].item() == ROWS
        torch.testing.assert_close(result["l2"], expected["l2"], rtol=1e-6, atol=0)
        assert 1 <= result["frames"].item() <= 2


@pytest.mark.compile
def test_compiled_all_reduce_with_a_tree_that_fails_its_checks_raises_on_every_rank(
    compiled_results,
):
    for rank, result in enumerate(compiled_results):
        assert result["bad"]["kind"] == "RuntimeError", result["bad"]
        expected = NOT_AN_ACCUMULATOR if rank == 1 else MISMATCH
        assert expected in result["bad"]["message"], result["bad"]
        assert result["after"].item() == ROWS  # the next calls paired with each other
        assert result["all_bad"]["kind"] == "RuntimeError", result["all_bad"]
        assert NOT_AN_ACCUMULATOR in result["all_bad"]["message"], result["all_bad"]


@pytest.mark.compile
def test_compiled_all_reduce_rejects_a_rank_outside_the_group(compiled_results):
    # Rank 1 is not in new_group([0]). Under fullgraph, dynamo turns the ValueError into its own
    # `Unsupported: Observed exception`; the library's message must be in it or its __cause__s.
    chain = compiled_results[1]["non_member"]
    assert NOT_A_MEMBER in chain, chain
    assert "ValueError" in chain, chain


def test_without_a_process_group_the_tree_is_returned_unchanged():
    assert not dist.is_initialized()
    tree = {"l2": StreamingMean.empty().update(torch.tensor([1.0, 2.0]))}
    assert all_reduce(tree) is tree
    assert all_reduce(tree, async_op=True).wait() is tree
    assert all_reduce([]) == []


def test_non_accumulator_leaves_are_rejected():
    with pytest.raises(
        TypeError,
        match=r"all_reduce combines StreamingMean and StreamingFVU leaves only, got a Tensor\.",
    ):
        all_reduce({"l2": StreamingMean.empty(), "step": torch.tensor(3)})


# ---------------------------------------------------------------------------------------------
# Trees that differ between ranks (issue 8, item 2). Every case runs on real gloo groups of 2
# and of 3 ranks. The ranks of one spawn are split into overlapping blocks so that the cases
# where gloo may abort a process ("Received data size doesn't match expected size") cost no
# extra spawn: with N the world size and N + 1 processes,
#   - block L = ranks 0..N-1 runs "lengths", in which rank 0 alone has the shorter buffer;
#   - block R = ranks 1..N runs the other cases, then "empty_vs_tree", in which rank N alone
#     passes an empty tree (the shorter buffer).
# Each case has its own gloo group with a short timeout, so a case that desyncs or hangs cannot
# leak into the next one, and a regression fails instead of hanging. Each rank writes one JSON
# outcome per case ("returned" with the values, or the exception's type and message); a rank
# that died writes nothing, and the parent asserts on what was written.

GROUP_TIMEOUT = datetime.timedelta(seconds=20)
MISMATCH = "all_reduce: the ranks passed different trees"
NOT_A_MEMBER = "this rank is not a member of `group`"


def tree_values(tree):
    """Every accumulator of a tree as ``{key path: [total as a list, count]}``."""
    leaves = pytree.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, StreamingMean))[0]
    return {pytree.keystr(path): [leaf.total.tolist(), leaf.count.item()] for path, leaf in leaves}


def count_collectives(call):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = call()
    return result, sum(event.name.startswith("gloo:") for event in prof.events())


def filled(shape, value, rows=1):
    """A StreamingMean of ``shape`` that saw ``rows`` rows, all equal to ``value``."""
    return StreamingMean.empty(shape).update(torch.full((rows, *shape), float(value)))


# Each case: (r, n, group, note) -> the tree all_reduce returned; r is the rank in the block, n
# the block size; `note` takes extra observations for the parent.


def case_insertion_order(r, n, group, note):
    # Rank r adds one row of r + 1 to "l2" and two rows (100 (r + 1), 0) to "l1"; odd ranks
    # insert the keys the other way round, at the top level and in a nested dict.
    l2, l1 = filled((), r + 1), StreamingMean.empty().update(torch.tensor([100.0 * (r + 1), 0]))
    a, b = filled((2,), r, rows=r + 1), filled((), -r)
    tree = {"l2": l2, "l1": l1, "nested": {"a": a, "b": b}}
    if r % 2:
        tree = {"nested": {"b": b, "a": a}, "l1": l1, "l2": l2}
    result, note["collectives"] = count_collectives(lambda: all_reduce(tree, group=group))
    return result


# The collectives all_reduce may send its packed buffer with, and the name of that argument.
SENT_ARGUMENT = {
    "all_gather_into_tensor": "input_tensor",
    "all_gather_single": "input_tensor",
    "all_gather": "tensor",
    "all_reduce": "tensor",
}


def case_canonical_order(r, n, group, note):
    # Every rank holds the same states, inserted in a rank-dependent order: the packed buffers
    # that ranks send must then be identical, bit for bit. A spy records them on the way to the
    # real collective.
    leaves = {"l2": filled((3,), 2.0, rows=2), "fvu": filled((), 5.0), "l1": filled((2,), 7.0)}
    keys = sorted(leaves) if r % 2 == 0 else sorted(leaves, reverse=True)
    sent, originals = [], {}

    def spy(name, collective):
        signature = inspect.signature(collective)

        def record(*args, **kwargs):
            sent.append(signature.bind(*args, **kwargs).arguments[SENT_ARGUMENT[name]].tolist())
            return collective(*args, **kwargs)

        return record

    for name in SENT_ARGUMENT:
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)
            setattr(dist, name, spy(name, originals[name]))
    try:
        result = all_reduce({key: leaves[key] for key in keys}, group=group)
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
    note["sent"] = sent
    return result


def shape_swapped_tree(r):
    # Same number of elements on every rank: (2,) then () on even ranks, () then (2,) on odd.
    pair = [filled((2,), 1.0 + r), filled((), 10.0 * (r + 1))]
    return pair if r % 2 == 0 else pair[::-1]


def case_swapped_shapes(r, n, group, note):
    return all_reduce(shape_swapped_tree(r), group=group)


def case_swapped_shapes_async(r, n, group, note):
    pending = all_reduce(shape_swapped_tree(r), group=group, async_op=True)
    note["handle"] = type(pending).__name__
    return pending.wait()


def case_all_empty(r, n, group, note):
    result, note["collectives"] = count_collectives(lambda: all_reduce({}, group=group))
    # The group is still in step: the next call pairs with the other ranks' next call.
    note["next"] = tree_values(all_reduce({"l2": filled((), r + 1)}, group=group))
    return result


def case_not_a_member(r, n, group, note):
    return all_reduce({"l2": filled((), r + 1)}, group=group)


def case_lengths(r, n, group, note):
    # Different buffer lengths: (2,) on rank 0, (3,) on the others.
    return all_reduce(filled((2,) if r == 0 else (3,), 1.0, rows=2), group=group)


def case_empty_vs_tree(r, n, group, note):
    # The last rank passes an empty tree, the others one accumulator.
    return all_reduce({} if r == n - 1 else {"l2": filled((), 1.0, rows=3)}, group=group)


# Issue 16, item 1: a rank whose tree fails its own checks still takes part in the collective,
# with a fingerprint no valid tree has, so every other rank raises; then it raises its own error.
# Block rank 1 adds a leaf that is not an accumulator; its accumulators pack to the others'
# length, so gloo aborts no one. Every rank then makes a second, valid call, which must pair with
# the others' second call: before the fix the others' first call paired with it, and returned
# their sum with rank 1's second tree (1 + 200 where the truth is 1) with no error.
NOT_AN_ACCUMULATOR = "all_reduce combines StreamingMean and StreamingFVU leaves only, got a "
BAD_LEAVES = {"none": None, "tensor": torch.tensor([1.0]), "float": 0.5}


def bad_leaf_case(leaf, async_op=False):
    def case(r, n, group, note):
        tree = {"a": filled((), 1.0)}
        if r == 1:
            tree["b"] = BAD_LEAVES[leaf]
        if async_op:
            note["first"] = capture(lambda: all_reduce(tree, group=group, async_op=True).wait())
        else:
            note["first"] = capture(lambda: all_reduce(tree, group=group), tree_values)
        return all_reduce({"a": filled((), 100.0 * (r + 1))}, group=group)

    return case


def case_bad_devices(r, n, group, note):
    # Block rank 1's accumulators are on two devices, so its buffer cannot be packed.
    tree = {"a": filled((), 1.0), "b": StreamingMean.empty(device="meta" if r == 1 else "cpu")}
    note["first"] = capture(lambda: all_reduce(tree, group=group), tree_values)
    return all_reduce({"a": filled((), 100.0 * (r + 1))}, group=group)


def containers_case(even, odd):
    # Valid trees of the same accumulators, at the same key paths, in other containers.
    def case(r, n, group, note):
        pair = [filled((2,), 1.0), filled((), 2.0)]
        return all_reduce((even if r % 2 == 0 else odd)(pair), group=group)

    return case


# Issue 16, item 6: counts above 2**53 travel exactly (as int64 bits, not rounded to float64).
BIG_COUNT = 2**53 + 1


def big_count_tree(r):
    f64 = torch.float64
    return {
        "mean": StreamingMean(torch.tensor(r + 1.0, dtype=f64), torch.tensor(BIG_COUNT)),
        "fvu": StreamingFVU(
            torch.tensor(BIG_COUNT),
            torch.full((3,), r + 0.5, dtype=f64),
            torch.full((3,), 2.0 * (r + 1), dtype=f64),
            torch.tensor(3.0 * (r + 1), dtype=f64),
        ),
    }


def case_big_counts(r, n, group, note):
    reduced = all_reduce(big_count_tree(r), group=group)
    trees = [big_count_tree(i) for i in range(n)]
    for key in ("mean", "fvu"):
        merged = functools.reduce(lambda a, b: a.merge(b), [tree[key] for tree in trees])
        note[key] = {
            "count": reduced[key].count.item(),
            "merge_count": merged.count.item(),
            "equals_merge": reduced[key] == merged,
        }
    return {"mean": reduced["mean"]}


# (name, block, ranks of the group relative to the block, case). Block R's cases run in order.
CASES_L = [("lengths", "L", None, case_lengths)]
CASES_R = [
    ("insertion_order", "R", None, case_insertion_order),
    ("canonical_order", "R", None, case_canonical_order),
    ("swapped_shapes", "R", None, case_swapped_shapes),
    ("swapped_shapes_async", "R", None, case_swapped_shapes_async),
    ("all_empty", "R", None, case_all_empty),
    ("not_a_member", "R", [0], case_not_a_member),
    *((f"bad_{leaf}", "R", None, bad_leaf_case(leaf)) for leaf in BAD_LEAVES),
    ("bad_none_async", "R", None, bad_leaf_case("none", async_op=True)),
    ("bad_devices", "R", None, case_bad_devices),
    ("list_vs_tuple", "R", None, containers_case(list, tuple)),
    # {0: a, 1: b} and [a, b]: the same key paths, [0] and [1].
    ("dict_vs_list", "R", None, containers_case(lambda pair: dict(enumerate(pair)), list)),
    ("big_counts", "R", None, case_big_counts),
    ("empty_vs_tree", "R", None, case_empty_vs_tree),  # last: its last rank may be aborted
]


def run_case(name, case, r, n, group, out_dir):
    note = {}
    result = capture(lambda: case(r, n, group, note), tree_values)
    result["note"] = note
    write_json(f"{out_dir}/{name}.{r}.json", result)


def mismatch_worker(rank, nprocs, port, out_dir):
    world_size = nprocs - 1
    init_gloo(rank, nprocs, port)
    blocks = {"L": list(range(world_size)), "R": list(range(1, nprocs))}
    # Every process creates every group, in the same order (new_group is collective).
    groups = {
        name: dist.new_group(
            [blocks[block][i] for i in within] if within else blocks[block],
            timeout=GROUP_TIMEOUT,
            backend="gloo",
        )
        for name, block, within, _ in CASES_L + CASES_R
    }
    for name, block, _, case in CASES_L + CASES_R:
        if rank in blocks[block]:
            r = blocks[block].index(rank)
            run_case(name, case, r, world_size, groups[name], out_dir)
    # Peers may have been aborted by gloo: leave without a teardown that could wait on them.
    os._exit(0)


@pytest.fixture(scope="module", params=[2, 3], ids=["2_ranks", "3_ranks"])
def mismatch_outcomes(request, tmp_path_factory):
    """{case: [outcome of block rank 0, 1, ...]} for one spawn; None where a rank wrote none."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"mismatch{world_size}")
    start_ranks(mismatch_worker, world_size + 1, out_dir)
    outcomes = {}
    for name, *_ in CASES_L + CASES_R:
        outcomes[name] = [read_json(out_dir / f"{name}.{r}.json") for r in range(world_size)]
    return world_size, outcomes


def assert_returned(outcome, expected):
    assert outcome is not None, "the rank wrote no outcome (it died or hung)"
    assert outcome["kind"] == "returned", outcome
    assert outcome["value"].keys() == expected.keys()
    for key, (total, count) in expected.items():
        got_total, got_count = outcome["value"][key]
        assert got_count == count, (key, outcome)
        torch.testing.assert_close(
            torch.tensor(got_total, dtype=torch.float64),
            torch.tensor(total, dtype=torch.float64),
            rtol=1e-12,
            atol=0,
        )


def assert_mismatch_error(outcome):
    assert outcome is not None, "the rank wrote no outcome (it died or hung)"
    assert outcome["kind"] == "ValueError", outcome
    assert re.search(MISMATCH, outcome["message"]), outcome
    # The message says what every rank must pass, and what this rank passed.
    assert "Every rank must pass a tree with the same keys" in outcome["message"]
    assert "This rank passed: " in outcome["message"]


def assert_no_rank_returns(outcomes):
    """Each rank raised the mismatch ValueError, failed in gloo, or died: none returned."""
    for outcome in outcomes:
        if outcome is None:  # aborted by gloo (the rank whose receive size did not match)
            continue
        assert outcome["kind"] != "returned", outcome
        if outcome["kind"] == "ValueError":
            assert_mismatch_error(outcome)
        else:  # gloo's own failure: connection reset or closed by the aborted peer, or timeout
            assert outcome["kind"] in ("RuntimeError", "DistBackendError", "DistError"), outcome


def test_dict_insertion_order_does_not_change_the_sums(mismatch_outcomes):
    n, outcomes = mismatch_outcomes
    ranks = range(n)
    expected = {
        "['l1']": [sum(100.0 * (r + 1) for r in ranks), 2 * n],
        "['l2']": [sum(r + 1.0 for r in ranks), n],
        "['nested']['a']": [[sum(r * (r + 1.0) for r in ranks)] * 2, sum(r + 1 for r in ranks)],
        "['nested']['b']": [sum(-r for r in ranks), n],
    }
    for outcome in outcomes["insertion_order"]:
        assert_returned(outcome, expected)
        assert outcome["note"]["collectives"] == 1  # still one collective per call


def test_dict_leaves_are_packed_in_a_canonical_order(mismatch_outcomes):
    n, outcomes = mismatch_outcomes
    expected = {"['fvu']": [5.0 * n, n], "['l1']": [[7.0 * n] * 2, n]}
    expected["['l2']"] = [[4.0 * n] * 3, 2 * n]
    for outcome in outcomes["canonical_order"]:
        assert_returned(outcome, expected)
    sent = [outcome["note"]["sent"] for outcome in outcomes["canonical_order"]]
    assert all(len(s) == 1 for s in sent), sent  # one collective
    assert all(s == sent[0] for s in sent), sent  # the same buffer, whatever the insertion order


def test_same_size_trees_of_different_shapes_raise_on_every_rank(mismatch_outcomes):
    _, outcomes = mismatch_outcomes
    for outcome in outcomes["swapped_shapes"]:
        assert_mismatch_error(outcome)


def test_async_wait_raises_on_a_mismatch(mismatch_outcomes):
    _, outcomes = mismatch_outcomes
    for outcome in outcomes["swapped_shapes_async"]:
        assert outcome is not None
        assert outcome["note"]["handle"] == "PendingAllReduce"
        assert_mismatch_error(outcome)


def test_different_buffer_lengths_return_on_no_rank(mismatch_outcomes):
    _, outcomes = mismatch_outcomes
    assert_no_rank_returns(outcomes["lengths"])


def test_an_empty_tree_on_one_rank_returns_on_no_rank(mismatch_outcomes):
    _, outcomes = mismatch_outcomes
    assert_no_rank_returns(outcomes["empty_vs_tree"])
    # Only the rank with the shorter buffer (the empty tree) may be aborted by gloo: the ranks
    # that passed a tree survive and raise, the mismatch ValueError or gloo's own error.
    for outcome in outcomes["empty_vs_tree"][:-1]:
        assert outcome is not None


def test_an_empty_tree_on_every_rank_is_one_collective(mismatch_outcomes):
    n, outcomes = mismatch_outcomes
    for outcome in outcomes["all_empty"]:
        assert_returned(outcome, {})
        assert outcome["note"]["collectives"] == 1
        assert outcome["note"]["next"] == {"['l2']": [sum(range(1, n + 1)), n]}


def test_a_rank_outside_the_group_gets_a_value_error(mismatch_outcomes):
    _, outcomes = mismatch_outcomes
    member, *others = outcomes["not_a_member"]
    assert_returned(member, {"['l2']": [1.0, 1]})  # a group of one: its own values
    for outcome in others:
        assert outcome is not None
        assert outcome["kind"] == "ValueError", outcome
        assert NOT_A_MEMBER in outcome["message"]


@pytest.mark.parametrize("leaf", [*BAD_LEAVES, "none_async", "devices"])
def test_a_rank_whose_tree_fails_its_checks_still_joins_the_collective(mismatch_outcomes, leaf):
    n, outcomes = mismatch_outcomes
    for r, outcome in enumerate(outcomes[f"bad_{leaf}"]):
        assert outcome is not None, "the rank wrote no outcome (it died or hung)"
        first = outcome["note"]["first"]
        if r == 1 and leaf == "devices":
            assert first["kind"] == "ValueError", first
            assert "the accumulators are on different devices, ['cpu', 'meta']" in first["message"]
        elif r == 1:
            assert first["kind"] == "TypeError", first
            assert NOT_AN_ACCUMULATOR in first["message"], first
        else:
            assert_mismatch_error(first)
        # The ranks are still in step: the second call pairs with the others' second call.
        assert_returned(outcome, {"['a']": [sum(100.0 * (i + 1) for i in range(n)), n]})


@pytest.mark.parametrize("case", ["list_vs_tuple", "dict_vs_list"])
def test_different_containers_at_the_same_key_paths_raise_on_every_rank(mismatch_outcomes, case):
    _, outcomes = mismatch_outcomes
    for outcome in outcomes[case]:
        assert_mismatch_error(outcome)


def test_counts_above_2_to_the_53_are_exact(mismatch_outcomes):
    n, outcomes = mismatch_outcomes
    for outcome in outcomes["big_counts"]:
        assert outcome is not None, "the rank wrote no outcome (it died or hung)"
        assert outcome["kind"] == "returned", outcome
        for key in ("mean", "fvu"):
            note = outcome["note"][key]
            assert note["count"] == note["merge_count"] == n * BIG_COUNT, (key, note)
            assert note["equals_merge"], (key, note)
