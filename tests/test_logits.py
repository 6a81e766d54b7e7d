"""Tests for the logit terms: cross_entropy and kl_divergence.

Float64 references (logsumexp and log_softmax in float64) across shapes, reduce modes, dtypes and
masks; gradcheck; the laws that tie the two together; bfloat16 logits near 1e4; -inf logits; a
vocabulary of one; targets out of range; NaN-safe masks; row blocks over ``logits[:, :-1]``;
peak memory and what is saved for backward; torch.compile and torch.func; the error messages;
the benchmark's smoke run. The registry (tests/terms.py) runs the shared contract tests too.
"""

import importlib
import inspect
import math
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from hypothesis import given, settings
from torch._dynamo.testing import CompileCounter

from helpers import SavedTensors, randn
from sae_losses import _rowops, cross_entropy, kl_divergence
from sae_losses._logits import vocab_blocks

ROOT = Path(__file__).resolve().parent.parent
REDUCE_MODES = ["none", "mean", "sum"]
ce_unchecked = inspect.unwrap(cross_entropy)
kl_unchecked = inspect.unwrap(kl_divergence)


# --- float64 references ---------------------------------------------------------------------------


def ce_rows(logits, targets):
    """logsumexp - the target's logit, in float64."""
    z = logits.double()
    return torch.logsumexp(z, -1) - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_rows(reference, logits):
    """sum p (log p - log q) over the entries with p > 0, from float64 log_softmax."""
    log_p, log_q = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0).sum(-1)


def reduced(rows, reduce, mask=None):
    """``w * rows`` (exactly 0 where w = 0), its sum, or its sum over the sum of weights."""
    w = torch.ones(rows.shape[0], dtype=torch.float64) if mask is None else mask.double()
    view = w.reshape((-1,) + (1,) * (rows.ndim - 1))
    weighted = torch.where(view != 0, rows * view, 0)
    if reduce == "none":
        return weighted
    return weighted.sum(0) if reduce == "sum" else weighted.sum(0) / w.sum()


def draw(shape, dtype=torch.float64, seed=0, scale=2.0):
    return (scale * randn(*shape, dtype=torch.float64, seed=seed)).to(dtype)


def targets_for(logits, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator)


def make_mask(kind, batch):
    keep = torch.arange(batch) % 3 != 1
    if kind == "bool":
        return keep
    return torch.where(keep, torch.linspace(0.5, 2.0, batch, dtype=torch.float64), 0)


def gradients(value, inputs):
    found = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found, strict=True)]


SHAPES = [(5, 7), (4, 3, 6), (3, 2, 4, 5), (1, 1)]
# Relative to the value (CE: a sum of two non-negative terms) or, for the KL, whose value is a
# sum of signed terms, also absolute at float32's rounding of terms of size 1.
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


@pytest.mark.parametrize("op", ["cross_entropy", "kl_divergence"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_matches_float64_reference(op, shape, dtype, reduce, mask_kind):
    logits = draw(shape, dtype, seed=1)
    mask = None if mask_kind == "none" else make_mask(mask_kind, shape[0])
    if op == "cross_entropy":
        other = targets_for(logits, seed=2)
        result = cross_entropy(logits, other, reduce=reduce, mask=mask)
        expected = reduced(ce_rows(logits, other), reduce, mask)
    else:
        other = draw(shape, dtype, seed=2)
        result = kl_divergence(other, logits, reduce=reduce, mask=mask)
        expected = reduced(kl_rows(other, logits), reduce, mask)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.shape == (shape[:-1] if reduce == "none" else shape[1:-1])
    rtol = TOLERANCES[dtype]
    atol = 0 if op == "cross_entropy" else 10 * rtol
    torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=atol, equal_nan=True)


def test_worked_values():
    # Uniform logits: CE = log V whatever the target; KL between equal distributions is 0.
    uniform = torch.zeros(2, 4, dtype=torch.float64)
    torch.testing.assert_close(
        cross_entropy(uniform, torch.tensor([0, 3]), reduce="none"),
        torch.full((2,), math.log(4), dtype=torch.float64),
    )
    # [log 1, log 2, log 1]: p = (1/4, 1/2, 1/4); the target 1 has -log(1/2).
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)
    assert cross_entropy(logits, torch.tensor([1])).item() == pytest.approx(math.log(2), rel=1e-15)
    # p = (1/2, 1/2), q = (1/4, 3/4): (1/2) log 2 + (1/2) log(2/3) = (1/2) log(4/3).
    reference = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert kl_divergence(reference, logits).item() == pytest.approx(0.5 * math.log(4 / 3), 1e-15)
    # The other direction: (1/4) log(1/2) + (3/4) log(3/2).
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl_divergence(logits, reference).item() == pytest.approx(expected, rel=1e-15)


