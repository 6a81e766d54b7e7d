"""Tests for StreamingSpliceScores and StreamingReconstructionBias: float64 references, ratios of
means (not means of per-batch ratios), token masks that are NaN-safe, the merge and chunking laws,
checkpoints, errors, compile, and 2 gloo ranks on uneven shards against one process."""

import inspect
import math
import pickle
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter

from helpers import randn
from logits_cases import ce_rows, kl_rows
from sae_losses import (
    StreamingMean,
    StreamingReconstructionBias,
    StreamingSpliceScores,
    all_reduce,
    cosine_similarity,
    l2_norm_ratio,
)
from spawn import init_gloo, run_ranks, save_result

VOCAB = 11
KEYS = ("ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated")
SCORES = (*KEYS, "ce_loss_score", "kl_div_score")


def token_rows(n, seed=0, dtype=torch.float32):
    """``(clean, spliced, ablated, targets)`` for ``n`` tokens: the spliced logits are the clean
    ones plus noise and the ablated ones unrelated, so CE_clean < CE_spliced < CE_ablated."""
    clean = 3 * randn(n, VOCAB, dtype=torch.float64, seed=seed)
    spliced = clean + 0.7 * randn(n, VOCAB, dtype=torch.float64, seed=seed + 1)
    ablated = randn(n, VOCAB, dtype=torch.float64, seed=seed + 2)
    targets = torch.where(torch.arange(n) % 4 == 3, (seed + torch.arange(n)) % VOCAB, 0)
    targets = torch.where(torch.arange(n) % 4 == 3, targets, clean.argmax(-1))
    return clean.to(dtype), spliced.to(dtype), ablated.to(dtype), targets


def scores_reference(clean, spliced, ablated, targets, mask=None, kl_mask=None):
    """SAELens's definitions in float64: each mean over the kept tokens, then the scores."""
    ce_keep = torch.ones(len(targets), dtype=torch.bool) if mask is None else mask
    kl_keep = ce_keep if kl_mask is None else kl_mask
    ce = [ce_rows(x[ce_keep], targets[ce_keep]).mean() for x in (clean, spliced, ablated)]
    kl = [kl_rows(clean[kl_keep], x[kl_keep]).mean() for x in (spliced, ablated)]
    means = dict(zip(KEYS, [*ce, *kl], strict=True))
    means["ce_loss_score"] = (ce[2] - ce[1]) / (ce[2] - ce[0])
    means["kl_div_score"] = (kl[1] - kl[0]) / kl[1]
    return means


def stream_scores(batches, **masks):
    scores = StreamingSpliceScores.empty()
    for batch in batches:
        scores = scores.update(*batch, **masks)
    return scores


def assert_scores_close(found, expected, rtol):
    assert tuple(found) == SCORES
    for key in SCORES:
        assert found[key].dtype == torch.float64
        assert found[key].shape == ()
        torch.testing.assert_close(found[key], expected[key].double(), rtol=rtol, atol=0, msg=key)


def cut(rows, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(tuple(t[start : start + size] for t in rows))
        start += size
    return out


# --- splice scores --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scores_are_taken_from_means_over_every_token(dtype):
    rows = token_rows(40, seed=1, dtype=dtype)
    sizes = [3, 30, 7]  # uneven batches
    scores = stream_scores(cut(rows, sizes))
    assert (scores.count.item(), scores.kl_count.item()) == (40, 40)
    expected = scores_reference(*rows)  # on the same (rounded) logits
    assert_scores_close(scores.compute(), expected, rtol=1e-12 if dtype == torch.float64 else 2e-6)
    # The mean of per-batch scores (dictionary_learning's frac_recovered) is another number.
    per_batch = [scores_reference(*batch)["ce_loss_score"] for batch in cut(rows, sizes)]
    assert abs(sum(per_batch) / 3 - expected["ce_loss_score"]) > 1e-2


def log_softmax_of_two(a):
    """log softmax((a, 0)), by hand: (a, 0) - log(1 + e^a)."""
    z = math.log1p(math.exp(a))
    return a - z, -z


def test_hand_worked_scores():
    # One token, target 0, logits (a, 0): CE = -log_softmax(a, 0)[0]; clean a = 2, spliced 1,
    # ablated 0. KL(p || q) = Σ p (log p - log q) from the same log-softmaxes.
    logits = [torch.tensor([[a, 0.0]], dtype=torch.float64) for a in (2.0, 1.0, 0.0)]
    scores = StreamingSpliceScores.empty().update(*logits, torch.tensor([0])).compute()
    ce = [-log_softmax_of_two(a)[0] for a in (2.0, 1.0, 0.0)]
    log_p = log_softmax_of_two(2.0)
    kl = [
        sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_softmax_of_two(a), strict=True))
        for a in (1.0, 0.0)
    ]
    expected = [*ce, *kl, (ce[2] - ce[1]) / (ce[2] - ce[0]), (kl[1] - kl[0]) / kl[1]]
    for key, value in zip(SCORES, expected, strict=True):
        assert scores[key].item() == pytest.approx(value, rel=1e-14), key


