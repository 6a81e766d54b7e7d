"""Every op on DTensor inputs, on a real 2-rank gloo CPU mesh (issue 8, item 7; issue 9).

Tensor-parallel SAEs shard their latents over ranks with ``DTensor``, and so do FSDP2 models. The
inputs here are sharded on the batch axis (``Shard(0)``), on the feature axis (``Shard(-1)``, with
``(feature,)`` weights and thresholds sharded alike), or replicated. Each op's value and gradients
(gathered with ``.full_tensor()``) must equal the same op on the full plain tensors, at a size
above one eager block (1024 x 768 > 2**19 elements: the size at which the blocked eager path
once crashed on DTensors), and at a small size. Masks are passed as DTensors too: sharded like
the batch axis when the inputs are, replicated otherwise.

One spawn runs every case. The ranks build the same full tensors (seeded), compare, and write one
line per case: "ok", or what differed, or the exception the op raised. The parent asserts.
"""

import datetime
import functools
import json
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_losses import (
    fraction_of_variance_unexplained,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
)

WALL_TIMEOUT_S = 300  # only a hanging regression gets there; the ranks are then killed
SIZES = {"large": (1024, 768), "small": (8, 6)}
PLACEMENTS = ("batch", "feature", "replicated")
REDUCES = ("none", "mean", "sum")
MASKS = (None, "bool", "float")


