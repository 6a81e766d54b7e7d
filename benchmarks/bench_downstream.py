"""Benchmarks of the evaluation-set terms: the similarity rows, the reconstruction bias and the
splice scores, each beside the peers' formulas, measured side by side in one run.

    python benchmarks/bench_downstream.py            # the full tables (a few minutes, 2 cores)
    python benchmarks/bench_downstream.py --quick    # tiny sizes and 2 rounds, to check it runs
    python benchmarks/bench_downstream.py --threads 1  # one thread: steadier on a shared machine

- `cosine_similarity`, `l2_norm_ratio` (eager forward; cosine forward + backward too) against
  SAELens's and SAEBench's `cossim` (`(x / ‖x‖ * x̂ / ‖x̂‖).sum(-1)`), torch's
  `F.cosine_similarity`, SAELens's `l2_ratio` (norms, a clone, an index assignment) and
  dictionary_learning's (`‖x̂‖ / ‖x‖`), at an activation batch of 8192 x 2304 (Gemma 2 2B's
  residual width) and at one that stays in cache, in float32 and bfloat16.
- `StreamingReconstructionBias.update` against the peers' per-batch formula.
- `StreamingSpliceScores.update` (three cross-entropies and two KLs) against SAELens's per-batch
  computation in the model's dtype (TransformerLens's `log_softmax(...).gather` for each CE and
  `F.kl_div(F.log_softmax(new), F.softmax(orig))` for each KL) and against the same formulas
  in float32, at 2048 tokens x a vocabulary of 50257.

Peak memory beyond the inputs: torch.profiler's memory trace of torch's CPU allocator
(`peak_bytes` of benchmarks/bench_logits.py, which says why it is valid where tracemalloc and
the RSS are not). Ratios are ours / the peer's: below 1 is better.
"""

import argparse
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from _timing import Timer, table
from bench_logits import peak_bytes
from torch import Tensor

from sae_losses import (
    StreamingReconstructionBias,
    StreamingSpliceScores,
    cosine_similarity,
    l2_norm_ratio,
)


def saelens_cossim(x_hat: Tensor, x: Tensor) -> Tensor:
    x_normed = x / torch.norm(x, dim=-1, keepdim=True)
    x_hat_normed = x_hat / torch.norm(x_hat, dim=-1, keepdim=True)
    return (x_normed * x_hat_normed).sum(dim=-1)


def saelens_l2_ratio(x_hat: Tensor, x: Tensor) -> Tensor:
    l2_norm_in = torch.norm(x, dim=-1)
    l2_norm_out = torch.norm(x_hat, dim=-1)
    l2_norm_in_for_div = l2_norm_in.clone()
    l2_norm_in_for_div[torch.abs(l2_norm_in_for_div) < 0.0001] = 1
    return l2_norm_out / l2_norm_in_for_div


