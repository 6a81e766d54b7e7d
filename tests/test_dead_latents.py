"""Tests for TokensSinceFired: by hand, against a Python reference, and across real gloo groups.

The reference is a plain Python list of counters, updated step by step. Across ranks, every
rank's state must equal, exactly, the single-process state on the step's rows of every rank
concatenated, with one collective per update; a rank whose state differs is caught on every rank.
"""

import inspect
import itertools

import hypothesis.strategies as st
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter

from sae_losses import TokensSinceFired
from spawn import capture, exception_chain, init_gloo, run_ranks, save_result

update_unchecked = inspect.unwrap(TokensSinceFired.update)
LATENTS = 12
STEPS = 5


def reference(steps, latents):
    """(since_fired, tokens) after ``steps``, each a list of (row values, kept) pairs."""
    since, tokens = [0] * latents, 0
    for rows in steps:
        kept = [values for values, keep in rows if keep]
        fired = {f for values in kept for f, v in enumerate(values) if v != 0}
        since = [0 if f in fired else s + len(kept) for f, s in enumerate(since)]
        tokens += len(kept)
    return since, tokens


def test_worked_example():
    tracker = TokensSinceFired.empty(3)
    tracker = tracker.update(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))  # 2 tokens
    assert tracker.since_fired.tolist() == [2, 0, 2]
    tracker = tracker.update(torch.tensor([[0.0, 0.0, -3.0]]))  # 1 token; negative is active
    assert tracker.since_fired.tolist() == [3, 1, 0]
    assert tracker.tokens.item() == 3
    assert tracker.dead(threshold=1).tolist() == [True, False, False]
    assert tracker.dead(threshold=3).tolist() == [False, False, False]  # more than 3: none


def test_masked_rows_neither_fire_nor_count_even_holding_nan():
    latents = torch.tensor([[0.0, 1.0], [torch.nan, 5.0], [0.0, 0.0]])
    keep = torch.tensor([True, False, True])
    tracker = TokensSinceFired.empty(2).update(latents, mask=keep)
    assert tracker.since_fired.tolist() == [2, 0]
    assert tracker.tokens.item() == 2


def test_empty_batch_and_immutability():
    start = TokensSinceFired.empty(4).update(torch.ones(1, 4))
    after = start.update(torch.zeros(0, 4))
    assert after.since_fired.tolist() == [0, 0, 0, 0]
    assert after.tokens.item() == 1
    after = start.update(torch.zeros(3, 4))
    assert start.since_fired.tolist() == [0, 0, 0, 0]  # the input tracker is unchanged
    assert after.since_fired.tolist() == [3, 3, 3, 3]


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.lists(
            st.tuples(
                st.lists(st.sampled_from([0.0, 0.0, 0.5, -1.0]), min_size=5, max_size=5),
                st.booleans(),
            ),
            max_size=6,
        ),
        max_size=6,
    )
)
def test_matches_the_python_reference(steps):
    tracker = TokensSinceFired.empty(5)
    for rows in steps:
        values = torch.tensor([v for v, _ in rows], dtype=torch.float32).reshape(len(rows), 5)
        keep = torch.tensor([k for _, k in rows], dtype=torch.bool)
        tracker = tracker.update(values, mask=keep)
    since, tokens = reference(steps, 5)
    assert tracker.since_fired.tolist() == since
    assert tracker.tokens.item() == tokens


def test_state_dict_round_trip(tmp_path):
    tracker = TokensSinceFired.empty(3).update(torch.tensor([[1.0, 0.0, 0.0]]))
    torch.save(tracker.state_dict(), tmp_path / "state.pt")
    loaded = TokensSinceFired.from_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(loaded.since_fired, tracker.since_fired)
    assert torch.equal(loaded.tokens, tracker.tokens)


