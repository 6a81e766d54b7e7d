"""The compiled path of every term (the ``fused_<name>`` twins) and issue 20's eager kernels.

Each fused twin must equal its eager twin: values, gradients, masks over NaN-padded rows,
float64 and half precision, bytes saved for backward. The recompile and fallback tests swap
inductor for a ``CompileCounter`` backend (``_compile_cache._compiled`` is monkeypatched), so
they count dynamo's graphs per input kind without building kernels. The eager tests (no compile
mark) check the new kernels: counts without bool temporaries, the JumpReLU threshold gradient in
row blocks, the FVU's two passes, and StreamingFVU's one-pass statistics about a pivot row.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import sae_losses
from helpers import RowBlocksSpy, SavedTensors, randn
from sae_losses import _compile_cache, _rowops
from sae_losses._jumprelu import _HeavisideStep


@dataclasses.dataclass(frozen=True)
class Twin:
    """A fused twin, its eager term, and how to call both: ``call(function, *inputs, **kw)``."""

    name: str
    call: Callable[..., torch.Tensor]
    n_inputs: int
    grads: tuple[int, ...] = ()
    reduce: bool = True
    float_masks: bool = True

    def __repr__(self) -> str:
        return self.name

    def fused(self, *inputs, **options):
        return self.call(getattr(sae_losses, f"fused_{self.name}"), *inputs, **options)

    def eager(self, *inputs, **options):
        return self.call(getattr(sae_losses, self.name), *inputs, **options)


FVU = "fraction_of_variance_unexplained"
TWINS = [
    Twin("l0_norm", lambda f, z, **kw: f(z, threshold=0.5, **kw), 1),
    Twin("jumprelu_l0", lambda f, pre, t, **kw: f(pre, t, bandwidth=0.5, **kw), 2, grads=(1,)),
    Twin("lp_sparsity", lambda f, z, w, **kw: f(z, p=0.5, weight=w, **kw), 2, grads=(0, 1)),
    Twin("tanh_sparsity", lambda f, z, w, **kw: f(z, scale=4.0, weight=w, **kw), 2, grads=(0, 1)),
    Twin(
        FVU, lambda f, d, s, **kw: f(d, s, **kw), 2, grads=(0, 1), reduce=False, float_masks=False
    ),
]
LP_ROOT = Twin("lp_sparsity", lambda f, z, **kw: f(z, p=3.0, root=True, **kw), 1, grads=(0,))


def inputs_of(twin, batch, shape, dtype, seed=0):
    """Sparse latents (or an offset source for the FVU) and a positive (feature,) parameter."""
    z = randn(batch, *shape, dtype=torch.float64, seed=seed)
    if twin.name == FVU:
        source = 100.0 + z
        decoded = source + 0.3 * randn(*source.shape, dtype=torch.float64, seed=seed + 1)
        return [decoded.to(dtype), source.to(dtype)]
    z = torch.where(z.abs() < 0.4, 0.0, z)  # exact zeros, as after a ReLU
    if twin.n_inputs == 1:
        return [z.to(dtype)]
    weight = randn(shape[-1], dtype=torch.float64, seed=seed + 1).abs() + 0.3
    return [z.to(dtype), weight.to(dtype)]


def pad_with_nan(twin, inputs, keep):
    """Dropped rows of the batched inputs hold NaN (and Inf for the FVU's source)."""
    padded = [t.clone() for t in inputs]
    for i in range(2 if twin.name == FVU else 1):
        padded[i][~keep] = torch.inf if i == 1 else torch.nan
    return padded


def leaves(inputs, grads):
    return [t.clone().requires_grad_(i in grads) for i, t in enumerate(inputs)]


def assert_same(got, want, rtol):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 1e-2, equal_nan=True)


def gradients_of(result, inputs, grads):
    weights = torch.linspace(1, 2, result.numel(), dtype=result.dtype).reshape(result.shape)
    return torch.autograd.grad((result * weights).sum(), [inputs[i] for i in grads])


