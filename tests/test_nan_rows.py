"""A NaN in a kept row is never a silent number: that row's value is NaN (a batch ratio: the
result is NaN), as its float64 reference says, on the one-call and the blocked eager paths.

The counts are the documented exception (docs/semantics.md): NaN is not active in ``l0_norm``
and ``jumprelu_l0``, so their row counts the other features. The NaN goes into each batched
input the term receives as it is; an input it only derives a target from (the scores whose
argmax is ``cross_entropy``'s target) is left out.
"""

import math

import pytest
import torch

from helpers import one_call_elements
from sae_losses import _rowops
from terms import cases

NAN_IS_NOT_ACTIVE = {"l0_norm", "fused_l0_norm", "jumprelu_l0", "fused_jumprelu_l0"}
BATCH, NAN_ROW = 9, 1  # blocked: 2 rows a block, over the 4-block one-call limit


def passed_as_is(term, inputs):
    """The indices of the batched inputs the term's call receives unchanged."""
    args, options = term.bind(*inputs)
    received = [*args, *options.values()]
    return [i for i in range(term.n_batched) if any(value is inputs[i] for value in received)]


def with_nan(inputs, index):
    poisoned = [t.detach().clone() for t in inputs]
    poisoned[index][NAN_ROW, ..., 0] = torch.nan  # every component of one row
    return poisoned


@pytest.mark.parametrize("blocked", [False, True], ids=["one-call", "blocked"])
@pytest.mark.parametrize("term", cases())
def test_a_nan_in_a_kept_row_gives_nan_there(monkeypatch, term, blocked):
    if blocked:
        if not term.blocked:
            pytest.skip("its eager path does not compute in row blocks")
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * math.prod(term.example_shape))
        assert one_call_elements() < BATCH * math.prod(term.example_shape)
    clean = term.inputs(BATCH, dtype=torch.float64, seed=3)
    indices = passed_as_is(term, clean)
    assert indices, "no batched input reaches the call unchanged"
    for index in indices:
        poisoned = with_nan(clean, index)
        options = {"reduce": "none"} if term.reduce else {}
        value = term(*poisoned, **options)
        reference = term.float64_reference(*poisoned, reduce=options.get("reduce"))
        torch.testing.assert_close(value, reference, rtol=1e-9, atol=1e-12, equal_nan=True)
        if term.reduce and term.default_axes:
            others = torch.cat([value[:NAN_ROW], value[NAN_ROW + 1 :]])
            assert others.isfinite().all(), f"input {index}: the NaN reached other rows"
            row = value[NAN_ROW]
            assert row.isfinite().all() if term.name in NAN_IS_NOT_ACTIVE else row.isnan().all()
        else:  # a ratio of sums over the batch, or rows of its own shape
            assert value.isnan().any(), f"input {index}: a NaN row gave a number"
