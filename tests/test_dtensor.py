"""Every term (tests/terms.py) on DTensor inputs, on a real 2-rank gloo CPU mesh.

Tensor-parallel SAEs shard their latents over ranks with ``DTensor``, and so do FSDP2 models. The
inputs here are sharded on the batch axis (``Shard(0)``), on the feature axis (``Shard(-1)``, with
``(feature,)`` weights and thresholds sharded alike), or replicated. Each term's value and
gradients (gathered with ``.full_tensor()``) must equal its eager computation on the full plain
tensors (a compiled term's: its eager twin's), at a small size and at a large one: above
``ONE_CALL_BLOCKS * BLOCK_ELEMENTS`` elements, where the eager path computes in row blocks (the
path that once crashed on DTensors). The workers set ``BLOCK_ELEMENTS`` to 2^12, so "large" is
257 x 64; a spy on ``row_blocks`` checks that the full-tensor side really was blocked there, and
that no DTensor reached the eager path. Masks are DTensors too: sharded like the batch axis when
the inputs are, replicated otherwise.

One spawn runs every case. The ranks build the same full tensors (seeded), compare, and write one
line per case: "ok", or what differed, or the exception the term raised. The parent asserts.
"""

import functools

import pytest
import torch

from helpers import RowBlocksSpy, blocked_rows
from sae_losses import _rowops
from spawn import init_gloo, read_json, start_ranks, write_json
from terms import TERMS, cases

BLOCK_ELEMENTS = 1 << 12  # the workers' block: 16384 elements in one call at most
FEATURES = {"large": 64, "small": 6}
PLACEMENTS = ("batch", "feature", "replicated")


def rows_of(size):
    """Read when the workers run, after they set BLOCK_ELEMENTS."""
    return blocked_rows(FEATURES["large"]) if size == "large" else 8


def masks(rows):
    keep = torch.arange(rows) % 3 != 1
    weights = torch.where(
        keep, torch.rand(rows, generator=torch.Generator().manual_seed(7)) + 0.1, 0
    )
    return {"bool": keep, "float": weights}


def placements_for(placement, term=None, index=None):
    """DTensor placements of input ``index`` (the mask when None): sharded on its axis named
    ``"batch"`` or ``"feature"`` (a ``(feature,)`` weight with the features it weights),
    replicated where it has no such axis."""
    from torch.distributed.tensor import Replicate, Shard

    if placement == "replicated":
        return [Replicate()]
    if index is None:  # the mask: sharded with the batch axis
        return [Shard(0)] if placement == "batch" else [Replicate()]
    dim = term.axis_of(index, placement)
    return [Replicate()] if dim is None else [Shard(dim)]


def compare(got, expected, what):
    """None when equal to float32 rounding, else what differed."""
    if (got is None) != (expected is None):
        return f"{what}: {'no' if got is None else 'a'} gradient, expected the opposite"
    if got is None:
        return None
    try:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    except AssertionError as error:
        return f"{what}: {error}"
    return None


def full_inputs(term, size):
    """The same full tensors on every rank, all asking for a gradient."""
    return term.inputs(rows_of(size), (FEATURES[size],), torch.float32, seed=1, requires_grad=True)


@functools.cache
def expected_result(name, size, reduce, mask_kind, spy):
    """The eager term on the full plain tensors: (value, cotangent, gradients, blocked)."""
    term = {t.name: t for t in TERMS}[name]
    inputs = full_inputs(term, size)
    mask = None if mask_kind is None else masks(inputs[0].shape[0])[mask_kind]
    before = spy.blocked()
    value = term.expected(*inputs, reduce=reduce, mask=mask)
    blocked = spy.blocked() > before
    # Positive upstream gradients: sums of them over rows do not cancel, so rtol 1e-5 is a fair
    # bound for two float32 computations that add in different orders.
    generator = torch.Generator().manual_seed(8)
    cotangent = torch.rand(value.shape, generator=generator) + 0.5
    if value.requires_grad:
        (value * cotangent).sum().backward()
    return value.detach(), cotangent, [t.grad for t in inputs], blocked