# --- laws -----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_expected_cross_entropy_is_kl_plus_entropy(rows, vocab, seed, scale):
    # sum_t p_t CE(z, t) = H(p, q) = KL(p || q) + H(p): sparsify's "kl" loss is H(p, q).
    reference = draw((rows, vocab), seed=seed, scale=scale)
    logits = draw((rows, vocab), seed=seed + 1, scale=scale)
    p = reference.softmax(-1)
    every_target = torch.arange(vocab).repeat(rows, 1)
    ce = cross_entropy(logits.unsqueeze(1).expand(-1, vocab, -1), every_target, reduce="none")
    cross = (p * ce).sum(-1)
    entropy = -(p * reference.log_softmax(-1)).sum(-1)
    kl = kl_divergence(reference, logits, reduce="none")
    torch.testing.assert_close(cross, kl + entropy, rtol=1e-12, atol=1e-12)
    assert (kl >= -1e-15).all()


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(3, 5), (2, 3, 4), (4, 1)]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1.0, 100.0, 1e4]),
)
def test_kl_of_a_distribution_with_itself_is_exactly_zero(shape, dtype, seed, scale):
    logits = draw(shape, dtype, seed=seed, scale=scale)
    rows = kl_divergence(logits, logits.clone(), reduce="none")
    assert torch.equal(rows, torch.zeros_like(rows))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_adding_a_constant_to_a_row_changes_nothing(rows, vocab, seed):
    logits, reference = draw((rows, vocab), seed=seed), draw((rows, vocab), seed=seed + 1)
    shift = draw((rows, 1), seed=seed + 2, scale=50.0)
    targets = targets_for(logits, seed)
    torch.testing.assert_close(
        cross_entropy(logits + shift, targets, reduce="none"),
        cross_entropy(logits, targets, reduce="none"),
        rtol=1e-12,
        atol=1e-12,
    )
    torch.testing.assert_close(
        kl_divergence(reference - shift, logits + 2 * shift, reduce="none"),
        kl_divergence(reference, logits, reduce="none"),
        rtol=1e-12,
        atol=1e-12,
    )


# --- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("blocked", [False, True])
def test_gradcheck(monkeypatch, mask_kind, blocked):
    if blocked:  # blocks of 2 rows of 5: the hand-written blocked gradients
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 10)
    logits = draw((4, 2, 5), seed=3).requires_grad_()
    reference = draw((4, 2, 5), seed=4).requires_grad_()
    targets = targets_for(logits, seed=5)
    mask = None if mask_kind == "none" else make_mask(mask_kind, 4)
    # "none" checks every row's gradient; "mean" the reduce and the mask's weights on top.
    for reduce in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda z, reduce=reduce: cross_entropy(z, targets, reduce=reduce, mask=mask), (logits,)
        )
        assert torch.autograd.gradcheck(
            lambda r, z, reduce=reduce: kl_divergence(r, z, reduce=reduce, mask=mask),
            (reference, logits),
        )


def test_gradcheck_of_next_token_views_and_double_backward(monkeypatch):
    # logits[:, :-1] cannot be flattened without a copy: the blocks walk it row by row.
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 6)
    logits = draw((3, 4, 3), seed=6).requires_grad_()
    reference = draw((3, 4, 3), seed=7).requires_grad_()
    tokens = targets_for(logits, seed=8)

    def ce(z):
        return cross_entropy(z[:, :-1], tokens[:, 1:], reduce="none")

    def kl(r, z):
        return kl_divergence(r[:, :-1], z[:, :-1], mask=torch.tensor([True, False, True]))

    assert torch.autograd.gradcheck(ce, (logits,))
    assert torch.autograd.gradcheck(kl, (reference, logits))
    assert torch.autograd.gradgradcheck(ce, (logits,))
    assert torch.autograd.gradgradcheck(kl, (reference, logits))


