"""The per-rank cases of the all_reduce tests on trees that differ between ranks.

Trees that differ between ranks (issue 8, item 2). Every case runs on real gloo groups of 2
and of 3 ranks. The ranks of one spawn are split into overlapping blocks so that the cases
where gloo may abort a process ("Received data size doesn't match expected size") cost no
extra spawn: with N the world size and N + 1 processes,

- block L = ranks 0..N-1 runs "lengths", in which rank 0 alone has the shorter buffer;
- block R = ranks 1..N runs the other cases, then "empty_vs_tree", in which rank N alone
  passes an empty tree (the shorter buffer).

Each case has its own gloo group with a short timeout, so a case that desyncs or hangs cannot
leak into the next one, and a regression fails instead of hanging. Each rank writes one JSON
outcome per case ("returned" with the values, or the exception's type and message); a rank
that died writes nothing, and tests/test_all_reduce_mismatched_trees.py asserts on what was
written. The library's messages that the all_reduce tests expect are here too.
"""

import datetime
import functools
import inspect
import os

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from sae_losses import StreamingFVU, StreamingMean, all_reduce
from spawn import capture, init_gloo, write_json

__all__ = [
    "BAD_LEAVES",
    "BIG_COUNT",
    "CASES_L",
    "CASES_R",
    "MISMATCH",
    "NOT_AN_ACCUMULATOR",
    "NOT_A_MEMBER",
    "mismatch_worker",
]

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