def seeded(shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


@functools.cache
def full_inputs(rows, features):
    """The same full tensors on every rank. Half the latents are exactly 0 (as after a ReLU)."""
    return {
        "decoded": seeded((rows, features), 1),
        "source": seeded((rows, features), 2),
        "learned": seeded((rows, features), 3).relu(),
        "pre": seeded((rows, features), 4),
        "weight": seeded((features,), 5).abs() + 0.5,
        "threshold": seeded((features,), 6).abs(),
    }


def masks(rows):
    keep = torch.arange(rows) % 3 != 1
    weights = torch.where(keep, seeded((rows,), 7).abs() + 0.1, 0.0)
    return {"bool": keep, "float": weights}


# name -> (inputs that get gradients, other inputs, call, reduce modes, mask kinds it takes).
# `call(t, reduce, mask)` takes the tensors by name.
OPS = {
    "l2_reconstruction": (
        ("decoded", "source"),
        (),
        lambda t, reduce, mask: l2_reconstruction(
            t["decoded"], t["source"], reduce=reduce, mask=mask
        ),
        REDUCES,
        MASKS,
    ),
    "l1_absolute": (
        ("learned",),
        (),
        lambda t, reduce, mask: l1_absolute(t["learned"], reduce=reduce, mask=mask),
        REDUCES,
        MASKS,
    ),
    "l1_absolute_weighted": (
        ("learned", "weight"),
        (),
        lambda t, reduce, mask: l1_absolute(
            t["learned"], weight=t["weight"], reduce=reduce, mask=mask
        ),
        REDUCES,
        MASKS,
    ),
    "lp_sparsity_half": (
        ("learned",),
        (),
        lambda t, reduce, mask: lp_sparsity(t["learned"], p=0.5, reduce=reduce, mask=mask),
        REDUCES,
        MASKS,
    ),
    "lp_sparsity_weighted_root": (
        ("learned", "weight"),
        (),
        lambda t, reduce, mask: lp_sparsity(
            t["learned"], p=1.5, weight=t["weight"], root=True, reduce=reduce, mask=mask
        ),
        REDUCES,
        MASKS,
    ),
    "l0_norm": (
        (),
        ("learned",),
        lambda t, reduce, mask: l0_norm(t["learned"], threshold=0.5, reduce=reduce, mask=mask),
        REDUCES,
        MASKS,
    ),
    "jumprelu_l0": (
        ("threshold", "pre"),  # `pre` gets no gradient, on either path
        (),
        lambda t, reduce, mask: jumprelu_l0(
            t["pre"], t["threshold"], bandwidth=0.5, reduce=reduce, mask=mask
        ),
        REDUCES,
        MASKS,
    ),
    "fraction_of_variance_unexplained": (
        ("decoded", "source"),
        (),
        lambda t, reduce, mask: fraction_of_variance_unexplained(
            t["decoded"], t["source"], mask=mask
        ),
        ("n/a",),  # no reduce argument: the result is per component
        (None, "bool"),
    ),
}


def placements_for(name, placement):
    """DTensor placements of one input: (batch, feature) inputs, (feature,) vectors, masks."""
    from torch.distributed.tensor import Replicate, Shard

    if name in ("weight", "threshold"):  # sharded with the feature axis they weight
        return [Shard(0)] if placement == "feature" else [Replicate()]
    if name == "mask":  # sharded with the batch axis
        return [Shard(0)] if placement == "batch" else [Replicate()]
    return {"batch": [Shard(0)], "feature": [Shard(-1)], "replicated": [Replicate()]}[placement]


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


@functools.cache
def expected_result(op, size, reduce, mask_kind):
    """The op on the full plain tensors: (value, cotangent, {input: gradient})."""
    with_grad, _, call, _, _ = OPS[op]
    rows, features = SIZES[size]
    full = full_inputs(rows, features)
    mask = None if mask_kind is None else masks(rows)[mask_kind]
    plain = {name: full[name].clone().requires_grad_(name in with_grad) for name in full}
    value = call(plain, "mean" if reduce == "n/a" else reduce, mask)
    # Positive upstream gradients: sums of them over rows do not cancel, so rtol 1e-5 is a fair
    # bound for two float32 computations that add in different orders.
    cotangent = seeded(value.shape, 8).abs() + 0.5
    if value.requires_grad:
        (value * cotangent).sum().backward()
    return value, cotangent, {name: plain[name].grad for name in with_grad}


def run_case(mesh, op, size, placement, reduce, mask_kind):
    from torch.distributed.tensor import DTensor, distribute_tensor

    with_grad, without_grad, call, _, _ = OPS[op]
    rows, features = SIZES[size]
    full = full_inputs(rows, features)
    expected, cotangent, expected_grads = expected_result(op, size, reduce, mask_kind)

    sharded = {
        name: distribute_tensor(full[name], mesh, placements_for(name, placement))
        .detach()
        .requires_grad_(name in with_grad)
        for name in with_grad + without_grad
    }
    dmask = None
    if mask_kind is not None:
        dmask = distribute_tensor(masks(rows)[mask_kind], mesh, placements_for("mask", placement))
    result = call(sharded, "mean" if reduce == "n/a" else reduce, dmask)
    if not isinstance(result, DTensor):
        return f"the result is a {type(result).__name__}, not a DTensor"
    got = result.full_tensor()
    if got.requires_grad != expected.requires_grad:
        return f"requires_grad is {got.requires_grad} on DTensors, not on full tensors"
    if got.requires_grad:
        (got * cotangent).sum().backward()
    problems = [compare(got.detach(), expected.detach(), "value")]
    for name in with_grad:
        grad = sharded[name].grad
        grad = None if grad is None else grad.full_tensor()
        problems.append(compare(grad, expected_grads[name], f"gradient of {name}"))
    return "; ".join(p for p in problems if p) or "ok"


def all_cases():
    for op, (_, _, _, reduces, mask_kinds) in OPS.items():
        for size in SIZES:
            for placement in PLACEMENTS:
                for reduce in reduces:
                    for mask_kind in mask_kinds:
                        # Masks at one reduce mode each: bool with "mean", float with "sum".
                        if mask_kind == "bool" and reduce not in ("mean", "n/a"):
                            continue
                        if mask_kind == "float" and reduce != "sum":
                            continue
                        yield op, size, placement, reduce, mask_kind


def case_id(op, size, placement, reduce, mask_kind):
    return f"{op}|{size}|{placement}|reduce={reduce}|mask={mask_kind}"


def worker(rank, world_size, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        outcomes = {}
        for case in all_cases():
            try:
                outcomes[case_id(*case)] = run_case(mesh, *case)
            except Exception as error:  # the parent asserts on what was raised
                outcomes[case_id(*case)] = f"raised {type(error).__name__}: {error}"[:2000]
        with open(f"{out_dir}/{rank}.json", "w") as file:
            json.dump(outcomes, file)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{case id: outcome} of each of the 2 ranks, from one spawn."""
    out_dir = tmp_path_factory.mktemp("dtensor")
    context = mp.start_processes(
        worker, args=(2, free_port(), str(out_dir)), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + WALL_TIMEOUT_S
    while any(process.is_alive() for process in context.processes):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        time.sleep(0.1)
    paths = [out_dir / f"{rank}.json" for rank in range(2)]
    missing = [str(path) for path in paths if not path.exists()]
    exit_codes = [process.exitcode for process in context.processes]
    assert not missing, f"{missing} not written (exit codes {exit_codes})"
    return [json.loads(path.read_text()) for path in paths]


def test_the_large_size_is_above_one_eager_block():
    from sae_losses._rowops import BLOCK_ELEMENTS

    rows, features = SIZES["large"]
    assert rows * features > BLOCK_ELEMENTS


@pytest.mark.parametrize("op", list(OPS))
def test_dtensor_values_and_gradients_equal_the_full_tensor_computation(outcomes, op):
    ids = [case_id(*case) for case in all_cases() if case[0] == op]
    for rank_outcomes in outcomes:
        failures = {i: rank_outcomes[i] for i in ids if rank_outcomes[i] != "ok"}
        assert not failures, "\n".join(f"{i}: {why}" for i, why in failures.items())
