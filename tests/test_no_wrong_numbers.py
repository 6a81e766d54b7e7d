"""Issue 16's probe cases for the ops: each gave a wrong number, a crash or an unclear error.

Every test here failed on the package before the fix (commit f9ff003), and names its item.
The distributed and accumulator items are in test_all_reduce*.py and test_accumulators.py.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

import sae_losses
from helpers import randn
from sae_losses import (
    fraction_of_variance_unexplained,
    fused_l1_absolute,
    fused_l2_reconstruction,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
)

# --- item 2: a constant component has variance exactly 0 --------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        torch.full((3, 4), 3000.1) + 0.01,  # gave 1681.0
        torch.full((100, 4), 0.1),  # gave 4.5e11
        torch.full((3, 4), 0.1, dtype=torch.float64),  # 0.1 + 0.1 + 0.1 is not 0.3 in float64
        torch.full((5, 2, 3), -7.3, dtype=torch.bfloat16),
    ],
    ids=["offset-float32", "100-rows-float32", "float64", "bfloat16-components"],
)
def test_item2_constant_source_gives_inf_error_and_nan_without(source):
    assert torch.isposinf(fraction_of_variance_unexplained(source + 1, source)).all()
    assert torch.isnan(fraction_of_variance_unexplained(source, source)).all()  # 0 / 0
    streamed = sae_losses.StreamingFVU.empty(source.shape[1:]).update(source + 1, source)
    assert torch.isposinf(streamed.compute()).all()


def test_item2_constant_kept_rows_under_a_mask_with_nan_padding():
    source = torch.tensor([[float("nan")] * 3, [3000.11] * 3, [3000.11] * 3, [3000.11] * 3])
    keep = torch.tensor([False, True, True, True])
    assert torch.isposinf(fraction_of_variance_unexplained(source + 1, source, mask=keep))


# --- item 3 and item 12: numbers that are not numbers, or too large ---------------------------


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda z: l0_norm(z, threshold=float("nan")), "threshold"),
        (lambda z: l0_norm(z, threshold=10**400), "threshold"),
        (lambda z: lp_sparsity(z, p=10**400), "p"),
        (lambda z: jumprelu_l0(z, torch.zeros(3), bandwidth=10**400), "bandwidth"),
    ],
    ids=["threshold-nan", "threshold-huge-int", "p-huge-int", "bandwidth-huge-int"],
)
def test_items_3_and_12_nan_and_huge_ints_are_value_errors(call, name):
    with pytest.raises(ValueError, match=f"`{name}` must be a (positive|non-negative) float"):
        call(torch.ones(2, 3))


# --- item 4: float weights that sum to 0 ------------------------------------------------------

ROW_OPS = {
    "l2_reconstruction": lambda x, **kw: l2_reconstruction(x, x.flip(0), **kw),
    "l1_absolute": lambda x, **kw: l1_absolute(x, **kw),
    "lp_sparsity": lambda x, **kw: lp_sparsity(x, p=0.5, **kw),
    "l0_norm": lambda x, **kw: l0_norm(x, **kw),
    "jumprelu_l0": lambda x, **kw: jumprelu_l0(x, torch.zeros(3), bandwidth=0.5, **kw),
}


@pytest.mark.parametrize("name", list(ROW_OPS))
def test_item4_weights_summing_to_zero_give_nan_mean_and_zero_gradients(name):
    x = randn(4, 3, seed=1).requires_grad_()
    weights = torch.tensor([1.0, -1.0, 0.0, 0.0])
    value = ROW_OPS[name](x, mask=weights)
    assert torch.isnan(value)  # was +inf
    if value.requires_grad:
        (grad,) = torch.autograd.grad(value, x, allow_unused=True)
        assert grad is None or not grad.isnan().any()
    # Signed weights weight the rows as given: "sum" is the weighted sum.
    rows = ROW_OPS[name](x.detach(), reduce="none")
    torch.testing.assert_close(
        ROW_OPS[name](x.detach(), mask=weights, reduce="sum"), rows[0] - rows[1]
    )


# --- item 5: a bandwidth whose inverse overflows ----------------------------------------------


def test_item5_bandwidth_whose_inverse_overflows_float32_is_a_value_error():
    pre = torch.tensor([[0.5, 2.0]])
    with pytest.raises(ValueError, match=r"`bandwidth` must be at least 1 / 3\.40282e\+38"):
        jumprelu_l0(pre, torch.zeros(2, requires_grad=True), bandwidth=1e-300)


def test_item5_the_same_bandwidth_is_exact_in_float64():
    threshold = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    jumprelu_l0(
        torch.tensor([[0.5, 2.0]], dtype=torch.float64), threshold, bandwidth=1e-300
    ).backward()
    assert torch.equal(threshold.grad, torch.zeros(2, dtype=torch.float64))  # nothing in the window


# --- item 10: batched vector-Jacobian products ------------------------------------------------

BATCHED = {
    "l2_reconstruction": lambda d, s, w: l2_reconstruction(d, s, reduce="none"),
    "l1_absolute": lambda d, s, w: l1_absolute(d, reduce="none"),
    "l1_absolute_weighted": lambda d, s, w: l1_absolute(d, weight=w, reduce="none"),
    "fraction_of_variance_unexplained": lambda d, s, w: fraction_of_variance_unexplained(
        d, s
    ).reshape(1),
}


def _batched_vjp_inputs():
    d = randn(4, 5, dtype=torch.float64, seed=2)
    s = randn(4, 5, dtype=torch.float64, seed=3)
    w = randn(5, dtype=torch.float64, seed=4).abs()
    return d, s, w


@pytest.mark.parametrize("name", list(BATCHED))
def test_item10_is_grads_batched_and_vectorized_jacobian(name):
    d, s, w = _batched_vjp_inputs()
    call = BATCHED[name]
    leaf = d.clone().requires_grad_()
    out = call(leaf, s, w)
    basis = torch.eye(out.numel(), dtype=out.dtype).reshape(-1, *out.shape)
    (found,) = torch.autograd.grad(out, leaf, basis, is_grads_batched=True)
    jacobian = torch.autograd.functional.jacobian(lambda x: call(x, s, w), d, vectorize=True)
    expected = torch.stack(
        [torch.autograd.grad(call(leaf, s, w), leaf, e)[0] for e in basis.unbind(0)]
    )
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jacobian, expected.reshape(jacobian.shape), rtol=1e-12, atol=1e-12)


# --- item 11: float8 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda f8: l2_reconstruction(f8, f8),
        lambda f8: l2_reconstruction(f8, torch.zeros(2, 3)),
        lambda f8: l1_absolute(torch.ones(2, 3), weight=f8[0]),
        lambda f8: l1_absolute(torch.ones(2, 3), mask=f8[:, 0]),
        lambda f8: fraction_of_variance_unexplained(f8, f8),
    ],
    ids=["l2", "l2-mixed", "weight", "mask", "fvu"],
)
def test_item11_float8_is_a_type_error_that_says_so(call):
    f8 = torch.ones(2, 3).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8 is not supported"):
        call(f8)


# --- item 13: FVU with no kept row ------------------------------------------------------------


def test_item13_fvu_with_an_all_false_mask_gives_zero_gradients_on_every_path():
    source = randn(4, 3, seed=5)
    source[1] = float("nan")
    decoded = randn(4, 3, seed=6)
    nothing = torch.zeros(4, dtype=torch.bool)

    def loss(d, s):
        return fraction_of_variance_unexplained(d, s, mask=nothing).nan_to_num()

    leaves = [decoded.clone().requires_grad_(), source.clone().requires_grad_()]
    eager = torch.autograd.grad(loss(*leaves), leaves)
    func = torch.func.grad(loss, argnums=(0, 1))(decoded, source)
    for grad in (*eager, *func):
        assert torch.equal(grad, torch.zeros_like(grad))


# --- items 7, 8, 9: the fused functions -------------------------------------------------------


def _layouts():
    base = randn(4, 6, 8, seed=7)
    return base, [
        base,
        base.transpose(0, 1).contiguous().transpose(0, 1),
        base.transpose(1, 2).contiguous().transpose(1, 2),
        base.permute(2, 0, 1).contiguous().permute(1, 2, 0),
        base.permute(1, 2, 0).contiguous().permute(2, 0, 1),
        base.permute(2, 1, 0).contiguous().permute(2, 1, 0),
        randn(4, 6, 16, seed=8)[..., ::2],
        randn(4, 12, 8, seed=9)[:, ::2],
        randn(8, 6, 8, seed=10)[::2],
        base[:, :1].expand(4, 6, 8),
        base[:1].expand(4, 6, 8),
        randn(4, 6, 1, seed=11).expand(4, 6, 8),
    ]


@pytest.mark.compile
def test_item7_fused_functions_take_any_number_of_layouts():
    base, layouts = _layouts()
    assert len(layouts) > 8  # dynamo's default recompile limit
    for x in layouts:
        torch.testing.assert_close(fused_l2_reconstruction(x, base), l2_reconstruction(x, base))
        torch.testing.assert_close(fused_l1_absolute(x), l1_absolute(x))


@pytest.mark.compile
def test_item8_a_compile_failure_for_one_kind_leaves_the_others_compiled(monkeypatch):
    from sae_losses import _compile_cache

    compiled = _compile_cache._compiled
    used = []

    def failing_for_float16(function, key):
        if "float16" in str(key):
            raise OSError("no compiler for this kind")
        used.append(key)
        return compiled(function, key)

    monkeypatch.setattr(_compile_cache, "_compiled", failing_for_float16)
    monkeypatch.setattr(_compile_cache, "_eager_keys", set())
    monkeypatch.setattr(_compile_cache, "_warned", [])
    half = randn(4, 8, dtype=torch.float16, seed=12)
    with pytest.warns(RuntimeWarning, match="inputs of that kind run the eager kernels"):
        torch.testing.assert_close(fused_l1_absolute(half), l1_absolute(half))
    single = randn(4, 8, seed=13)
    fused_l1_absolute(single)
    assert any("float32" in str(key) for key in used)  # float32 still compiled
    with pytest.raises(TypeError, match="float8 is not supported"):
        fused_l1_absolute(single.to(torch.float8_e4m3fn))


@pytest.mark.compile
def test_item9_fused_functions_work_under_the_runtime_type_check():
    script = textwrap.dedent(
        """
        from jaxtyping import install_import_hook
        install_import_hook("sae_losses", "beartype.beartype")
        import torch, sae_losses
        x = torch.randn(4, 3, 5, requires_grad=True)
        y = torch.randn(4, 3, 5)
        l2 = sae_losses.l2_reconstruction
        for fused, plain in [
            (lambda: sae_losses.fused_l2_reconstruction(x, y), lambda: l2(x, y)),
            (lambda: sae_losses.fused_l1_absolute(x), lambda: sae_losses.l1_absolute(x)),
        ]:
            got, want = fused(), plain()
            torch.testing.assert_close(got, want)
            g1, = torch.autograd.grad(got.sum(), x)
            g2, = torch.autograd.grad(want.sum(), x)
            torch.testing.assert_close(g1, g2)
        try:
            sae_losses.fused_l1_absolute([1.0])
        except Exception as error:
            print("checked:", type(error).__name__)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout
    assert "checked:" in result.stdout  # the hook is on: a list is rejected before any kernel
