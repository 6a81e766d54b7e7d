"""Benchmarks of the logit terms: cross_entropy and kl_divergence against the peers' formulas.

    python benchmarks/bench_logits.py            # 8192 x 50257 and a cache-sized case (minutes)
    python benchmarks/bench_logits.py --quick    # tiny sizes, to check that it runs (CI)

Per-token values of ``rows x vocab`` logits, in bfloat16 and float32, forward and forward +
backward (the gradient to ``logits``; for the KL the reference is the clean model's, detached).
Candidates, all measured side by side in one process:
- ours: ``cross_entropy(logits, targets)`` and ``kl_divergence(reference, logits)``;
- the peers' formulas in the model's dtype: TransformerLens's ``-log_softmax(z).gather(t)``
  (SAELens's CE) and SAELens 6.54.12's ``F.kl_div(log_softmax(z), softmax(r)).sum(-1)``;
- the float32 forms a careful user writes: ``F.cross_entropy(z.float(), t)`` and the KL from
  ``log_softmax(x.float())``.
Every candidate ends in the mean over rows.

Peak memory: torch.profiler's memory trace (``profile_memory=True``) records every allocation
and free of torch's CPU allocator with its size, in order; the peak of their running sum is the
peak of what the call allocated beyond what existed before it (the inputs). tracemalloc does not
see torch's allocations and the RSS is blurred by the allocator's caching, so neither is used.
For forward + backward the gradients (``torch.autograd.grad``'s results) are subtracted, so the
figure is the peak beyond the inputs and their gradients.
"""

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from _timing import Timer, table
from torch import Tensor

from sae_losses import cross_entropy, kl_divergence

Candidate = Callable[[Tensor, Tensor], Tensor]  # (logits, other) -> scalar


def peak_bytes(run: Callable[[], object]) -> int:
    """The peak of the bytes allocated by torch's CPU allocator while ``run()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    allocations = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        fields = node.extra_fields
        is_allocation = isinstance(fields, torch._C._profiler._ExtraFields_Allocation)
        if is_allocation and fields.device.type == "cpu":
            allocations.append((node.start_time_ns, fields.alloc_size))
    total = peak = 0
    for _, size in sorted(allocations, key=lambda allocation: allocation[0]):
        total += size
        peak = max(peak, total)
    return peak


class CpuTimer(Timer):
    """Timer's blocked, shuffled medians, in the CPU time of this one thread (``--threads 1``):
    on a shared machine, other processes' load does not count, page faults and memory stalls
    do (the clock is CLOCK_THREAD_CPUTIME_ID: user and system time of the thread)."""

    def medians(self, candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
        for run in candidates.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(self.rounds):
            order = list(candidates)
            random.shuffle(order)
            for name in order:
                start = time.thread_time()
                for _ in range(self.block):
                    candidates[name]()
                times[name].append((time.thread_time() - start) / self.block)
        return {name: statistics.median(values) for name, values in times.items()}


def ce_candidates() -> dict[str, Candidate]:
    return {
        "ours: cross_entropy": lambda z, t: cross_entropy(z, t),
        "TransformerLens: -log_softmax(z).gather(t)": lambda z, t: (
            -(F.log_softmax(z, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1).mean())
        ),
        "float32 form: F.cross_entropy(z.float(), t)": lambda z, t: F.cross_entropy(
            z.float(), t, reduction="none"
        ).mean(),
    }


def kl_candidates() -> dict[str, Candidate]:
    return {
        "ours: kl_divergence": lambda z, r: kl_divergence(r, z),
        "SAELens: kl_div(log_softmax(z), softmax(r))": lambda z, r: (
            F.kl_div(F.log_softmax(z, -1), F.softmax(r, -1), reduction="none").sum(-1).mean()
        ),
        "float32 form: kl_div of log_softmax(x.float())": lambda z, r: (
            F.kl_div(
                F.log_softmax(z.float(), -1),
                F.log_softmax(r.float(), -1),
                reduction="none",
                log_target=True,
            )
            .sum(-1)
            .mean()
        ),
    }


def inputs(op: str, rows: int, vocab: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=generator)).to(dtype)
    if op == "cross_entropy":
        return logits, torch.randint(0, vocab, (rows,), generator=generator)
    return logits, (logits.float() + torch.randn(rows, vocab, generator=generator)).to(dtype)


def forward_backward(candidate: Candidate, logits: Tensor, other: Tensor) -> Callable[[], object]:
    def run() -> object:
        leaf = logits.detach().requires_grad_()
        return torch.autograd.grad(candidate(leaf, other), leaf)

    return run


def measure(op: str, rows: int, vocab: int, dtype: torch.dtype, timer: Timer) -> list[str]:
    candidates = ce_candidates() if op == "cross_entropy" else kl_candidates()
    logits, other = inputs(op, rows, vocab, dtype)
    gradient_bytes = logits.numel() * logits.element_size()
    name = str(dtype).removeprefix("torch.")
    lines = [f"\n### {op}, {rows} x {vocab}, {name}: peak memory beyond the inputs", ""]
    lines += ["| candidate | forward | forward + backward (beyond the gradient) |", "|---|---|---|"]
    memory = {}
    for label, candidate in candidates.items():
        forward = peak_bytes(lambda candidate=candidate: candidate(logits, other))
        both = peak_bytes(forward_backward(candidate, logits, other)) - gradient_bytes
        memory[label] = (forward, both)
        lines.append(f"| {label} | {forward / 2**20:.1f} MiB | {both / 2**20:.1f} MiB |")
    ours, *peers = memory
    lines.append("")
    for peer in peers:
        ratios = [memory[ours][i] / max(memory[peer][i], 1) for i in range(2)]
        lines.append(
            f"- memory, ours / {peer}: forward {ratios[0]:.3f}x, forward + backward "
            f"{ratios[1]:.3f}x (goal <= 0.1 at 8192 x 50257)"
        )
    for mode in ("forward", "forward + backward"):
        runs = {
            label: (
                (lambda c=candidate: c(logits, other))
                if mode == "forward"
                else forward_backward(candidate, logits, other)
            )
            for label, candidate in candidates.items()
        }
        results = timer.medians(runs)
        lines += table(f"{op}, {rows} x {vocab}, {name}, {mode}: time", results, None, None)
        lines.append("")
        for peer in peers:
            lines.append(
                f"- time, ours / {peer}: {results[ours] / results[peer]:.2f}x"
                + (" (goal <= 1.0 at 8192 x 50257)" if peer.startswith("float32") else "")
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds, for CI")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per candidate")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads; with 1, times are this thread's CPU time (robust on a shared machine)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_time = torch.get_num_threads() == 1
    random.seed(0)
    torch.manual_seed(0)
    device = torch.device("cpu")
    if args.quick:
        sizes, rounds = [(64, 1000)], 2
    else:
        # The goal's size, then one whose float32 logits (8 MiB) stay in the 32 MiB L3 cache.
        sizes, rounds = [(args.rows, args.vocab), (256, 8192)], 5
    rounds = args.rounds or rounds
    clock = "CPU time of the one thread" if cpu_time else "wall-clock time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {clock}")
    for rows, vocab in sizes:
        block = 2 if args.quick else 1 if rows * vocab > 1 << 24 else 10
        timer = (CpuTimer if cpu_time else Timer)(device, rounds, block=block)
        for op in ("cross_entropy", "kl_divergence"):
            for dtype in (torch.bfloat16, torch.float32):
                print("\n".join(measure(op, rows, vocab, dtype, timer)), flush=True)


if __name__ == "__main__":
    main()