def test_kl_gradient_to_logits_is_q_minus_p_and_sparsify_cross_entropy_matches_it():
    reference, logits = draw((4, 6), seed=9), draw((4, 6), seed=10).requires_grad_()
    (grad,) = torch.autograd.grad(kl_divergence(reference, logits, reduce="sum"), logits)
    torch.testing.assert_close(grad, logits.detach().softmax(-1) - reference.softmax(-1))
    # sparsify's kl loss, -sum p log q (trainer.py), has the same gradient to the logits.
    cross = -(reference.softmax(-1) * logits.log_softmax(-1)).sum()
    (sparsify_grad,) = torch.autograd.grad(cross, logits)
    torch.testing.assert_close(grad, sparsify_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gradients_have_the_input_dtype_and_one_rounding(dtype):
    logits = draw((6, 9), dtype, seed=11).requires_grad_()
    reference = draw((6, 9), dtype, seed=12).requires_grad_()
    targets = targets_for(logits, seed=13)
    grads = torch.autograd.grad(cross_entropy(logits, targets, reduce="sum"), logits)
    grads += torch.autograd.grad(
        kl_divergence(reference, logits, reduce="sum"), [reference, logits]
    )
    r64, z64 = (t.detach().double().requires_grad_() for t in (reference, logits))
    exact = [z64.detach().softmax(-1) - F.one_hot(targets, 9).double()]
    exact += torch.autograd.grad(kl_rows(r64, z64).sum(), [r64, z64])
    for got, want in zip(grads, exact, strict=True):
        assert got.dtype == dtype
        # float32 arithmetic, then one rounding to the dtype (none for float32).
        torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-6)


# --- precision and edge cases ---------------------------------------------------------------------


def large_logits(seed):
    """bfloat16 logits at +-1e4, where bfloat16's spacing is 64: each row's largest logits tie
    or sit 64 or more apart."""
    sign = torch.where(randn(64, 300, seed=seed) > 0, 1.0, -1.0)
    return (1e4 * sign + 60 * randn(64, 300, seed=seed + 1)).to(torch.bfloat16)


def test_bfloat16_logits_near_1e4_keep_float32_precision():
    logits = large_logits(20)
    top = logits.float().argmax(-1)
    for targets in (top, top.roll(1)):  # CE = log(ties) or ~0; and large values
        ce = cross_entropy(logits, targets, reduce="none").double()
        expected = ce_rows(logits, targets)
        torch.testing.assert_close(ce, expected, rtol=1e-6, atol=1e-7)
    # The plain float32 form, logsumexp - z_t, rounds logsumexp ~ 1e4 to ulp(1e4) = 2^-10.
    naive = torch.logsumexp(logits.float(), -1) - logits.float().gather(-1, top[:, None])[:, 0]
    assert (naive.double() - ce_rows(logits, top)).abs().max() > 1e-4
    # The KL after moving each row's largest logit down one bfloat16 step: values of O(1) to
    # O(64), each from terms near 1e4.
    nudged = logits.clone()
    nudged[torch.arange(64), top] -= 64
    kl = kl_divergence(logits, nudged, reduce="none").double()
    expected = kl_rows(logits, nudged)
    assert expected.median() > 1
    torch.testing.assert_close(kl, expected, rtol=1e-6, atol=1e-7)


def test_minus_infinity_logits():
    inf = math.inf
    logits = torch.tensor([[0.0, -inf, 1.0], [0.0, -inf, 1.0], [-inf, -inf, -inf]]).requires_grad_()
    targets = torch.tensor([0, 1, 0])
    rows = cross_entropy(logits, targets, reduce="none")
    # log(1 + e) - 0; the target's logit is -inf: +inf; a row of -inf is no distribution: NaN.
    assert rows[0].item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert rows[1].item() == inf
    assert rows[2].isnan()
    (grad,) = torch.autograd.grad(rows[:2].sum(), logits)
    assert grad[:2].isfinite().all()
    p = torch.tensor([1.0, 0.0, math.e]) / (1 + math.e)
    torch.testing.assert_close(grad[0], p - torch.tensor([1.0, 0.0, 0.0]))
    assert grad[1, 1] == -1.0  # softmax 0, minus the one-hot


