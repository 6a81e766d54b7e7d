"""Tests for all_reduce: on one process, and across real gloo process groups on localhost.

Every rank of 2 or 3 (one with no rows) gets the global means of a tree of accumulators, sync
and async, in one collective; a compiled eval step with all_reduce inside; under compile, a rank
whose tree fails its checks still joins the collective and a rank outside the group gets the
library's error. Trees that differ between ranks are in tests/test_all_reduce_mismatched_trees.py.
"""

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounterWithBackend

from all_reduce_cases import MISMATCH, NOT_A_MEMBER, NOT_AN_ACCUMULATOR
from sae_losses import PendingAllReduce, StreamingMean, all_reduce, l1_absolute, l2_reconstruction
from spawn import capture, exception_chain, init_gloo, run_ranks, save_result

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