ROW_CANDIDATES: dict[str, dict[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "cosine": {
        "ours: cosine_similarity": lambda d, s: cosine_similarity(d, s, reduce="none"),
        "SAELens/SAEBench cossim": saelens_cossim,
        "F.cosine_similarity": lambda d, s: F.cosine_similarity(d, s, dim=-1),
    },
    "l2 ratio": {
        "ours: l2_norm_ratio": lambda d, s: l2_norm_ratio(d, s, reduce="none"),
        "SAELens/SAEBench l2_ratio": saelens_l2_ratio,
        "dictionary_learning l2_ratio": lambda d, s: d.norm(dim=-1) / s.norm(dim=-1),
    },
}
FLOOR = "read floor: d.sum(); s.sum()"


def memory_lines(title: str, runs: dict[str, Callable[[], object]], subtract: int = 0) -> list[str]:
    peaks = {name: peak_bytes(run) - subtract for name, run in runs.items()}
    ours, *peers = peaks
    lines = [
        f"\n### {title}: peak memory beyond the inputs",
        "",
        "| candidate | peak |",
        "|---|---|",
    ]
    lines += [f"| {name} | {peak / 2**20:.2f} MiB |" for name, peak in peaks.items()]
    lines.append("")
    lines += [f"- memory, ours / {p}: {peaks[ours] / max(peaks[p], 1):.3f}x" for p in peers]
    return lines


def time_lines(title: str, timer: Timer, runs: dict[str, Callable[[], object]]) -> list[str]:
    results = timer.medians(runs)
    floor = FLOOR if FLOOR in results else None
    lines = table(title, results, floor, None)
    ours = next(name for name in results if name.startswith("ours"))
    lines.append("")
    lines += [
        f"- time, ours / {name}: {results[ours] / results[name]:.2f}x"
        for name in results
        if name not in (ours, FLOOR)
    ]
    return lines


def rows_benchmark(rows: int, features: int, dtype: torch.dtype, timer: Timer) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    source = (2 + torch.randn(rows, features, generator=generator)).to(dtype)
    decoded = 0.8 * source.float() + 0.3 * torch.randn(rows, features, generator=generator)
    decoded = decoded.to(dtype)
    name = f"{rows} x {features}, {str(dtype).removeprefix('torch.')}"
    lines = []
    for term, candidates in ROW_CANDIDATES.items():
        runs = {label: (lambda c=c: c(decoded, source)) for label, c in candidates.items()}
        lines += memory_lines(f"{term}, {name}, forward", runs)
        floor = {FLOOR: lambda: (decoded.sum(), source.sum())}
        lines += time_lines(f"{term}, {name}, forward: time", timer, {**runs, **floor})

    def backward(candidate: Callable[[Tensor, Tensor], Tensor]) -> Callable[[], object]:
        def run() -> object:
            leaves = [t.detach().requires_grad_() for t in (decoded, source)]
            return torch.autograd.grad(candidate(*leaves).sum(), leaves)

        return run

    cosine = ROW_CANDIDATES["cosine"]
    runs = {label: backward(c) for label, c in cosine.items()}
    gradients = 2 * decoded.numel() * decoded.element_size()
    lines += memory_lines(
        f"cosine, {name}, forward + backward (beyond the gradients)", runs, gradients
    )
    lines += time_lines(f"cosine, {name}, forward + backward: time", timer, runs)

    def per_batch_bias() -> Tensor:  # SAELens, SAEBench, dictionary_learning
        x_hat_norm_squared = torch.norm(decoded, dim=-1) ** 2
        x_dot_x_hat = (source * decoded).sum(dim=-1)
        return x_hat_norm_squared.mean() / x_dot_x_hat.mean()

    empty = StreamingReconstructionBias.empty()
    runs = {
        "ours: StreamingReconstructionBias.update": lambda: empty.update(decoded, source),
        "peers' per-batch relative_reconstruction_bias": per_batch_bias,
    }
    lines += memory_lines(f"reconstruction bias, {name}", runs)
    lines += time_lines(f"reconstruction bias, {name}: time", timer, runs)
    return lines


def lm_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """TransformerLens's per-token loss: -log_softmax(logits).gather(targets), logits' dtype."""
    return -F.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def saelens_kl(original: Tensor, new: Tensor) -> Tensor:
    """evals.py _kl: F.kl_div(F.log_softmax(new), F.softmax(original)).sum(-1)."""
    log_probs_new = F.log_softmax(new, dim=-1)
    return F.kl_div(log_probs_new, F.softmax(original, dim=-1), reduction="none").sum(-1)


def splice_benchmark(tokens: int, vocab: int, dtype: torch.dtype, timer: Timer) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    clean = 3 * torch.randn(tokens, vocab, generator=generator)
    spliced = (clean + torch.randn(tokens, vocab, generator=generator)).to(dtype)
    ablated = torch.randn(tokens, vocab, generator=generator).to(dtype)
    clean = clean.to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    empty = StreamingSpliceScores.empty()

    def peer(cast: Callable[[Tensor], Tensor]) -> Callable[[], object]:
        def run() -> object:
            c, s, a = (cast(x) for x in (clean, spliced, ablated))
            ce = [lm_ce(x, targets).mean() for x in (c, s, a)]
            return ce, saelens_kl(c, s).mean(), saelens_kl(c, a).mean()

        return run

    runs = {
        "ours: StreamingSpliceScores.update": lambda: empty.update(
            clean, spliced, ablated, targets
        ),
        "SAELens (model dtype)": peer(lambda x: x),
        "SAELens formulas in float32": peer(lambda x: x.float()),
    }
    name = f"splice scores, {tokens} x {vocab}, {str(dtype).removeprefix('torch.')}"
    return memory_lines(name, runs) + time_lines(f"{name}: time", timer, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds, for CI")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    device = torch.device("cpu")
    if args.quick:
        row_sizes, splice_sizes, rounds = [(64, 32)], [(16, 100)], 2
    else:
        # 8192 x 2304 float32 is 72 MiB per input; 256 x 768 (768 KiB) stays in the L2/L3 cache.
        row_sizes, splice_sizes, rounds = [(8192, 2304), (256, 768)], [(2048, 50257)], 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for rows, features in row_sizes:
        timer = Timer(device, rounds, block=1 if rows * features > 1 << 22 else 20)
        for dtype in (torch.float32, torch.bfloat16):
            print("\n".join(rows_benchmark(rows, features, dtype, timer)), flush=True)
    for tokens, vocab in splice_sizes:
        timer = Timer(device, rounds, block=1 if tokens * vocab > 1 << 22 else 20)
        for dtype in (torch.bfloat16, torch.float32):
            print("\n".join(splice_benchmark(tokens, vocab, dtype, timer)), flush=True)


if __name__ == "__main__":
    main()