def test_kl_with_minus_infinity_logits():
    inf = math.inf
    # Row 0: -inf at the same entry of both: p_v = q_v = 0 contributes 0 (SAELens: NaN).
    # Row 1: p_v = 0 where q_v > 0: finite. Row 2: p_v > 0 where q_v = 0: +inf.
    reference = torch.tensor([[0.0, 0.0, -inf], [0.0, 1.0, -inf], [0.0, 0.0, 1.0]])
    logits = torch.tensor([[0.0, 1.0, -inf], [0.0, 0.0, 2.0], [0.0, 0.0, -inf]])
    reference, logits = reference.requires_grad_(), logits.requires_grad_()
    rows = kl_divergence(reference, logits, reduce="none")
    torch.testing.assert_close(rows[:2].double(), kl_rows(reference[:2], logits[:2]))
    assert rows[:2].isfinite().all()
    assert rows[2].item() == inf
    saelens = F.kl_div(F.log_softmax(logits, -1), F.softmax(reference, -1), reduction="none")
    assert saelens.sum(-1)[0].isnan()
    # Gradients of the first two rows (the third's +inf would send NaN to the reference).
    first_two = kl_divergence(reference[:2], logits[:2], reduce="sum")
    grads = torch.autograd.grad(first_two, [reference, logits])
    for grad in grads:
        assert grad.isfinite().all()
    assert grads[0][0, 2] == 0
    assert grads[0][1, 2] == 0
    torch.testing.assert_close(
        grads[1][:2], (logits.detach().softmax(-1) - reference.detach().softmax(-1))[:2]
    )
    # Where the value is +inf, the gradient to the logits stays finite.
    (grad_logits,) = torch.autograd.grad(rows[2], logits)
    assert grad_logits.isfinite().all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("blocked", [False, True])
def test_a_nan_or_plus_inf_logit_in_a_kept_row_gives_nan(monkeypatch, bad, blocked):
    # Not a silent number: the KL kernel zeroes its 0 * inf terms, but never a NaN row.
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 10)
    reference, logits = draw((6, 5), seed=32), draw((6, 5), seed=33)
    targets = targets_for(logits, seed=34)
    spoiled = [t.clone() for t in (reference, logits)]
    spoiled[0][1, 2] = bad
    spoiled[1][4, 0] = bad
    spoiled[0][5] = -math.inf  # a row of -inf logits is no distribution either
    kl = kl_divergence(*spoiled, reduce="none")
    ce = cross_entropy(spoiled[1], targets, reduce="none")
    ce_reference = cross_entropy(spoiled[0], targets, reduce="none")
    assert kl[[1, 4, 5]].isnan().all()
    assert kl[[0, 2, 3]].isfinite().all()
    assert ce[4].isnan()
    assert ce_reference[[1, 5]].isnan().all()


def test_vocabulary_of_one():
    for dtype in (torch.float64, torch.bfloat16):
        logits = draw((4, 2, 1), dtype, seed=30).requires_grad_()
        reference = draw((4, 2, 1), dtype, seed=31).requires_grad_()
        zeros = torch.zeros(4, 2, dtype=torch.int64)
        ce = cross_entropy(logits, zeros, reduce="none")
        kl = kl_divergence(reference, logits, reduce="none")
        assert torch.equal(ce, torch.zeros_like(ce))
        assert torch.equal(kl, torch.zeros_like(kl))
        for grad in torch.autograd.grad(ce.sum() + kl.sum(), [logits, reference]):
            assert torch.equal(grad, torch.zeros_like(grad))