# --- every fused twin equals its eager twin ----------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("twin", [*TWINS, LP_ROOT], ids=[*map(repr, TWINS), "lp_sparsity_root"])
def test_fused_twin_equals_eager_in_float64_over_nan_padded_rows(twin):
    batch, shape = 9, (3, 10)
    keep = torch.arange(batch) % 3 != 1
    inputs = pad_with_nan(twin, inputs_of(twin, batch, shape, torch.float64, seed=4), keep)
    masks = [keep]
    if twin.float_masks:
        masks.append(keep * torch.linspace(0.5, 2.0, batch, dtype=torch.float64))
    for mask in masks:
        for reduce in ["none", "mean", "sum"] if twin.reduce else [None]:
            options = {"mask": mask} | ({"reduce": reduce} if reduce else {})
            fused_leaves, eager_leaves = leaves(inputs, twin.grads), leaves(inputs, twin.grads)
            with SavedTensors() as saved:
                got = twin.fused(*fused_leaves, **options)
            want = twin.eager(*eager_leaves, **options)
            assert got.dtype == want.dtype == torch.float64
            assert got.requires_grad == want.requires_grad == bool(twin.grads)
            assert got.isfinite().all()
            assert_same(got, want, rtol=1e-12)
            assert not saved.beyond(fused_leaves, min_numel=batch * shape[-1])
            if not twin.grads:
                continue
            found = gradients_of(got, fused_leaves, twin.grads)
            expected = gradients_of(want, eager_leaves, twin.grads)
            for i, g, e in zip(twin.grads, found, expected, strict=True):
                assert g.isfinite().all()
                assert e.abs().sum() > 0  # a gradient that is there (the threshold's too)
                assert_same(g, e, rtol=1e-11)
                if i == 0 or twin.name == FVU:
                    assert (g[~keep] == 0).all()  # padded rows get exactly no gradient
    assert not _compile_cache._eager_keys, "a kind fell back to the eager kernels"


@pytest.mark.compile
@pytest.mark.parametrize("twin", TWINS)
def test_fused_twin_accumulates_half_inputs_in_float32(twin):
    inputs = inputs_of(twin, 37, (67,), torch.bfloat16, seed=8)  # odd sizes: vector tails
    got, want = twin.fused(*inputs), twin.eager(*inputs)
    assert got.dtype == want.dtype == torch.float32
    assert_same(got, want, rtol=1e-5)


@pytest.mark.compile
@pytest.mark.parametrize("twin", [t for t in TWINS if t.grads])
def test_fused_gradients_match_eager_in_float32_at_odd_sizes(twin):
    inputs = inputs_of(twin, 131, (2, 257), torch.float32, seed=9)
    fused_leaves, eager_leaves = leaves(inputs, twin.grads), leaves(inputs, twin.grads)
    found = gradients_of(twin.fused(*fused_leaves), fused_leaves, twin.grads)
    expected = gradients_of(twin.eager(*eager_leaves), eager_leaves, twin.grads)
    for g, e in zip(found, expected, strict=True):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-5, atol=1e-6 * e.abs().max().item())


@pytest.mark.compile
def test_double_backward_through_a_fused_twin_uses_the_eager_formulas():
    lp = TWINS[2]
    z, w = inputs_of(lp, 5, (4,), torch.float64, seed=3)
    z = torch.where(z >= 0, z + 0.5, z - 0.5)  # away from |z|'s kink at 0
    assert torch.autograd.gradgradcheck(
        lambda *a: lp.fused(*a, reduce="none"), leaves([z, w], lp.grads)
    )
    # The FVU's mean is detached: its first derivative is exact, its second with respect to the
    # source is not (in the eager term too), so the double backward is checked in the decoded.
    decoded, source = inputs_of(TWINS[4], 5, (4,), torch.float64, seed=3)
    decoded = decoded.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda d: TWINS[4].fused(d, source), [decoded])


