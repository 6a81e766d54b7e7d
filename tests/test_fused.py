"""Tests for the inductor-generated fused terms: their float64 references, recompiles, the
fallback when inductor cannot build, double backward, fp16 and long feature axes.

They are in the registry (tests/terms.py) too, so the mask, torch.func, DTensor, compile and
saved-for-backward contracts are checked on them with the other terms.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_eager_path import check_long_feature_axis
from test_reconstruction import check_fp16_backward_in_float32
from torch._dynamo.utils import counters

from helpers import randn
from sae_losses import fused_l1_absolute, fused_l2_reconstruction, l1_absolute, l2_reconstruction
from terms import cases_with_masks

pytestmark = pytest.mark.compile


@pytest.mark.parametrize(("term", "mask_kind"), cases_with_masks(lambda term: term.compiled))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compiled_terms_match_float64_reference(term, mask_kind, dtype):
    # One shape per dtype: a compile each (test_terms.py runs the eager terms over many shapes).
    inputs = term.inputs(6, (3, 10), dtype, seed=1)
    mask = {"none": None, "bool": torch.arange(6) % 3 != 1}.get(mask_kind)
    if mask_kind == "float":
        mask = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 3.0], dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for reduce in term.reduces:  # one compile for all: the reduce runs after the kernel
        result = term(*inputs, reduce=reduce, mask=mask)
        assert result.dtype == term.expected(*inputs).dtype
        expected = term.float64_reference(*inputs, reduce=reduce, mask=mask)
        torch.testing.assert_close(result.double(), expected, rtol=rtol, atol=0, equal_nan=True)


def test_fused_gradients_match_eager():
    decoded = randn(8, 2, 16, seed=3).requires_grad_()
    source = randn(8, 2, 16, seed=4)
    loss = fused_l2_reconstruction(decoded, source).sum() + fused_l1_absolute(decoded).sum()
    (fused_grad,) = torch.autograd.grad(loss, decoded)
    eager = l2_reconstruction(decoded, source).sum() + l1_absolute(decoded).sum()
    (eager_grad,) = torch.autograd.grad(eager, decoded)
    torch.testing.assert_close(fused_grad, eager_grad)


def test_fused_errors_are_the_eager_errors():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(2, 4\)\."):
        fused_l2_reconstruction(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(TypeError, match=r"`learned` must be a floating-point tensor"):
        fused_l1_absolute(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"`reduce` must be one of"):
        fused_l1_absolute(torch.ones(2, 3), reduce="max")


def test_fused_reuses_its_kernel_across_batch_sizes():
    torch._dynamo.reset()
    counters.clear()
    for batch in (2, 3, 5, 8, 13, 21):
        decoded, source = randn(batch, 12, seed=batch), randn(batch, 12, seed=batch + 1)
        torch.testing.assert_close(
            fused_l2_reconstruction(decoded, source), l2_reconstruction(decoded, source)
        )
    assert 1 <= counters["stats"]["unique_graphs"] <= 2


# --- many combinations, a build failure, double backward in any order --------------------------


def test_every_dtype_rank_and_requires_grad_combination_compiles_once():
    # Dynamo allows 8 recompiles of one code object; these are 18 combinations in one process.
    # Each is called at 2 batch sizes, then a third: at most one compile plus the one
    # dynamic-shape recompile, and none at the third batch size.
    torch._dynamo.reset()
    counters.clear()
    combinations = [
        (fused, eager, dtype, shape, requires_grad)
        for fused, eager, dtypes in [
            (fused_l2_reconstruction, l2_reconstruction, (torch.float32, torch.bfloat16)),
            (fused_l1_absolute, l1_absolute, (torch.float64,)),
        ]
        for dtype in dtypes
        for shape in [(5,), (2, 5), (2, 3, 5)]
        for requires_grad in (False, True)
    ]
    for fused, eager, dtype, shape, requires_grad in combinations:
        graphs = []
        for batch in (2, 3, 4):
            inputs = [
                randn(batch, *shape, dtype=dtype, seed=batch + k).requires_grad_(requires_grad)
                for k in range(2 if fused is fused_l2_reconstruction else 1)
            ]
            before = counters["stats"]["unique_graphs"]
            result = fused(*inputs, reduce="none")
            graphs.append(counters["stats"]["unique_graphs"] - before)
            assert result.requires_grad == requires_grad
            torch.testing.assert_close(result, eager(*inputs, reduce="none"))
        combination = (fused.__name__, dtype, len(shape) + 1, requires_grad)
        assert sum(graphs) <= 2, (combination, graphs)
        assert graphs[2] == 0, (combination, graphs)


FALLBACK_SCRIPT = """
import json, warnings
import torch