# --- targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-100, -1, 7, 2**40])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("blocked", [False, True])
def test_an_out_of_range_target_in_a_kept_row_raises(monkeypatch, bad, requires_grad, blocked):
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 14)
    logits = draw((6, 7), seed=40).requires_grad_(requires_grad)
    targets = targets_for(logits, seed=41)
    targets[4] = bad
    for mask in (None, torch.tensor([True, False, True, True, True, False])):
        with pytest.raises(RuntimeError, match="out of bounds"):
            cross_entropy(logits, targets, mask=mask)
    if bad == -100:  # what F.cross_entropy does instead: the row silently scores 0
        assert F.cross_entropy(logits, targets, reduction="none")[4].item() == 0.0


@pytest.mark.parametrize("blocked", [False, True])
def test_masked_rows_targets_are_never_read(monkeypatch, blocked):
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 14)
    logits = draw((6, 7), seed=42).requires_grad_()
    targets = targets_for(logits, seed=43)
    keep = torch.tensor([True, False, True, True, False, True])
    padded = torch.where(keep, targets, torch.tensor([-100, 2**40, -1, 7, -100, 99]))
    before = padded.clone()
    for mask in (keep, keep * torch.linspace(0.5, 2.0, 6, dtype=torch.float64)):
        value = cross_entropy(logits, padded, mask=mask, reduce="sum")
        expected = cross_entropy(logits, targets, mask=mask, reduce="sum")
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(*(gradients(v, [logits])[0] for v in (value, expected)))
    assert torch.equal(padded, before)  # the caller's targets are not modified


def test_next_token_recipes_agree_with_transformer_lens_formula():
    # TransformerLens's lm_cross_entropy_loss(per_token=True), transcribed in float64:
    # -log_softmax(logits)[..., :-1, :].gather(-1, tokens[..., 1:, None])[..., 0].
    logits = draw((3, 6, 10), torch.float32, seed=50)
    tokens = targets_for(logits, seed=51)
    lens = -logits.double().log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    flattened = cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduce="none")
    torch.testing.assert_close(flattened.double(), lens.flatten(), rtol=1e-6, atol=0)
    per_position = cross_entropy(logits[:, :-1], tokens[:, 1:], reduce="none")
    torch.testing.assert_close(per_position.double(), lens, rtol=1e-6, atol=0)
    scored = torch.ones_like(tokens, dtype=torch.bool)
    scored[:, -1] = False
    rolled = cross_entropy(
        logits.flatten(0, 1), tokens.roll(-1, dims=1).flatten(), mask=scored.flatten()
    )
    torch.testing.assert_close(rolled.double(), lens.mean(), rtol=1e-6, atol=0)


# --- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("blocked", [False, True])
def test_masked_rows_are_inert_even_holding_nan(monkeypatch, fill, mask_kind, blocked):
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * 3 * 5)
    keep, mask = make_mask("bool", 7), make_mask(mask_kind, 7)  # drops rows 1 and 4
    clean = [draw((7, 3, 5), seed=60), draw((7, 3, 5), seed=61)]
    padded = [t.clone() for t in clean]
    for t in padded:
        t[~keep] = fill
    targets = torch.where(keep[:, None], targets_for(clean[0], seed=62), -100)
    for reduce in REDUCE_MODES:
        for call in (
            lambda z, r, reduce=reduce: cross_entropy(z, targets, reduce=reduce, mask=mask),
            lambda z, r, reduce=reduce: kl_divergence(r, z, reduce=reduce, mask=mask),
        ):
            inputs = [t.clone().requires_grad_() for t in padded]
            clean_inputs = [t.clone().requires_grad_() for t in clean]
            value, expected = call(*inputs), call(*clean_inputs)
            assert value.isfinite().all()
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
            for got, want in zip(
                gradients(value, inputs), gradients(expected, clean_inputs), strict=True
            ):
                assert got.isfinite().all()
                assert not got[~keep].any()
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


# --- blocks and memory ----------------------------------------------------------------------------


def test_blocks_of_next_token_views_are_views():
    logits = torch.randn(4, 9, 1000)
    view = logits[:, :-1]
    with pytest.raises(RuntimeError):
        view.view(-1, 1000)  # the leading axes do not merge
    base = logits.untyped_storage().data_ptr()
    seen = []
    for block, (x,) in vocab_blocks(view):
        assert x.untyped_storage().data_ptr() == base  # a view, not a copy
        assert torch.equal(x, view.flatten(0, 1)[block])
        seen.append(block)
    assert [s.start for s in seen] == [0, 8, 16, 24]
    assert seen[-1].stop == 32


