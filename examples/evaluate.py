"""Evaluate a trained SAE on held-out activations: every metric streamed, one collective.

    python examples/evaluate.py                             # one process
    torchrun --nproc-per-node 2 examples/evaluate.py        # two processes, gloo: same numbers
    python examples/evaluate.py --checkpoint out/ddp_sae.pt # the SAE `make demo` trained

The SAE is the toy one of examples/demo.py: trained here in a few seconds with a fixed seed, in
one thread, so every rank holds the same weights (or loaded from a demo checkpoint). The held-out
rows come in chunks of uneven sizes; rank r evaluates chunks r, r + world_size, ..., so the ranks
see different numbers of rows. Each rank streams its rows into one dict of accumulators:

    mse                 StreamingMean of l2_reconstruction(..., reduce="none")  (mean over features)
    fvu                 StreamingFVU: Σ‖x - x̂‖² / Σ‖x - x̄‖², x̄ the mean of all held-out rows
    l0, l1              StreamingMean of l0_norm / l1_absolute(..., reduce="none")
    density             StreamingMean.empty((d_sae,)).update(learned > 0): firing frequencies
    decoded_sq, inner   StreamingMeans of ‖x̂‖² and ⟨x, x̂⟩ per row, for the reconstruction bias
    cosine              StreamingMean of per-row cos(x̂, x), over rows with x ≠ 0

and one all_reduce call combines the whole dict across ranks. Rank 0 prints one line per metric
(10 significant digits), writes them in full precision to evaluate_metrics.json, and plots the
log10 firing frequency of every latent to feature_density.png, dead latents as a separate bar.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import SparseAutoencoder, ToySuperposition, positive_float, positive_int

from sae_losses import (
    StreamingFVU,
    StreamingMean,
    all_reduce,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
)

HELD_OUT_OFFSET = 20_000_000  # batch indices of held-out rows: disjoint from training steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=8192, help="held-out rows")
    parser.add_argument("--chunk", type=positive_int, default=512, help="largest eval chunk")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="training rows/step")
    parser.add_argument("--d-model", type=positive_int, default=32, help="activation dimension")
    parser.add_argument("--n-features", type=positive_int, default=64, help="true features")
    parser.add_argument("--d-sae", type=positive_int, default=128, help="SAE latents")
    parser.add_argument("--sparsity", type=positive_float, default=0.03, help="P(feature on)")
    parser.add_argument("--l1-coefficient", type=positive_float, default=3e-3)
    parser.add_argument("--lr", type=positive_float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", type=positive_int, default=30, help="histogram bins")
    parser.add_argument(
        "--checkpoint", type=Path, help="an SAE state dict to evaluate (e.g. out/ddp_sae.pt)"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path("out"), help="plot and metrics go here"
    )
    args = parser.parse_args(argv)
    if args.d_model >= args.n_features:
        parser.error("a toy model of superposition needs --d-model < --n-features")
    if not args.sparsity < 1:
        parser.error(f"--sparsity is a probability below 1, got {args.sparsity}")
    if args.rows < 2:
        parser.error(f"--rows must be at least 2 for a variance, got {args.rows}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a file")
    return args


def trained_sae(args: argparse.Namespace, data: ToySuperposition) -> SparseAutoencoder:
    """The demo's SAE, from a checkpoint or trained here: the same weights on every rank."""
    sae = SparseAutoencoder(args.d_model, args.d_sae, args.seed)
    if args.checkpoint is not None:
        sae.load_state_dict(torch.load(args.checkpoint, weights_only=True))
        return sae
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    for step in range(args.steps):
        source = data.batch(step, args.batch_size)
        learned, decoded = sae(source)
        loss = l2_reconstruction(decoded, source) + args.l1_coefficient * l1_absolute(learned)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalise_decoder()
    return sae