@pytest.mark.compile
def test_compiled_update_does_not_recompile_and_does_not_sync():
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(lambda t, z, m: t.update(z, mask=m), backend=counter, fullgraph=True)
    tracker = eager = TokensSinceFired.empty(6)
    for batch in (3, 4, 7, 9):
        latents = torch.randn(batch, 6) * (torch.rand(batch, 6) < 0.3)
        keep = torch.arange(batch) != 1
        tracker, eager = step(tracker, latents, keep), eager.update(latents, mask=keep)
        assert torch.equal(tracker.since_fired, eager.since_fired)
        assert torch.equal(tracker.tokens, eager.tokens)
    assert counter.frame_count <= 2
    # check="host" reads the check back: fullgraph refuses the sync.
    torch._dynamo.reset()
    host = torch.compile(lambda t, z: t.update(z, check="host"), backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.UserError, match="data-dependent"):
        host(tracker, torch.ones(2, 6))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: TokensSinceFired.empty(0),
            ValueError,
            r"`latents` must be a positive Python int, got 0\.",
        ),
        (
            lambda: update_unchecked(TokensSinceFired.empty(3), torch.ones(2, 4)),
            ValueError,
            r"`latents` must have shape \(batch, latent\) = \(batch, 3\), got shape \(2, 4\)\.",
        ),
        (
            lambda: update_unchecked(TokensSinceFired.empty(3), torch.ones(2, 3).long()),
            TypeError,
            r"`latents` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: update_unchecked(TokensSinceFired.empty(3), torch.ones(2, 3), check="never"),
            ValueError,
            r"`check` must be 'device' or 'host', got 'never'\.",
        ),
        (
            lambda: update_unchecked(TokensSinceFired.empty(3), torch.ones(2, 3, device="meta")),
            ValueError,
            r"`latents` is on meta but the tracker is on cpu\.",
        ),
        (
            lambda: update_unchecked(
                TokensSinceFired.empty(3), torch.ones(2, 3), mask=torch.ones(2)
            ),
            TypeError,
            r"`mask` must be a bool tensor, got dtype torch\.float32\.",
        ),
        (
            lambda: TokensSinceFired.empty(3).dead(threshold=-1),
            ValueError,
            r"`threshold` must be a non-negative Python int, got -1\.",
        ),
        (
            lambda: TokensSinceFired.from_state_dict({"since_fired": torch.zeros(3)}),
            ValueError,
            r"a TokensSinceFired state has the keys 'since_fired' and 'tokens', "
            r"got \['since_fired'\]\.",
        ),
    ],
    ids=[
        "empty 0",
        "latent count",
        "integer latents",
        "check mode",
        "device",
        "float mask",
        "negative threshold",
        "state keys",
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_construction_checks_the_fields():
    construct = inspect.unwrap(TokensSinceFired.__init__)
    tracker = object.__new__(TokensSinceFired)
    with pytest.raises(
        TypeError,
        match=r"`since_fired` must be a 1-d int64 tensor, got a "
        r"torch\.float32 tensor of shape \(3,\)\.",
    ):
        construct(tracker, torch.zeros(3), torch.tensor(0))
    with pytest.raises(ValueError, match=r"`tokens` is on meta but `since_fired` is on cpu\."):
        construct(tracker, torch.zeros(3, dtype=torch.long), torch.tensor(0, device="meta"))


# --- real gloo groups -----------------------------------------------------------------------


def step_rows(step, world_size):
    """The step's global latents and mask, and each rank's slice of them (uneven; one empty)."""
    generator = torch.Generator().manual_seed(step)
    rows = (11, 6, 0, 9, 4)[step]
    latents = torch.randn(rows, LATENTS, generator=generator)
    latents = latents * (torch.rand(rows, LATENTS, generator=generator) < 0.15)
    latents[:, :2] = 0.0  # latents 0 and 1 never fire
    keep = torch.arange(rows) % 4 != 3
    latents[~keep] = torch.nan  # padding
    cuts = torch.tensor(
        [0, *sorted((step * 5 + 3 * r) % (rows + 1) for r in range(1, world_size)), rows]
    )
    return latents, keep, [slice(int(a), int(b)) for a, b in itertools.pairwise(cuts)]


def gloo_calls(run):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
    return result, sum(event.name.startswith("gloo:") for event in prof.events())


def tracking_worker(rank, world_size, port, out_dir):
    init_gloo(rank, world_size, port)
    try:
        trackers = {
            "device": TokensSinceFired.empty(LATENTS),
            "host": TokensSinceFired.empty(LATENTS),
        }
        states, collectives = [], []
        for step in range(STEPS):
            latents, keep, slices = step_rows(step, world_size)
            rows, kept = latents[slices[rank]], keep[slices[rank]]
            for check, tracker in trackers.items():
                trackers[check], calls = gloo_calls(
                    lambda t=tracker, c=check, z=rows, m=kept: t.update(z, mask=m, check=c)
                )
                collectives.append(calls)
            states.append(
                torch.stack([trackers["device"].since_fired, trackers["host"].since_fired])
            )
        # Rank 1 holds another state (a different checkpoint): every rank must raise, and the
        # next update must still pair with the next update.
        good = trackers["device"]
        bad = TokensSinceFired(good.since_fired + (rank == 1), good.tokens)
        latents = torch.zeros(2, LATENTS)
        outcomes = {
            check: capture(lambda c=check: bad.update(latents, check=c), describe=str)
            for check in ("device", "host")
        }
        after = good.update(latents)
        non_member = ""
        if world_size == 3:
            pair = dist.new_group([0, 1])
            if rank == 2:
                try:
                    good.update(latents, group=pair)
                    non_member = "returned"
                except ValueError as error:
                    non_member = exception_chain(error)
            else:
                pair_tokens = good.update(latents[: rank + 1], group=pair).tokens
                non_member = f"pair tokens {int(pair_tokens - good.tokens)}"
        save_result(
            out_dir,
            rank,
            {
                "states": torch.stack(states),
                "tokens": good.tokens,
                "collectives": torch.tensor(collectives),
                "device": outcomes["device"]["kind"],
                "device_message": outcomes["device"].get("message", ""),
                "host": outcomes["host"]["kind"],
                "host_message": outcomes["host"].get("message", ""),
                "after": after.since_fired,
                "non_member": non_member,
            },
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_equal_one_process_on_every_rank_rows(world_size, tmp_path):
    results = run_ranks(tracking_worker, world_size, tmp_path)
    single, expected = TokensSinceFired.empty(LATENTS), []
    for step in range(STEPS):
        latents, keep, _ = step_rows(step, world_size)
        single = single.update(latents, mask=keep)
        expected.append(single.since_fired)
    expected = torch.stack(expected)
    assert expected[:, :2].min() > 0  # the two latents that never fire are counted
    assert (expected == 0).any()
    for rank, result in enumerate(results):
        assert torch.equal(result["states"][:, 0], expected), rank
        assert torch.equal(result["states"][:, 1], expected), rank
        assert torch.equal(result["tokens"], single.tokens)
        assert result["collectives"].tolist() == [1] * (2 * STEPS)  # one per update
        assert result["device"] == "RuntimeError"
        assert f"the {world_size} ranks hold different states" in result["device_message"]
        assert result["host"] == "ValueError"
        assert f"the {world_size} ranks hold different states" in result["host_message"]
        assert torch.equal(
            result["after"], single.update(torch.zeros(2 * world_size, LATENTS)).since_fired
        )
    if world_size == 3:
        assert results[0]["non_member"] == results[1]["non_member"] == "pair tokens 3"
        assert "this rank is not a member of `group`" in results[2]["non_member"]