torch._inductor.config.cpp.cxx = ("/nonexistent/g++",)  # inductor cannot build a C++ kernel
torch._inductor.config.fx_graph_cache = False  # and may not load one built earlier
torch._inductor.config.compile_threads = 1
from sae_losses import fused_l1_absolute, fused_l2_reconstruction, l1_absolute, l2_reconstruction

generator = torch.Generator().manual_seed(0)
decoded, source = torch.randn(2, 4, 3, 8, generator=generator)
report = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report["first_equal"] = torch.equal(
        fused_l2_reconstruction(decoded, source), l2_reconstruction(decoded, source)
    )
    report["first"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    # Later calls: another function, another dtype, and a backward.
    report["l1_equal"] = torch.equal(fused_l1_absolute(decoded), l1_absolute(decoded))
    half = decoded.double()[:, 0]
    report["double_equal"] = torch.equal(
        fused_l2_reconstruction(half, source.double()[:, 0], reduce="sum"),
        l2_reconstruction(half, source.double()[:, 0], reduce="sum"),
    )
    leaf = decoded.clone().requires_grad_()
    fused_l2_reconstruction(leaf, source).sum().backward()
    fused_grad = leaf.grad
    leaf.grad = None
    l2_reconstruction(leaf, source).sum().backward()
    report["grad_equal"] = torch.equal(fused_grad, leaf.grad)
    report["all"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
print(json.dumps(report))
"""


def test_fused_falls_back_to_eager_with_one_warning_when_inductor_cannot_build(tmp_path):
    # A fresh process, so no kernel is compiled yet, and an empty cache, so none is loaded.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["first"]) == 1, report["first"]
    assert "could not build" in report["first"][0]
    assert report["all"] == report["first"]  # later calls do not warn again
    for key in ("first_equal", "l1_equal", "double_equal", "grad_equal"):
        assert report[key], (key, report)


def test_double_backward_works_in_any_order():
    # A double backward must not reach a compiled backward ("donated buffers"), whichever ran
    # first: eager, then the fused ones, then the fused ones again in the other order, at
    # another rank (a second compile of each).
    torch._dynamo.reset()

    def check(fn, shape, seed):
        x = randn(*shape, dtype=torch.float64, seed=seed)
        if fn in (fused_l1_absolute, l1_absolute):
            args = (((x.abs() + 0.1) * x.sign()).requires_grad_(),)  # away from |z|'s kink
        else:
            y = randn(*shape, dtype=torch.float64, seed=seed + 1)
            args = (x.requires_grad_(), y.requires_grad_())
        assert torch.autograd.gradgradcheck(lambda *a: fn(*a, reduce="none"), args)

    check(l2_reconstruction, (4, 5), seed=30)
    check(fused_l2_reconstruction, (4, 5), seed=31)
    check(fused_l1_absolute, (4, 5), seed=32)
    check(fused_l1_absolute, (3, 2, 4), seed=33)
    check(fused_l2_reconstruction, (3, 2, 4), seed=34)
    check(l2_reconstruction, (3, 2, 4), seed=35)


def test_fused_fp16_backward_computes_in_float32():
    torch._dynamo.reset()
    check_fp16_backward_in_float32(fused_l2_reconstruction)


def test_fused_long_feature_axes_stay_within_1e6_of_float64(monkeypatch):
    torch._dynamo.reset()
    check_long_feature_axis(fused_l2_reconstruction, fused_l1_absolute, monkeypatch)
