"""cross_entropy and kl_divergence under torch.compile and torch.func.

fullgraph compile matches eager (values and gradients, NaN-padded masked rows) without
recompiling across batch sizes; an out-of-range target raises under compile too; torch.func's
grad and vmap match eager autograd.
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from logits_cases import draw, make_mask, targets_for
from sae_losses import cross_entropy, kl_divergence


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