def test_twins_have_the_eager_signature_and_errors():
    for name in [t.name for t in TWINS] + ["l2_reconstruction", "l1_absolute"]:
        eager, fused = getattr(sae_losses, name), getattr(sae_losses, f"fused_{name}")
        assert [
            (p.name, p.kind, p.default) for p in inspect.signature(fused).parameters.values()
        ] == [(p.name, p.kind, p.default) for p in inspect.signature(eager).parameters.values()], (
            name
        )
        assert f"fused_{name}" in sae_losses.__all__
    # The same checks raise, before any compile (the bodies, past the runtime type check).
    z = torch.ones(2, 3)
    cases = [
        ("l0_norm", lambda f: f(z, threshold=-1.0), ValueError, "`threshold`"),
        ("l0_norm", lambda f: f(z, reduce="max"), ValueError, "`reduce` must be one of"),
        ("jumprelu_l0", lambda f: f(z, torch.ones(4), bandwidth=1.0), ValueError, "`threshold`"),
        ("lp_sparsity", lambda f: f(z, p=0.0), ValueError, "`p`"),
        ("tanh_sparsity", lambda f: f(z.int(), scale=1.0), TypeError, "`learned`"),
        (
            FVU,
            lambda f: f(z, torch.ones(2, 4)),
            ValueError,
            r"same shape, got \(2, 3\) and \(2, 4\)",
        ),
    ]
    for name, call, error, message in cases:
        for function in (getattr(sae_losses, name), getattr(sae_losses, f"fused_{name}")):
            with pytest.raises(error, match=message):
                call(inspect.unwrap(function))


# --- recompiles and the per-kind fallback, counted with a CompileCounter backend ---------------


@pytest.fixture
def counted(monkeypatch):
    """``_compile_cache._compiled`` with a CompileCounter per input kind: {key: counter}."""
    counters: dict[tuple, CompileCounter] = {}

    @functools.cache
    def compiled(function, key):
        counters[key] = CompileCounter()
        copy = _compile_cache.fresh_copy(function)
        return torch.compile(copy, backend=counters[key], fullgraph=True)

    torch._dynamo.reset()
    monkeypatch.setattr(_compile_cache, "_compiled", compiled)
    monkeypatch.setattr(_compile_cache, "_eager_keys", set())
    monkeypatch.setattr(_compile_cache, "_warned", [])
    return counters


@pytest.mark.compile
@pytest.mark.parametrize("twin", TWINS)
def test_a_kind_compiles_at_most_twice_across_batch_sizes(counted, twin):
    frames = []
    for batch in (2, 3, 5, 8, 13, 21):
        inputs = leaves(inputs_of(twin, batch, (2, 6), torch.float32, seed=batch), twin.grads)
        result = twin.fused(*inputs)
        assert_same(result, twin.eager(*[t.detach() for t in inputs]), rtol=1e-6)
        if twin.grads:
            result.sum().backward()
        frames.append(sum(c.frame_count for c in counted.values()))
    assert len(counted) == (2 if twin.grads else 1)  # forward, and backward
    assert all(c.frame_count <= 2 for c in counted.values()), frames
    assert frames[2:] == [frames[2]] * 4, frames  # no compile after the second batch size
    assert not _compile_cache._eager_keys


@pytest.mark.compile
def test_many_kinds_in_one_process_never_hit_the_recompile_limit(counted):
    # 5 twins x 3 dtypes x 3 ranks: 45 input kinds, far over dynamo's limit of 8 recompiles of
    # one code object: each kind has its own code copy.
    for twin in TWINS:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for shape in [(5,), (2, 5), (2, 3, 5)]:
                for batch in (3, 4):
                    inputs = inputs_of(twin, batch, shape, dtype, seed=batch)
                    assert_same(twin.fused(*inputs), twin.eager(*inputs), rtol=1e-6)
    assert len(counted) == 45
    assert all(c.frame_count <= 2 for c in counted.values())
    assert not _compile_cache._eager_keys


