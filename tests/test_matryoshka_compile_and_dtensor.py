"""matryoshka_l2 under torch.compile and on DTensors.

fullgraph compile matches eager (values and gradients, a NaN-padded masked row) with at most two
graphs across batch sizes; inductor compiles it into a training step; on 2 gloo ranks, DTensor
inputs sharded by batch, by latent (tensor parallel) or replicated give the full-tensor values
and gradients.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from matryoshka_cases import call, inputs

# --- compile -------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_compiled_matches_eager_with_at_most_two_graphs_across_batch_sizes(mask_kind):
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(
        lambda z, w, x, b, mask: call(z, w, x, b, mask=mask), backend=counter, fullgraph=True
    )
    for batch in (4, 5, 8, 13):
        tensors = [t.detach().float() for t in inputs(batch=batch, seed=batch)]
        tensors[0][batch - 1] = torch.nan  # a padded row
        keep = torch.arange(batch) % 3 != 1
        keep[batch - 1] = False
        mask = keep if mask_kind == "bool" else keep * torch.linspace(0.5, 2.0, batch)
        leaves = [t.clone().requires_grad_() for t in tensors]
        eager_leaves = [t.clone().requires_grad_() for t in tensors]
        result = compiled(*leaves, mask)
        expected = call(*eager_leaves, mask=mask)
        torch.testing.assert_close(result, expected)
        result.sum().backward()
        expected.sum().backward()
        for a, e in zip(leaves, eager_leaves, strict=True):
            assert a.grad.isfinite().all()
            torch.testing.assert_close(a.grad, e.grad)
    assert counter.frame_count <= 2


@pytest.mark.compile
def test_inductor_compiles_it_into_a_training_step():
    torch._dynamo.reset()
    tensors = [t.detach().float().requires_grad_() for t in inputs(seed=11)]
    compiled = torch.compile(lambda *t: call(*t).sum(), fullgraph=True)
    compiled(*tensors).backward()
    expected = [t.detach().clone().requires_grad_() for t in tensors]
    call(*expected).sum().backward()
    for a, e in zip(tensors, expected, strict=True):
        torch.testing.assert_close(a.grad, e.grad)


# --- DTensor -------------------------------------------------------------------------------------

PLACEMENTS = {  # latents, decoder_weight, source, decoder_bias, mask
    "batch": ("S0", "R", "S0", "R", "S0"),
    "latent (tensor parallel)": ("S1", "S0", "R", "R", "R"),
    "replicated": ("R", "R", "R", "R", "R"),
}


def dtensor_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from spawn import init_gloo, write_json

    init_gloo(rank, world_size, port)
    mesh = init_device_mesh("cpu", (world_size,))
    kinds = {"R": [Replicate()], "S0": [Shard(0)], "S1": [Shard(1)]}
    outcomes = {}
    for name, placements in PLACEMENTS.items():
        for masked in (False, True):
            full = [t.detach().float().requires_grad_() for t in inputs(batch=8, seed=13)]
            keep = (torch.arange(8) % 3 != 1) if masked else None
            expected = call(*full, mask=keep)
            expected.sum().backward()
            sharded = [
                distribute_tensor(t.detach(), mesh, kinds[p]).requires_grad_()
                for t, p in zip(full, placements, strict=False)
            ]
            mask = None if keep is None else distribute_tensor(keep, mesh, kinds[placements[4]])
            try:
                result = call(*sharded, mask=mask).full_tensor()
                result.sum().backward()
                torch.testing.assert_close(result, expected.detach())
                for d, t in zip(sharded, full, strict=True):
                    torch.testing.assert_close(d.grad.full_tensor(), t.grad)
                outcomes[f"{name}, mask={masked}"] = "ok"
            except Exception as error:  # the parent asserts on what was raised
                outcomes[f"{name}, mask={masked}"] = f"{type(error).__name__}: {error}"[:1000]
    write_json(f"{out_dir}/{rank}.json", outcomes)
    dist.destroy_process_group()


def test_dtensor_values_and_gradients_equal_the_full_tensor_computation(tmp_path):
    from spawn import read_json, start_ranks

    exit_codes = start_ranks(dtensor_worker, 2, tmp_path)
    for rank in range(2):
        outcomes = read_json(tmp_path / f"{rank}.json")
        assert outcomes is not None, f"rank {rank} wrote nothing (exit codes {exit_codes})"
        assert len(outcomes) == 2 * len(PLACEMENTS)
        assert set(outcomes.values()) == {"ok"}, outcomes