def run_case(mesh, spy, term, size, placement, reduce, mask_kind):
    from torch.distributed.tensor import DTensor, distribute_tensor

    expected, cotangent, expected_grads, blocked = expected_result(
        term.name, size, reduce, mask_kind, spy
    )
    problems = []
    if size == "large" and term.blocked and not blocked:
        problems.append("the full-tensor side did not take the blocked eager path")
    sharded = [
        distribute_tensor(t.detach(), mesh, placements_for(placement, term, i))
        .detach()
        .requires_grad_(t.is_floating_point())
        for i, t in enumerate(full_inputs(term, size))
    ]
    dmask = None
    if mask_kind is not None:
        full_mask = masks(sharded[0].shape[0])[mask_kind]
        dmask = distribute_tensor(full_mask, mesh, placements_for(placement))
    spy.calls.clear()
    result = term(*sharded, reduce=reduce, mask=dmask)
    if any(issubclass(kind, DTensor) for kind, _ in spy.calls):
        problems.append("DTensor inputs took the eager path, not the plain formula")
    if not isinstance(result, DTensor):
        return f"the result is a {type(result).__name__}, not a DTensor"
    got = result.full_tensor()
    if got.requires_grad != bool(term.grads):
        return f"requires_grad is {got.requires_grad} on DTensors"
    if got.requires_grad:
        (got * cotangent).sum().backward()
    problems.append(compare(got.detach(), expected, "value"))
    for i, (t, want) in enumerate(zip(sharded, expected_grads, strict=True)):
        grad = None if t.grad is None else t.grad.full_tensor()
        problems.append(compare(grad, want, f"gradient of input {i}"))
    return "; ".join(p for p in problems if p) or "ok"


def all_cases():
    for term in TERMS:
        for size in FEATURES:
            for placement in PLACEMENTS:
                # Every reduce mode at the small size; at the large one, where the eager path
                # would block, the rows ("none") decide. Masks at one reduce mode each: bool
                # with "mean", float with "sum".
                reduces = term.reduces if size == "small" or not term.reduce else ("none",)
                for reduce in reduces:
                    yield term, size, placement, reduce, None
                if term.masks:
                    yield term, size, placement, "mean" if term.reduce else None, "bool"
                if term.float_masks:
                    yield term, size, placement, "sum", "float"


def case_id(term, size, placement, reduce, mask_kind):
    return f"{term.name}|{size}|{placement}|reduce={reduce}|mask={mask_kind}"


def worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    _rowops.BLOCK_ELEMENTS = BLOCK_ELEMENTS
    spy = RowBlocksSpy.install()
    init_gloo(rank, world_size, port)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        outcomes = {}
        for case in all_cases():
            try:
                outcomes[case_id(*case)] = run_case(mesh, spy, *case)
            except Exception as error:  # the parent asserts on what was raised
                outcomes[case_id(*case)] = f"raised {type(error).__name__}: {error}"[:2000]
        write_json(f"{out_dir}/{rank}.json", outcomes)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case id: outcome} of each of the 2 ranks, from one spawn."""
    out_dir = tmp_path_factory.mktemp("dtensor")
    exit_codes = start_ranks(worker, 2, out_dir)
    found = [read_json(out_dir / f"{rank}.json") for rank in range(2)]
    assert None not in found, f"a rank wrote nothing (exit codes {exit_codes})"
    return found


# Compiled terms run their plain formula on DTensors (no compile) and are compared with their
# eager twin, so they are asserted in this pass, from the same spawn: no compile mark.
@pytest.mark.parametrize(
    "term",
    [
        pytest.param(*p.values, id=p.id, marks=[m for m in p.marks if m.name != "compile"])
        for p in cases(contract="dtensor")
    ],
)
def test_dtensor_values_and_gradients_equal_the_full_tensor_computation(outcomes, term):
    ids = [case_id(*case) for case in all_cases() if case[0] is term]
    for rank_outcomes in outcomes:
        failures = {i: rank_outcomes[i] for i in ids if rank_outcomes[i] != "ok"}
        assert not failures, "\n".join(f"{i}: {why}" for i, why in failures.items())