@pytest.mark.compile
@pytest.mark.parametrize("twin", TWINS)
def test_a_build_failure_falls_back_for_that_kind_only(counted, monkeypatch, twin):
    compiled = _compile_cache._compiled

    def failing_for_float64(function, key):
        if "float64" in str(key):
            raise OSError("no compiler for this kind")
        return compiled(function, key)

    monkeypatch.setattr(_compile_cache, "_compiled", failing_for_float64)
    double = leaves(inputs_of(twin, 6, (7,), torch.float64, seed=1), twin.grads)
    with pytest.warns(RuntimeWarning, match="inputs of that kind run the eager kernels"):
        got = twin.fused(*double)
    eager_leaves = leaves([t.detach() for t in double], twin.grads)
    want = twin.eager(*eager_leaves)
    assert torch.equal(got, want)  # the eager kernels themselves
    if twin.grads:  # the backward of that kind falls back too, with the same gradients
        for g, e in zip(
            gradients_of(got, double, twin.grads),
            gradients_of(want, eager_leaves, twin.grads),
            strict=True,
        ):
            assert torch.equal(g, e)
    assert len(_compile_cache._eager_keys) == (2 if twin.grads else 1)
    single = inputs_of(twin, 6, (7,), torch.float32, seed=2)
    assert_same(twin.fused(*single), twin.eager(*single), rtol=1e-6)
    assert any("float32" in str(key) for key in counted)  # float32 still compiled
    assert len(_compile_cache._warned) == 1


# --- the eager kernels ---------------------------------------------------------------------------


SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 0.25, -0.75, 1e-30]


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_l0_counts_inf_but_not_nan_eagerly_and_in_row_blocks(monkeypatch, threshold):
    # NaN is not active: |NaN| > t is false (the documented count); +-inf is.
    learned = torch.tensor([SPECIAL * 3, SPECIAL[::-1] * 3, [float("nan")] * 24])
    active = 2 + (threshold < 0.75) + (threshold < 0.25) + (threshold == 0)  # inf, -inf, ...
    expected = torch.tensor([3.0 * active, 3.0 * active, 0.0])
    l0 = sae_losses.l0_norm
    torch.testing.assert_close(l0(learned, threshold=threshold, reduce="none"), expected)
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 8)
    spy = RowBlocksSpy.install(monkeypatch)
    torch.testing.assert_close(l0(learned, threshold=threshold, reduce="none"), expected)
    assert spy.blocked() == 1


def test_jumprelu_counts_nan_as_below_the_threshold():
    pre = torch.tensor([[float("nan"), 2.0, 0.5, float("inf")]])
    assert sae_losses.jumprelu_l0(pre, torch.ones(4), bandwidth=0.1).item() == 2.0


def formula_threshold_gradient(pre, threshold, bandwidth, upstream):
    """The straight-through gradient through ``_HeavisideStep``, the formula path's function."""
    threshold = threshold.detach().requires_grad_()
    steps = _HeavisideStep.apply(pre, threshold, torch.float64, bandwidth)
    (grad,) = torch.autograd.grad((steps.sum(-1) * upstream).sum(), threshold)
    return grad


@pytest.mark.parametrize("blocked", [False, True])
def test_jumprelu_hand_written_gradient_is_the_formula_gradient(monkeypatch, blocked):
    pre = randn(11, 3, 40, dtype=torch.float64, seed=21)
    threshold = 0.3 * randn(40, dtype=torch.float64, seed=22)
    weights = torch.linspace(0.5, 2.0, 11, dtype=torch.float64)
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * 3 * 40)
    spy = RowBlocksSpy.install(monkeypatch)
    leaf = threshold.clone().requires_grad_()
    loss = sae_losses.jumprelu_l0(pre, leaf, bandwidth=0.7, mask=weights, reduce="sum")
    loss.sum().backward()
    expected = formula_threshold_gradient(pre, threshold, 0.7, weights.reshape(-1, 1))
    assert expected.abs().sum() > 0
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)
    assert (spy.blocked() > 0) == blocked, spy.calls


def fvu_float64(decoded, source, keep=None):
    d, s = decoded.double(), source.double()
    if keep is not None:
        d, s = d[keep], s[keep]
    return (d - s).square().sum((0, -1)) / (s - s.mean(0)).square().sum((0, -1))