def peak_bytes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("bench_logits").peak_bytes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", ["cross_entropy", "kl_divergence"])
def test_peak_memory_is_a_few_blocks(monkeypatch, dtype, op):
    # 512 x 4096 logits (8 MiB in float32) in blocks of 2^14 elements (64 KiB in float32). The
    # profiler's memory trace counts every allocation of torch's CPU allocator, deterministically.
    measure = peak_bytes()
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 1 << 14)
    rows, vocab = 512, 4096
    logits = draw((rows, vocab), dtype, seed=70)
    if op == "cross_entropy":
        other = targets_for(logits, seed=71)
        ours = lambda z: cross_entropy(z, other)  # noqa: E731
        peer = lambda z: F.cross_entropy(z.float(), other, reduction="none").mean()  # noqa: E731
    else:
        other = draw((rows, vocab), dtype, seed=71)
        ours = lambda z: kl_divergence(other, z)  # noqa: E731
        peer = lambda z: (  # noqa: E731
            F.kl_div(
                F.log_softmax(z.float(), -1),
                F.log_softmax(other.float(), -1),
                log_target=True,
                reduction="none",
            )
            .sum(-1)
            .mean()
        )

    def both(loss):
        def run():
            leaf = logits.detach().requires_grad_()
            return torch.autograd.grad(loss(leaf), leaf)

        return run

    block_bytes = 4 * (1 << 14)
    gradient = logits.numel() * logits.element_size()
    forward, forward_peer = measure(lambda: ours(logits)), measure(lambda: peer(logits))
    backward, backward_peer = measure(both(ours)) - gradient, measure(both(peer)) - gradient
    # A handful of float32 blocks and per-row vectors; the float32 form holds whole copies.
    assert forward <= 8 * block_bytes + 64 * rows, forward
    assert backward <= 8 * block_bytes + 64 * rows, backward
    assert forward <= 0.1 * forward_peer
    assert backward <= 0.1 * backward_peer


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_only_the_inputs_are_saved_for_backward(mask_kind):
    logits = draw((64, 3, 50), torch.float32, seed=80).requires_grad_()
    reference = draw((64, 3, 50), torch.float32, seed=81).requires_grad_()
    targets = targets_for(logits, seed=82)
    mask = None if mask_kind == "none" else make_mask(mask_kind, 64)
    with SavedTensors() as saved:
        loss = cross_entropy(logits, targets, mask=mask) + kl_divergence(
            reference, logits, mask=mask
        )
    assert not saved.beyond([logits, reference], min_numel=64 * 50)
    # Beyond the inputs: the targets (made safe under a mask: a new tensor) and the keep.
    assert saved.bytes_beyond([logits, reference]) <= 2 * 8 * 64 * 3 + 2 * 64
    loss.sum().backward()
    assert logits.grad is not None
    assert reference.grad is not None


# --- torch.compile and torch.func -----------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_compiled_fullgraph_matches_eager_without_recompiling(mask_kind):
    def objective(logits, reference, targets, mask):
        ce = cross_entropy(logits, targets, mask=mask)
        return (ce + kl_divergence(reference, logits, mask=mask)).sum()

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(objective, backend=counter, fullgraph=True)
    for batch in (4, 5, 8, 13):
        logits, reference = draw((batch, 2, 7), torch.float32, batch), draw((batch, 2, 7), seed=1)
        targets = targets_for(logits, batch)
        mask = make_mask(mask_kind, batch)
        mask[batch - 1] = 0
        logits[batch - 1], reference[batch - 1], targets[batch - 1] = math.nan, math.inf, -100
        args = [t.clone().requires_grad_() for t in (logits, reference.float())]
        eager_args = [t.clone().requires_grad_() for t in (logits, reference.float())]
        result = compiled(*args, targets, mask)
        expected = objective(*eager_args, targets, mask)
        torch.testing.assert_close(result, expected)
        assert result.isfinite().all()
        result.backward()
        expected.backward()
        for a, e in zip(args, eager_args, strict=True):
            assert a.grad.isfinite().all()
            torch.testing.assert_close(a.grad, e.grad)
    assert counter.frame_count <= 2


