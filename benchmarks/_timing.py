"""Shared timing helpers for the benchmark scripts: blocked, shuffled, median timings.

Every candidate in a group is timed in blocks of calls, the group's candidates in a new shuffled
order every round, and the median over rounds is quoted. Blocks matter on the CPU: after a large
allocation the allocator's state depends on what ran before, so single interleaved calls are
unfair to whoever runs after the biggest allocation. On CUDA every block is synchronised.
"""

import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The suite's saved-tensor probe, so the benchmarks and the tests measure saved bytes one way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import saved_bytes_beyond_inputs

__all__ = ["Timer", "backward_of", "goals", "saved_bytes_beyond_inputs", "table"]


class Timer:
    def __init__(self, device: torch.device, rounds: int, block: int) -> None:
        self.device, self.rounds, self.block = device, rounds, block

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def medians(self, candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
        for run in candidates.values():  # warm-up, and the one-time compiles
            run()
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(self.rounds):
            order = list(candidates)
            random.shuffle(order)
            for name in order:
                run = candidates[name]
                self.sync()
                start = time.perf_counter()
                for _ in range(self.block):
                    run()
                self.sync()
                times[name].append((time.perf_counter() - start) / self.block)
        return {name: statistics.median(values) for name, values in times.items()}


def backward_of(loss_fn: Callable[..., torch.Tensor], wrt: torch.Tensor, *args: torch.Tensor):
    def run():
        torch.autograd.grad(loss_fn(*args), wrt)

    return run


def table(title: str, results: dict[str, float], floor: str | None, seed: str | None) -> list[str]:
    lines = [f"\n### {title}", "", "| candidate | median | / read floor | / seed formula |"]
    lines.append("|---|---|---|---|")
    for name, seconds in results.items():
        vs_floor = f"{seconds / results[floor]:.2f}x" if floor else "-"
        vs_seed = f"{seconds / results[seed]:.2f}x" if seed else "-"
        lines.append(f"| {name} | {seconds * 1e3:.3f} ms | {vs_floor} | {vs_seed} |")
    return lines


def goals(results: dict[str, float], floor: str, wanted: list[tuple[str, float]]) -> list[str]:
    """Issue 20's goals: each candidate's time over the read floor ``floor``, against its bound."""
    lines = ["", "| figure | measured | goal | met |", "|---|---|---|---|"]
    for name, goal in wanted:
        ratio = results[name] / results[floor]
        met = "yes" if ratio <= goal else "NO"
        lines.append(f"| {name} / read floor | {ratio:.2f}x | <= {goal} | {met} |")
    return lines