@pytest.mark.parametrize("masked", [False, True])
def test_fvu_in_row_blocks_equals_one_call_and_float64(monkeypatch, masked):
    source = randn(23, 2, 12, seed=2) + 1e4
    decoded = source + 0.1 * randn(23, 2, 12, seed=1)
    keep = (torch.arange(23) % 4 != 2) if masked else None
    if masked:
        decoded[~keep], source[~keep] = torch.nan, torch.inf
    xs = [decoded.clone().requires_grad_(), source.clone().requires_grad_()]
    one_call = sae_losses.fraction_of_variance_unexplained(*xs, mask=keep)
    one_call_grads = torch.autograd.grad(one_call.sum(), xs)
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 3 * 24)  # blocks of 3 rows, a last one of 2
    spy = RowBlocksSpy.install(monkeypatch)
    ys = [decoded.clone().requires_grad_(), source.clone().requires_grad_()]
    blocked = sae_losses.fraction_of_variance_unexplained(*ys, mask=keep)
    assert spy.blocked() >= 2, spy.calls  # the mean's pass and the row term's
    torch.testing.assert_close(blocked, one_call, rtol=1e-6, atol=0)
    expected = fvu_float64(decoded, source, keep)
    torch.testing.assert_close(blocked.double(), expected, rtol=1e-5, atol=0)
    for got, want in zip(torch.autograd.grad(blocked.sum(), ys), one_call_grads, strict=True):
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_fvu_reads_source_in_two_passes(monkeypatch):
    # One kept_mean pass and one row-term pass: every blocked pass asks row_blocks for slices.
    decoded, source = randn(40, 16, seed=3), randn(40, 16, seed=4)
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 64)
    spy = RowBlocksSpy.install(monkeypatch)
    sae_losses.fraction_of_variance_unexplained(decoded, source)
    assert [n for _, n in spy.calls] == [10, 10], spy.calls


def test_streaming_fvu_is_exact_when_the_pivot_row_is_an_outlier():
    # The first row (the pivot) is 1e7 standard deviations off in feature 0, a BOS-like row. The
    # sums about it lose at most log10(1 + n_k) digits, n_k rows a block: one
    # block of all 10^5 rows measured 1.7e-9 here, over the 1e-9 bar; blocks of 1024, 2e-12.
    source = randn(100_000, 2, dtype=torch.float64, seed=5)
    source[0, 0] = 1e7
    decoded = source + 0.1 * randn(100_000, 2, dtype=torch.float64, seed=6)
    state = sae_losses.StreamingFVU.empty((2,)).update(decoded.float(), source.float())
    x = source.float().double()
    m2 = (x - x.mean(0)).square().sum(0)
    torch.testing.assert_close(state.m2, m2, rtol=1e-10, atol=0)
    torch.testing.assert_close(state.mean, x.mean(0), rtol=0, atol=1e-15 * x.abs().max().item())


@pytest.mark.parametrize("masked", [False, True])
def test_streaming_fvu_update_in_blocks_equals_one_block(monkeypatch, masked):
    decoded, source = randn(50, 3, 8, seed=7), randn(50, 3, 8, seed=8) + 3000.0
    keep = (torch.arange(50) % 3 != 0) if masked else None
    if masked:
        decoded[~keep], source[~keep] = torch.nan, -torch.inf
    whole = sae_losses.StreamingFVU.empty((3, 8)).update(decoded, source, mask=keep)
    monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 4 * 7 * 24)  # 7 blocks of 7 rows, one of 1
    blocked = sae_losses.StreamingFVU.empty((3, 8)).update(decoded, source, mask=keep)
    for field in ("count", "mean", "m2", "error"):
        want = getattr(whole, field)
        torch.testing.assert_close(getattr(blocked, field), want, rtol=1e-12, atol=0)
    x = source.double() if keep is None else source.double()[keep]
    torch.testing.assert_close(whole.m2, (x - x.mean(0)).square().sum(0), rtol=1e-12, atol=0)


def test_streaming_fvu_update_with_no_kept_rows_changes_nothing():
    state = sae_losses.StreamingFVU.empty((4,)).update(randn(5, 4, seed=1), randn(5, 4, seed=2))
    nan_rows = torch.full((3, 4), torch.nan)
    after = state.update(nan_rows, nan_rows, mask=torch.zeros(3, dtype=torch.bool))
    for field in ("count", "mean", "m2", "error"):
        assert torch.equal(getattr(after, field), getattr(state, field)), field