def test_masks_select_tokens_and_dropped_rows_are_inert():
    clean, spliced, ablated, targets = token_rows(24, seed=2)
    mask = torch.arange(24) % 5 != 2
    kl_mask = torch.arange(24) % 3 != 0
    reference = scores_reference(clean, spliced, ablated, targets, mask, kl_mask)
    # Rows dropped from both sets hold NaN and -100 padding; rows only the KL keeps hold a
    # target that would be out of range: the CE ignores it.
    dropped = ~mask & ~kl_mask
    bad = [torch.where(dropped[:, None], torch.nan, x) for x in (clean, spliced, ablated)]
    bad_targets = torch.where(dropped, -100, torch.where(~mask, VOCAB + 5, targets))
    scores = stream_scores([(*bad, bad_targets)], mask=mask, kl_mask=kl_mask)
    assert (scores.count.item(), scores.kl_count.item()) == (mask.sum(), kl_mask.sum())
    assert_scores_close(scores.compute(), reference, rtol=2e-6)
    # Without kl_mask, the KL scores the rows `mask` keeps.
    alone = stream_scores([(clean, spliced, ablated, targets)], mask=mask).compute()
    assert_scores_close(alone, scores_reference(clean, spliced, ablated, targets, mask), 2e-6)


def test_an_out_of_range_target_in_a_kept_row_raises():
    clean, spliced, ablated, targets = token_rows(4)
    targets = targets.clone()
    targets[2] = VOCAB
    with pytest.raises((IndexError, RuntimeError)):
        StreamingSpliceScores.empty().update(clean, spliced, ablated, targets)


def test_empty_computes_nan_and_update_detaches():
    assert all(value.isnan() for value in StreamingSpliceScores.empty().compute().values())
    clean, spliced, ablated, targets = token_rows(5)
    leaves = [x.requires_grad_() for x in (clean, spliced, ablated)]
    scores = StreamingSpliceScores.empty().update(*leaves, targets)
    assert not any(v.requires_grad for v in scores.state_dict().values())


# Token batches of random sizes (0 included), cut points, and a merge order.
batch_sizes = st.lists(st.integers(0, 9), min_size=1, max_size=5)


