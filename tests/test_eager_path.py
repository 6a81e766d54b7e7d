"""The eager path of every term (tests/terms.py): its row blocks give the one-call result, long
feature axes stay within 1e-6 of float64, and only the inputs are saved for backward.

Above ``ONE_CALL_BLOCKS * BLOCK_ELEMENTS`` elements the eager kernels compute in row blocks; a
spy on ``_rowops.row_blocks`` checks that each blocked test really took that path.
"""

import pytest
import torch

from helpers import (
    RowBlocksSpy,
    SavedTensors,
    check_long_feature_axis,
    gradients,
    one_call_elements,
)
from sae_losses import _rowops, l1_absolute, l2_reconstruction
from terms import cases_with_masks, cases_with_reduce


@pytest.mark.parametrize(
    ("term", "reduce"), cases_with_reduce(lambda term: term.blocked, compiled=False)
)
def test_many_row_blocks_give_the_same_result(monkeypatch, term, reduce):
    # Blocks of 2 rows of 12 elements, so the blocked loop, its last partial block and the
    # output slices are all exercised on small inputs.
    inputs = term.inputs(9, (3, 4) if term.components else (12,), torch.float32, seed=6)
    xs = [t.requires_grad_(t.is_floating_point()) for t in inputs]
    expected_grads = gradients(term(*xs, reduce=reduce), xs)
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * 3 * 4)
    assert one_call_elements() < 9 * 3 * 4
    spy = RowBlocksSpy.install(monkeypatch)
    # float32 results: a few roundings (the blocked L2 takes a norm, then squares it).
    rtol = dict(term.rtol).get(torch.float32, 1e-6)
    for requires_grad in (False, True):
        xs = [t.detach().requires_grad_(requires_grad and t.is_floating_point()) for t in inputs]
        result = term(*xs, reduce=reduce)
        torch.testing.assert_close(
            result.double(), term.float64_reference(*inputs, reduce=reduce), rtol=rtol, atol=0
        )
        if requires_grad:
            for got, want in zip(gradients(result, xs), expected_grads, strict=True):
                torch.testing.assert_close(got, want)
    assert spy.blocked() >= 2, spy.calls  # each call: 4 blocks of 2 rows, 1 of 1


def test_long_feature_axes_stay_within_1e6_of_float64(monkeypatch):
    spy = check_long_feature_axis(l2_reconstruction, l1_absolute, monkeypatch)
    assert spy.blocked() == 2, spy.calls


def mask_of(kind, batch):
    if kind == "none":
        return None
    keep = torch.arange(batch) % 3 != 1
    return keep if kind == "bool" else keep * torch.linspace(0.5, 2.0, batch)


@pytest.mark.parametrize(("term", "mask_kind"), cases_with_masks())
def test_only_the_inputs_are_saved_for_backward(term, mask_kind):
    batch, features = 64, 32
    inputs = term.inputs(batch, (features,), torch.float32, seed=50, requires_grad=True)
    with SavedTensors() as saved:
        loss = term(*inputs, mask=mask_of(mask_kind, batch))
    big = saved.beyond(inputs, min_numel=batch * features)
    assert not big, [tuple(t.shape) for t in big]
    if term.grads:
        assert saved.tensors, "the term keeps its inputs for backward"
        loss.sum().backward()  # the hooks did not break the graph
        assert all(inputs[i].grad is not None for i in term.grads)
    else:
        assert not loss.requires_grad
