"""An evaluation loop that streams SAE metrics, on one process or under DDP.

    python examples/eval_loop.py                         # one process
    torchrun --nproc-per-node 2 examples/eval_loop.py    # two processes, gloo

Each rank evaluates its own shard of the batches; all_reduce then gives every rank the mean over
all rows. On one process all_reduce returns its input, so the loop is the same code.
"""

import os

import torch
import torch.distributed as dist

from sae_losses import StreamingMean, all_reduce, l1_absolute, l2_reconstruction


def evaluate(batches, encoder, decoder, *, rank=0, world_size=1):
    metrics = {"l2": StreamingMean.empty(), "l1": StreamingMean.empty()}
    with torch.no_grad():
        for source in batches[rank::world_size]:  # this rank's shard
            learned = torch.relu(encoder(source))
            decoded = decoder(learned)
            metrics = {
                "l2": metrics["l2"].update(l2_reconstruction(decoded, source, reduce="none")),
                "l1": metrics["l1"].update(l1_absolute(learned, reduce="none")),
            }
    # Every rank must make this call, the same number of times, or the others wait forever.
    return all_reduce(metrics)


def main():
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # the same model and data on every rank
    encoder, decoder = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    batches = [torch.randn(batch, 16) for batch in (32, 32, 17, 5, 32)]  # uneven on purpose
    metrics = evaluate(batches, encoder, decoder, rank=rank, world_size=world_size)
    if rank == 0:
        rows = metrics["l2"].count.item()
        l2, l1 = metrics["l2"].compute().item(), metrics["l1"].compute().item()
        print(f"world_size={world_size} rows={rows} l2={l2:.6f} l1={l1:.6f}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
