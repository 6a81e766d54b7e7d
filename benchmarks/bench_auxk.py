"""Benchmark of auxk_loss: forward + backward time and peak memory against the dense formula.

    python benchmarks/bench_auxk.py            # batch 4096, 16384 latents, d_model 768, k_aux 384
    python benchmarks/bench_auxk.py --quick    # tiny sizes, to check that it runs (CI)

Candidates, each the AuxK FVU of the same inputs, with gradients to the pre-activations and the
decoder weight:

- ``auxk_loss``: this library (blocked top-k, gather, ``embedding_bag`` decode);
- the dense formula (dictionary_learning's and SAELens's): top-k, scatter into a
  ``(batch, latent)`` activation, then a matmul with the decoder;
- sparsify's formula: top-k over the whole masked matrix with autograd, ``embedding_bag`` decode;
- ``torch.topk`` alone (forward only), the floor the issue quotes (0.2x the dense formula).

Times are medians of shuffled rounds (see _timing.py). Peak memory is what the run allocates
beyond the inputs and the gradients it returns. On CUDA it is ``torch.cuda.max_memory_allocated``.
On the CPU it comes from a ``torch.profiler`` memory trace (``profile_memory=True``): every
allocation and free of c10's CPU allocator, which every CPU tensor goes through, with its size
and time; their running sum, from 0 at the start of the run, peaks at the run's peak (tracemalloc
would not see these allocations, which bypass Python's allocator).
"""

import argparse
import itertools
import random
from collections.abc import Callable

import torch
from _timing import Timer, saved_bytes_beyond_inputs

from sae_losses import auxk_loss

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def fvu(e_hat: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return (e_hat - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()


def dense_formula(pre, dead, weight, residual, k_aux):
    values, indices = torch.where(dead, pre, -torch.inf).topk(k_aux, sorted=False)
    acts = torch.zeros_like(pre).scatter(1, indices, values.relu())
    return fvu(acts @ weight, residual.detach())


def sparsify_formula(pre, dead, weight, residual, k_aux):
    values, indices = torch.where(dead, pre, -torch.inf).topk(k_aux, sorted=False)
    e_hat = torch.nn.functional.embedding_bag(
        indices, weight, per_sample_weights=values.relu(), mode="sum"
    )
    return fvu(e_hat, residual.detach())


def ours(pre, dead, weight, residual, k_aux):
    return auxk_loss(pre, dead, weight, residual, k_aux=k_aux)


CANDIDATES: dict[str, Loss] = {
    "auxk_loss": ours,
    "dense formula (scatter, matmul)": dense_formula,
    "sparsify formula (topk autograd, embedding_bag)": sparsify_formula,
}


def peak_bytes_beyond(run: Callable[[], list[torch.Tensor]], device: torch.device) -> int:
    """Peak bytes ``run`` allocates, less the gradients it returns (kept until it ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            grads = run()
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        peak = max(itertools.accumulate(n for _, n in changes), default=0)
    return peak - sum(g.numel() * g.element_size() for g in grads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 round, for CI")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of each candidate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    random.seed(0)
    torch.manual_seed(0)
    batch, latents, model, k_aux = (256, 2048, 64, 32) if args.quick else (4096, 16384, 768, 384)
    rounds = args.rounds or (1 if args.quick else 5)
    timer = Timer(device, rounds, block=1)

    pre = torch.randn(batch, latents, device=device).requires_grad_()
    weight = (torch.randn(latents, model, device=device) / model**0.5).requires_grad_()
    residual = torch.randn(batch, model, device=device)
    dead = torch.rand(latents, device=device) < 0.5  # about half the latents, so n_dead > k_aux
    inputs = [pre, weight, residual, dead]

    def forward_backward(loss: Loss) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            return list(
                torch.autograd.grad(loss(pre, dead, weight, residual, k_aux), [pre, weight])
            )

        return run

    expected = dense_formula(pre, dead, weight, residual, k_aux)
    for loss in CANDIDATES.values():
        torch.testing.assert_close(loss(pre, dead, weight, residual, k_aux), expected)

    def topk_alone() -> None:
        with torch.no_grad():
            torch.where(dead, pre, -torch.inf).topk(k_aux, sorted=False)

    runs: dict[str, Callable[[], object]] = {n: forward_backward(c) for n, c in CANDIDATES.items()}
    runs["torch.topk alone (forward)"] = topk_alone
    times = timer.medians(runs)
    peaks = {name: peak_bytes_beyond(forward_backward(c), device) for name, c in CANDIDATES.items()}
    saved = {
        name: saved_bytes_beyond_inputs(lambda c=c: c(pre, dead, weight, residual, k_aux), inputs)
        for name, c in CANDIDATES.items()
    }

    dense = "dense formula (scatter, matmul)"
    lines = [
        f"device: {device}, torch {torch.__version__}, threads: {torch.get_num_threads()}, "
        f"rounds: {rounds}, batch {batch}, latents {latents}, d_model {model}, k_aux {k_aux}, "
        "float32, about half the latents dead",
        "",
        "### AuxK forward + backward",
        "",
        "| candidate | median | / dense formula | peak beyond inputs and grads | / dense "
        "| saved for backward beyond inputs |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds in times.items():
        peak = f"{peaks[name] / 2**20:.1f} MiB" if name in peaks else "-"
        peak_ratio = f"{peaks[name] / peaks[dense]:.2f}x" if name in peaks else "-"
        kept = f"{saved[name] / 2**20:.1f} MiB" if name in saved else "-"
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} ms | {seconds / times[dense]:.2f}x | {peak} "
            f"| {peak_ratio} | {kept} |"
        )
    time_ratio = times["auxk_loss"] / times[dense]
    memory_ratio = peaks["auxk_loss"] / peaks[dense]
    lines += [
        "",
        "### Goals",
        "",
        f"- auxk_loss time / dense formula: {time_ratio:.2f}x (goal <= 0.4)",
        f"- auxk_loss peak memory / dense formula: {memory_ratio:.2f}x (goal <= 0.2)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