def chunk_sizes(rows: int, largest: int) -> list[int]:
    """Uneven chunk sizes that add up to ``rows``, so the ranks' shards differ in size."""
    pattern = (largest, max(1, 3 * largest // 5), largest, max(1, largest // 7))
    sizes: list[int] = []
    while sum(sizes) < rows:
        sizes.append(min(pattern[len(sizes) % len(pattern)], rows - sum(sizes)))
    return sizes


def empty_metrics(d_model: int, d_sae: int) -> dict:
    return {
        "mse": StreamingMean.empty(),
        "fvu": StreamingFVU.empty((d_model,)),
        "l0": StreamingMean.empty(),
        "l1": StreamingMean.empty(),
        "density": StreamingMean.empty((d_sae,)),
        "decoded_sq": StreamingMean.empty(),
        "inner": StreamingMean.empty(),
        "cosine": StreamingMean.empty(),
    }


@torch.no_grad()
def update_metrics(metrics: dict, learned: torch.Tensor, decoded: torch.Tensor, source):
    """Add one chunk of rows to every accumulator; return the new dict."""
    nonzero = source.norm(dim=-1) > 0  # cos(x̂, 0) is undefined: those rows are masked out
    cosine = torch.nn.functional.cosine_similarity(decoded, source, dim=-1)
    return {
        "mse": metrics["mse"].update(l2_reconstruction(decoded, source, reduce="none")),
        "fvu": metrics["fvu"].update(decoded, source),
        "l0": metrics["l0"].update(l0_norm(learned, reduce="none")),
        "l1": metrics["l1"].update(l1_absolute(learned, reduce="none")),
        "density": metrics["density"].update(learned > 0),
        "decoded_sq": metrics["decoded_sq"].update(decoded.square().sum(-1)),
        "inner": metrics["inner"].update((decoded * source).sum(-1)),
        "cosine": metrics["cosine"].update(cosine, mask=nonzero),
    }


def evaluate(sae, data, args, *, rank: int = 0, world_size: int = 1) -> dict:
    """Stream this rank's chunks of held-out rows, then combine every rank's in one collective."""
    metrics = empty_metrics(args.d_model, args.d_sae)
    sizes = chunk_sizes(args.rows, args.chunk)
    with torch.no_grad():
        for index in range(rank, len(sizes), world_size):  # this rank's shard
            source = data.batch(HELD_OUT_OFFSET + index, sizes[index])
            learned, decoded = sae(source)
            metrics = update_metrics(metrics, learned, decoded, source)
    # Every rank makes this call once, with the same tree: one all_gather for all of it.
    return all_reduce(metrics)


def summarise(metrics: dict, d_model: int) -> dict:
    """The reported numbers (Python floats and ints) from the combined accumulators."""
    density = metrics["density"].compute()
    mse = metrics["mse"].compute().item()
    return {
        "rows": metrics["mse"].count.item(),
        "mse": mse,
        "mse_saelens": mse * d_model,
        "fvu": metrics["fvu"].compute().item(),
        "explained_variance": metrics["fvu"].explained_variance().item(),
        "l0": metrics["l0"].compute().item(),
        "l1": metrics["l1"].compute().item(),
        "dead_latents": int((density == 0).sum()),
        "dead_fraction": (density == 0).double().mean().item(),
        "relative_reconstruction_bias": (
            metrics["decoded_sq"].compute() / metrics["inner"].compute()
        ).item(),
        "cosine_similarity": metrics["cosine"].compute().item(),
        "cosine_rows": metrics["cosine"].count.item(),
        "density": density.tolist(),
    }


LABELS = {
    "rows": "held-out rows",
    "mse": "MSE, mean over features (ours)",
    "mse_saelens": "MSE, sum over features (SAELens)",
    "fvu": "FVU",
    "explained_variance": "explained variance (1 - FVU)",
    "l0": "L0 (active latents per row)",
    "l1": "L1 (sum of |latents| per row)",
    "dead_latents": "dead latents (never fired)",
    "dead_fraction": "dead fraction",
    "relative_reconstruction_bias": "relative reconstruction bias",
    "cosine_similarity": "cosine similarity (rows x != 0)",
}


def metric_lines(result: dict) -> list[str]:
    """One line per metric: the name, then the value to 10 significant digits."""
    return [f"{label:<34}{result[key]:.10g}" for key, label in LABELS.items()]


def plot_density(density: list[float], rows: int, bins: int, path: Path) -> None:
    """Histogram of log10 firing frequency per latent; dead latents as a separate red bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = [math.log10(f) for f in density if f > 0]
    dead = len(density) - len(alive)
    low = math.floor(math.log10(1 / rows))  # one firing in all held-out rows
    edges = torch.linspace(low, 0, bins + 1).tolist()
    figure, axis = plt.subplots(figsize=(7, 3.8))
    axis.hist(alive, bins=edges, color="tab:blue", label=f"alive ({len(alive)})")
    width = (edges[1] - edges[0]) * 1.5
    axis.bar([low - 2 * width], [dead], width=width, color="tab:red", label=f"dead ({dead})")
    axis.annotate("dead", (low - 2 * width, dead), ha="center", va="bottom", color="tab:red")
    axis.axvline(math.log10(1 / rows), color="grey", linestyle=":", label=f"1 firing in {rows}")
    axis.set_xlabel(f"log10 firing frequency over {rows} held-out rows (dead: never fired)")
    axis.set_ylabel("latents")
    axis.set_title(f"Feature density of {len(density)} SAE latents")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    try:
        rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
        # One thread: the same float results on every rank and in one process, whatever the
        # launcher sets OMP_NUM_THREADS to.
        torch.set_num_threads(1)
        start = time.perf_counter()
        data = ToySuperposition(args)
        sae = trained_sae(args, data)
        metrics = evaluate(sae, data, args, rank=rank, world_size=world_size)
        result = summarise(metrics, args.d_model)
        seconds = time.perf_counter() - start
        if rank == 0:
            sizes = chunk_sizes(args.rows, args.chunk)
            shards = [sum(sizes[r::world_size]) for r in range(world_size)]
            print(
                f"world_size={world_size} rows per rank={shards} d_model={args.d_model} "
                f"d_sae={args.d_sae} ({seconds:.1f}s for the SAE and the evaluation)"
            )
            print("\n".join(metric_lines(result)))
            args.out_dir.mkdir(parents=True, exist_ok=True)
            plot_path = args.out_dir / "feature_density.png"
            plot_density(result["density"], result["rows"], args.bins, plot_path)
            (args.out_dir / "evaluate_metrics.json").write_text(json.dumps(result, indent=1))
            print(f"Feature-density histogram: {plot_path}")
        return result
    finally:
        # Nothing here holds process-group resources (no DDP model, no pending work).
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
