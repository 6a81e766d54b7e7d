"""cross_entropy and kl_divergence against float64 references, and the laws that tie them.

Float64 references (logsumexp and log_softmax in float64) across shapes, reduce modes, dtypes and
masks; hand-worked values; the laws: expected CE = KL + entropy, KL(p || p) = 0 exactly, and
invariance to a constant added to a row. The registry (tests/terms.py) runs the shared contract
tests too.
"""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from helpers import masked_reduce
from logits_cases import REDUCE_MODES, ce_rows, draw, kl_rows, make_mask, targets_for
from sae_losses import cross_entropy, kl_divergence

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
        expected = masked_reduce(ce_rows(logits, other), reduce, mask)
    else:
        other = draw(shape, dtype, seed=2)
        result = kl_divergence(other, logits, reduce=reduce, mask=mask)
        expected = masked_reduce(kl_rows(other, logits), reduce, mask)
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