@pytest.mark.compile
def test_compiled_out_of_range_target_raises():
    torch._dynamo.reset()
    compiled = torch.compile(lambda z, t: cross_entropy(z, t), fullgraph=True)
    logits = draw((4, 5), torch.float32, seed=90)
    assert compiled(logits, torch.tensor([0, 1, 2, 4])).isfinite()
    with pytest.raises(RuntimeError, match="out of bounds"):
        compiled(logits, torch.tensor([0, 1, 2, -100]))


def test_torch_func_grad_and_vmap_match_eager():
    logits, reference = draw((5, 6), seed=91), draw((5, 6), seed=92)
    targets = targets_for(logits, seed=93)
    keep = torch.tensor([True, False, True, True, False])
    padded = torch.where(keep[:, None], logits, math.nan)

    def loss(z, r):
        return cross_entropy(z, targets, mask=keep) + kl_divergence(r, z, mask=keep)

    got = torch.func.grad(loss, argnums=(0, 1))(padded, reference)
    leaves = [logits.clone().requires_grad_(), reference.clone().requires_grad_()]
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    stacked = torch.stack([logits, reference])
    per_sample = torch.func.vmap(lambda z: cross_entropy(z, targets, reduce="none"))(stacked)
    torch.testing.assert_close(per_sample[1], cross_entropy(reference, targets, reduce="none"))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: ce_unchecked(torch.ones(2, 3), torch.zeros(2, dtype=torch.int32)),
            TypeError,
            r"`targets` must be an int64 tensor of vocabulary indices, got dtype torch\.int32\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 3), [0, 1]),
            TypeError,
            r"`targets` must be a torch\.Tensor, got list\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 4, 3), torch.zeros(2, dtype=torch.int64)),
            ValueError,
            r"`targets` must have the shape of `logits` without its vocab axis, \(2, 4\), "
            r"got \(2,\)\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(3), torch.zeros((), dtype=torch.int64)),
            ValueError,
            r"`logits` must have shape \(batch, \*component, vocab\) with at least 2 dimensions, "
            r"got shape \(3,\)\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 0), torch.zeros(2, dtype=torch.int64)),
            ValueError,
            r"`logits` has an empty vocabulary axis: shape \(2, 0\)\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 3, dtype=torch.int64), torch.zeros(2)),
            TypeError,
            r"`logits` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), reduce="max"),
            ValueError,
            r"`reduce` must be one of 'none', 'mean' or 'sum', got 'max'\.",
        ),
        (
            lambda: ce_unchecked(
                torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), mask=torch.ones(3).bool()
            ),
            ValueError,
            r"`mask` must have shape \(batch,\) = \(2,\), got \(3,\)\.",
        ),
        (
            lambda: kl_unchecked(torch.ones(2, 3), torch.ones(2, 4)),
            ValueError,
            r"`reference_logits` and `logits` must have the same shape, got \(2, 3\) and "
            r"\(2, 4\)\.",
        ),
        (
            lambda: kl_unchecked(torch.ones(2, 3, dtype=torch.float8_e4m3fn), torch.ones(2, 3)),
            TypeError,
            r"`reference_logits` has dtype torch\.float8_e4m3fn: float8 is not supported",
        ),
        (
            lambda: kl_unchecked(torch.ones(2, 3), torch.ones(2, 3), mask=torch.ones(2).long()),
            TypeError,
            r"`mask` must be a bool or floating \(row weights\) tensor, got dtype torch\.int64\.",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- the benchmark --------------------------------------------------------------------------------


def test_benchmark_smoke_run_prints_every_table():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_logits.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for op in ("cross_entropy", "kl_divergence"):
        for dtype in ("bfloat16", "float32"):
            assert f"### {op}, 64 x 1000, {dtype}: peak memory beyond the inputs" in result.stdout
            for mode in ("forward", "forward + backward"):
                assert f"### {op}, 64 x 1000, {dtype}, {mode}: time" in result.stdout
    assert result.stdout.count("- memory, ours / ") == 8
    assert result.stdout.count("- time, ours / ") == 16
