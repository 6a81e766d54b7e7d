"""Tests for all_reduce on trees that differ between ranks (issues 8 and 16), on real gloo groups.

One spawn per world size (2 and 3 ranks, plus one process: see tests/all_reduce_cases.py) runs
every case; these tests assert on what each rank wrote. Dict insertion order changes neither the
sums nor the packed buffer; trees of different shapes, lengths or containers raise on every rank
(or fail in gloo) and return on none; an empty tree everywhere is still one collective; a rank
outside the group gets a ValueError; a rank whose tree fails its checks still joins the
collective, so the next calls pair; counts above 2**53 travel exactly.
"""

import re

import pytest
import torch

from all_reduce_cases import (
    BAD_LEAVES,
    BIG_COUNT,
    CASES_L,
    CASES_R,
    MISMATCH,
    NOT_A_MEMBER,
    NOT_AN_ACCUMULATOR,
    mismatch_worker,
)
from spawn import read_json, start_ranks


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