@settings(max_examples=30, deadline=None)
@given(sizes=batch_sizes, seed=st.integers(0, 1000), order=st.permutations(range(5)))
def test_chunking_and_merge_order_agree_to_rounding(sizes, seed, order):
    rows = token_rows(sum(sizes), seed=seed, dtype=torch.float64)
    one_stream = stream_scores([rows])
    parts = [stream_scores([batch]) for batch in cut(rows, sizes)]
    parts += [StreamingSpliceScores.empty()] * (5 - len(parts))
    merged = StreamingSpliceScores.empty()
    for index in order:
        merged = merged.merge(parts[index])
    chunked = stream_scores(cut(rows, sizes))
    for other in (merged, chunked):
        assert other.count.item() == one_stream.count.item() == sum(sizes)  # exact
        assert other.kl_count.item() == sum(sizes)
        torch.testing.assert_close(other.ce, one_stream.ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(other.kl, one_stream.kl, rtol=1e-12, atol=1e-12)
    # empty() is the identity of merge, exactly.
    assert one_stream.merge(StreamingSpliceScores.empty()) == one_stream
    assert StreamingSpliceScores.empty().merge(one_stream) == one_stream


def test_checkpoint_pickle_and_pytree_round_trips():
    scores = stream_scores([token_rows(6, seed=3)])
    state = scores.state_dict()
    assert list(state) == ["ce", "kl", "count", "kl_count"]
    assert StreamingSpliceScores.from_state_dict(state) == scores
    assert pickle.loads(pickle.dumps(scores)) == scores
    leaves, spec = torch.utils._pytree.tree_flatten({"scores": scores})
    assert torch.utils._pytree.tree_unflatten(leaves, spec)["scores"] == scores


def test_every_constructor_rejects_negative_counts_and_wrong_fields():
    good = StreamingSpliceScores.empty().state_dict()
    init = inspect.unwrap(StreamingSpliceScores.__init__)

    def construct(**changes):
        self = object.__new__(StreamingSpliceScores)
        init(self, **{**good, **changes})

    for name in ("count", "kl_count"):
        with pytest.raises(ValueError, match=rf"`{name}` must not be negative, got -2\."):
            construct(**{name: torch.tensor(-2)})
    with pytest.raises(ValueError, match=r"must have shapes \(3,\) and \(2,\), got \(2,\) and"):
        construct(ce=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"`kl` must be a 1-d float64 tensor, got a torch.float32"):
        construct(kl=torch.zeros(2))


update_unchecked = inspect.unwrap(StreamingSpliceScores.update)
LOGITS = torch.zeros(3, VOCAB)
TARGETS = torch.zeros(3, dtype=torch.int64)
SPLICE_ERRORS = [
    (
        (torch.zeros(2, 3, VOCAB), torch.zeros(2, 3, VOCAB), torch.zeros(2, 3, VOCAB), TARGETS),
        {},
        ValueError,
        r"`clean_logits` must have shape \(batch, vocab\), one row per token \(flatten \(batch, "
        r"seq\) first\), got shape \(2, 3, 11\)\.",
    ),
    (
        (LOGITS, torch.zeros(3, VOCAB + 1), LOGITS, TARGETS),
        {},
        ValueError,
        r"`clean_logits` and `spliced_logits` must have the same shape, got \(3, 11\) and "
        r"\(3, 12\)\.",
    ),
    (
        (LOGITS, LOGITS, LOGITS.long(), TARGETS),
        {},
        TypeError,
        r"`ablated_logits` must be a floating-point tensor, got dtype torch.int64\.",
    ),
    (
        (LOGITS, LOGITS, LOGITS, TARGETS),
        {"mask": torch.ones(3)},
        TypeError,
        r"`mask` must be a bool tensor, got dtype torch.float32\.",
    ),
    (
        (LOGITS, LOGITS, LOGITS, TARGETS),
        {"kl_mask": torch.ones(4, dtype=torch.bool)},
        ValueError,
        r"`mask` must have shape \(batch,\) = \(3,\), got \(4,\)\.",
    ),
]


@pytest.mark.parametrize(("args", "options", "error", "message"), SPLICE_ERRORS)
def test_splice_score_errors(args, options, error, message):
    with pytest.raises(error, match=message):
        update_unchecked(StreamingSpliceScores.empty(), *args, **options)


def test_merge_errors():
    with pytest.raises(
        TypeError, match=r"can only merge a StreamingSpliceScores, got StreamingMean"
    ):
        StreamingSpliceScores.empty().merge(StreamingMean.empty())
    with pytest.raises(ValueError, match=r"cannot merge accumulators of different shapes"):
        StreamingReconstructionBias.empty((2,)).merge(StreamingReconstructionBias.empty())


# --- the relative reconstruction bias -------------------------------------------------------------


def bias_rows(n, shape=(), seed=0, dtype=torch.float32):
    """``(decoded, source)``: the decoded rows shrunk to 0.8 of the source, plus noise."""
    source = 2 + randn(n, *shape, 6, dtype=torch.float64, seed=seed)
    decoded = 0.8 * source + 0.3 * randn(n, *shape, 6, dtype=torch.float64, seed=seed + 1)
    return decoded.to(dtype), source.to(dtype)


def bias_reference(decoded, source):
    """Float64 Σ‖x̂‖² / Σ⟨x, x̂⟩ over every row (per component)."""
    d, s = decoded.double(), source.double()
    return d.square().sum(-1).sum(0) / (d * s).sum(-1).sum(0)


def stream_bias(batches, shape=(), **options):
    bias = StreamingReconstructionBias.empty(shape)
    for batch in batches:
        bias = bias.update(*batch, **options)
    return bias


@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bias_is_a_ratio_of_sums_over_every_row(shape, dtype):
    rows = bias_rows(50, shape, seed=4, dtype=dtype)
    sizes = [2, 41, 7]
    bias = stream_bias(cut(rows, sizes), shape)
    assert bias.count.item() == 50
    assert bias.compute().shape == shape
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(bias.compute(), bias_reference(*rows), rtol=tolerance, atol=0)
    # SAELens's, SAEBench's and dictionary_learning's: the mean of per-batch ratios, another number.
    per_batch = torch.stack([bias_reference(*batch) for batch in cut(rows, sizes)]).mean(0)
    assert (per_batch - bias_reference(*rows)).abs().min() > 1e-3


def test_bias_mask_drops_nan_rows_and_rejects_weights():
    decoded, source = bias_rows(9, seed=5)
    keep = torch.arange(9) % 3 != 0
    bad = (
        torch.where(keep[:, None], decoded, torch.nan),
        torch.where(keep[:, None], source, torch.inf),
    )
    bias = stream_bias([bad], mask=keep)
    assert bias.count.item() == 6
    torch.testing.assert_close(bias.compute(), bias_reference(decoded[keep], source[keep]))
    unchecked = inspect.unwrap(StreamingReconstructionBias.update)
    with pytest.raises(TypeError, match=r"`mask` must be a bool tensor, got dtype torch.float32"):
        unchecked(StreamingReconstructionBias.empty(), decoded, source, mask=keep.float())


@settings(max_examples=30, deadline=None)
@given(sizes=batch_sizes, seed=st.integers(0, 1000), order=st.permutations(range(5)))
def test_bias_chunking_and_merge_order_agree_to_rounding(sizes, seed, order):
    rows = bias_rows(sum(sizes), (2,), seed=seed, dtype=torch.float64)
    one_stream = stream_bias([rows], (2,))
    parts = [stream_bias([batch], (2,)) for batch in cut(rows, sizes)]
    parts += [StreamingReconstructionBias.empty((2,))] * (5 - len(parts))
    merged = StreamingReconstructionBias.empty((2,))
    for index in order:
        merged = merged.merge(parts[index])
    for other in (merged, stream_bias(cut(rows, sizes), (2,))):
        assert other.count.item() == sum(sizes)
        for name in ("squared_norm", "inner_product"):
            torch.testing.assert_close(
                getattr(other, name), getattr(one_stream, name), rtol=1e-12, atol=1e-12
            )
    assert one_stream.merge(StreamingReconstructionBias.empty((2,))) == one_stream


BIAS_ERRORS = [
    ((torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, r"`decoded` and `source` must have"),
    ((torch.zeros(2, 5, 3), torch.zeros(2, 5, 3)), ValueError, r"must have shape \(batch, \*\(\)"),
    ((torch.zeros(3), torch.zeros(3)), ValueError, r"at least 2 dimensions"),
]


@pytest.mark.parametrize(("args", "error", "message"), BIAS_ERRORS)
def test_bias_errors(args, error, message):
    unchecked = inspect.unwrap(StreamingReconstructionBias.update)
    with pytest.raises(error, match=message):
        unchecked(StreamingReconstructionBias.empty(), *args)


# --- no host syncs, compile -----------------------------------------------------------------------


def test_update_merge_and_compute_read_no_values_on_the_host():
    # Any .item(), bool() or count check on this path raises on the meta device.
    meta = [torch.empty(5, VOCAB, device="meta") for _ in range(3)]
    targets = torch.zeros(5, dtype=torch.int64, device="meta")
    mask = torch.ones(5, dtype=torch.bool, device="meta")
    scores = StreamingSpliceScores.empty(device="meta").update(*meta, targets, mask=mask)
    assert {v.device.type for v in scores.merge(scores).compute().values()} == {"meta"}
    decoded = torch.empty(5, 4, device="meta")
    bias = StreamingReconstructionBias.empty(device="meta").update(decoded, decoded, mask=mask)
    assert bias.merge(bias).compute().device.type == "meta"


@pytest.mark.compile
def test_compiled_steps_do_not_recompile_across_batch_sizes():
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(scores, bias, clean, spliced, ablated, targets, decoded, source, mask):
        scores = scores.update(clean, spliced, ablated, targets, mask=mask)
        return scores, bias.update(decoded, source, mask=mask)

    scores, bias = StreamingSpliceScores.empty(), StreamingReconstructionBias.empty()
    eager_scores, eager_bias = scores, bias
    for n in (4, 9, 17):
        logits = token_rows(n, seed=n)
        rows = bias_rows(n, seed=n)
        mask = torch.arange(n) % 3 != 1
        scores, bias = step(scores, bias, *logits, *rows, mask)
        eager_scores = eager_scores.update(*logits, mask=mask)
        eager_bias = eager_bias.update(*rows, mask=mask)
    assert counter.frame_count <= 2
    assert scores.count == eager_scores.count
    torch.testing.assert_close(scores.ce, eager_scores.ce, rtol=1e-6, atol=0)
    torch.testing.assert_close(bias.compute(), eager_bias.compute(), rtol=1e-6, atol=0)


# --- 2 gloo ranks, uneven shards, one collective ------------------------------------------------

TOKENS, ROWS = 37, 29
SHARDS = {0: (0, 5, 0, 21), 1: (5, TOKENS, 21, ROWS)}  # token and activation row ranges


def evaluation_tree(tokens=(0, TOKENS), rows=(0, ROWS)):
    """The metrics one rank keeps over its tokens and activation rows: four accumulators."""
    logits = [t[slice(*tokens)] for t in token_rows(TOKENS, seed=7)]
    decoded, source = (t[slice(*rows)] for t in bias_rows(ROWS, seed=8))
    mask = (torch.arange(TOKENS) % 6 != 5)[slice(*tokens)]
    return {
        "scores": StreamingSpliceScores.empty().update(*logits, mask=mask),
        "bias": StreamingReconstructionBias.empty().update(decoded, source),
        "cosine": StreamingMean.empty().update(cosine_similarity(decoded, source, reduce="none")),
        "l2_ratio": StreamingMean.empty().update(l2_norm_ratio(decoded, source, reduce="none")),
    }


def worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    init_gloo(rank, world_size, port)
    try:
        start, stop, row_start, row_stop = SHARDS[rank]
        tree = evaluation_tree((start, stop), (row_start, row_stop))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            synced = all_reduce(tree)
        collectives = sum(event.name.startswith("gloo:") for event in prof.events())
        save_result(
            out_dir,
            rank,
            {
                "scores": synced["scores"].compute(),
                "bias": synced["bias"].compute(),
                "cosine": synced["cosine"].compute(),
                "l2_ratio": synced["l2_ratio"].compute(),
                "counts": torch.stack([synced["scores"].count, synced["bias"].count]),
                "collectives": torch.tensor(collectives),
            },
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_on_uneven_shards_equal_one_process(tmp_path):
    one = evaluation_tree()
    results = run_ranks(worker, 2, tmp_path)
    for result in results:
        assert result["collectives"].item() == 1  # everything in one all_gather
        assert result["counts"].tolist() == [one["scores"].count.item(), ROWS]
        # Each token's CE and KL are float32 values, and aten's float32 reductions over the
        # vocabulary may round differently for a shard's batch shape than for the whole batch
        # (1 ulp, seen as 3e-8 relative in the means): float32 rounding, not a merging error.
        for key, value in one["scores"].compute().items():
            torch.testing.assert_close(result["scores"][key], value, rtol=1e-6, atol=0)
        for name in ("bias", "cosine", "l2_ratio"):
            torch.testing.assert_close(result[name], one[name].compute(), rtol=1e-12, atol=0)


def test_benchmark_smoke_run_prints_every_table():
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_downstream.py", "--quick"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for heading in ("cosine, 64 x 32, float32, forward", "l2 ratio, 64 x 32, bfloat16, forward"):
        assert f"### {heading}: peak memory beyond the inputs" in result.stdout
    assert "### splice scores, 16 x 100, float32: time" in result.stdout
    assert "- memory, ours / SAELens/SAEBench cossim: " in result.stdout
