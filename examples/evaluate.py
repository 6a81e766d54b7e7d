"""Evaluate an SAE spliced into a language model: SAEBench's core metrics, streamed, one collective.

    python examples/evaluate.py                             # one process
    torchrun --nproc-per-node 2 examples/evaluate.py        # two processes, gloo: same numbers

A tiny transformer (examples/tiny_lm.py) is trained here for a few seconds on a synthetic
language, then an SAE on its residual stream at the hook point after its block. Both train in
one thread from fixed seeds, so every rank holds bit-identical weights. The held-out sequences
come in chunks of uneven sizes; rank r evaluates chunks r, r + world_size, ..., so the ranks see
different numbers of tokens. Each chunk runs the model three times: clean, with the SAE's
reconstruction spliced in at the hook, and with the hook zero-ablated.

The token rule: BOS is left out everywhere. The SAE is spliced, and the hook ablated, at every
other position; the reconstruction metrics are over those positions' residuals; the CE and KL
terms score the predictions made from them (of tokens 2..n): one token set for all five terms.
Each rank streams its chunks into one dict of accumulators:

    mse, l0, l1, cosine, l2_ratio   StreamingMean of the per-row term (reduce="none")
    fvu                             StreamingFVU: about the mean of every held-out residual
    density                         StreamingMean.empty((d_sae,)).update(latents != 0)
    bias                            StreamingReconstructionBias: E|x̂|² / E<x, x̂>
    splice                          StreamingSpliceScores: the CE-loss and KL scores

and one all_reduce call combines the whole dict across ranks. Rank 0 prints one line per metric
(10 significant digits), writes them in full precision to evaluate_metrics.json, and plots the
log10 firing frequency of every latent to feature_density.png, dead latents as a separate bar.
docs/evaluation.md gives each number's definition here and in SAEBench.
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
from demo import SparseAutoencoder, positive_float, positive_int
from tiny_lm import SyntheticLanguage, TinyTransformer, train_language_model

from sae_losses import (
    StreamingFVU,
    StreamingMean,
    StreamingReconstructionBias,
    StreamingSpliceScores,
    all_reduce,
    cosine_similarity,
    l0_norm,
    l1_absolute,
    l2_norm_ratio,
    l2_reconstruction,
)

HELD_OUT_OFFSET = 20_000_000  # batch indices of held-out sequences: disjoint from training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=positive_int, default=192, help="held-out sequences")
    parser.add_argument("--chunk", type=positive_int, default=32, help="largest eval chunk")
    parser.add_argument("--length", type=positive_int, default=24, help="tokens per sequence")
    parser.add_argument("--vocab", type=positive_int, default=16, help="synthetic vocabulary")
    parser.add_argument("--d-model", type=positive_int, default=32, help="residual width")
    parser.add_argument("--d-sae", type=positive_int, default=128, help="SAE latents")
    parser.add_argument("--lm-steps", type=positive_int, default=300, help="LM training steps")
    parser.add_argument("--sae-steps", type=positive_int, default=600, help="SAE training steps")
    parser.add_argument("--l1-coefficient", type=positive_float, default=5e-2)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", type=positive_int, default=30, help="histogram bins")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("out"), help="plot and metrics go here"
    )
    args = parser.parse_args(argv)
    if args.length < 4:
        parser.error(f"--length must be at least 4 (BOS, context, predictions), got {args.length}")
    if args.vocab < 3:
        parser.error(f"--vocab must be at least 3 (BOS and two tokens), got {args.vocab}")
    return args


def residuals(model: TinyTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The hook point's activations at every position but BOS, as rows: ``(tokens, d_model)``."""
    return model.residual(tokens)[:, 1:].flatten(0, 1)


def trained_models(
    args: argparse.Namespace,
) -> tuple[SyntheticLanguage, TinyTransformer, SparseAutoencoder]:
    """The language, the language model and the SAE: the same weights on every rank."""
    language = SyntheticLanguage(args.vocab, args.seed)
    model = train_language_model(
        language, d_model=args.d_model, length=args.length, steps=args.lm_steps, seed=args.seed
    )
    sae = SparseAutoencoder(args.d_model, args.d_sae, args.seed)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    for step in range(args.sae_steps):
        with torch.no_grad():
            source = residuals(model, language.batch(10_000_000 + step, 16, args.length))
        learned, decoded = sae(source)
        loss = l2_reconstruction(decoded, source) + args.l1_coefficient * l1_absolute(learned)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalise_decoder()
    return language, model, sae


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
        "cosine": StreamingMean.empty(),
        "l2_ratio": StreamingMean.empty(),
        "bias": StreamingReconstructionBias.empty(),
        "splice": StreamingSpliceScores.empty(),
    }


def three_runs(model, sae, tokens):
    """Clean, spliced and zero-ablated logits of the scored predictions, and their targets."""
    resid = model.residual(tokens)
    source = resid[:, 1:].flatten(0, 1)
    learned, decoded = sae(source)
    spliced, ablated = resid.clone(), resid.clone()
    spliced[:, 1:] = decoded.reshape(resid[:, 1:].shape)
    ablated[:, 1:] = 0
    # Predictions made from positions 1 .. n-1 (not BOS) of the tokens 2 .. n.
    logits = [model.logits(r)[:, 1:-1].flatten(0, 1) for r in (resid, spliced, ablated)]
    return source, learned, decoded, logits, tokens[:, 2:].flatten()


@torch.no_grad()
def update_metrics(metrics: dict, model, sae, tokens: torch.Tensor) -> dict:
    """Add one chunk of sequences to every accumulator; return the new dict."""
    source, learned, decoded, (clean, spliced, ablated), targets = three_runs(model, sae, tokens)
    nonzero = source.norm(dim=-1) > 0  # cos(x̂, 0) and |x̂| / 0 are undefined: masked out
    return {
        "mse": metrics["mse"].update(l2_reconstruction(decoded, source, reduce="none")),
        "fvu": metrics["fvu"].update(decoded, source),
        "l0": metrics["l0"].update(l0_norm(learned, reduce="none")),
        "l1": metrics["l1"].update(l1_absolute(learned, reduce="none")),
        "density": metrics["density"].update(learned != 0),
        "cosine": metrics["cosine"].update(
            cosine_similarity(decoded, source, reduce="none", mask=nonzero), mask=nonzero
        ),
        "l2_ratio": metrics["l2_ratio"].update(
            l2_norm_ratio(decoded, source, reduce="none", mask=nonzero), mask=nonzero
        ),
        "bias": metrics["bias"].update(decoded, source),
        "splice": metrics["splice"].update(clean, spliced, ablated, targets),
    }


def evaluate(language, model, sae, args, *, rank: int = 0, world_size: int = 1) -> dict:
    """Stream this rank's chunks of held-out sequences, then combine every rank's, once."""
    metrics = empty_metrics(args.d_model, args.d_sae)
    sizes = chunk_sizes(args.sequences, args.chunk)
    for index in range(rank, len(sizes), world_size):  # this rank's shard
        tokens = language.batch(HELD_OUT_OFFSET + index, sizes[index], args.length)
        metrics = update_metrics(metrics, model, sae, tokens)
    # Every rank makes this call once, with the same tree: one all_gather for all of it.
    return all_reduce(metrics)


def summarise(metrics: dict, d_model: int) -> dict:
    """The reported numbers (Python floats and ints) from the combined accumulators."""
    density = metrics["density"].compute()
    mse = metrics["mse"].compute().item()
    splice = {key: value.item() for key, value in metrics["splice"].compute().items()}
    return {
        "tokens": metrics["mse"].count.item(),
        "mse": mse,
        "mse_saelens": mse * d_model,
        "fvu": metrics["fvu"].compute().item(),
        "explained_variance": metrics["fvu"].explained_variance().item(),
        "cosine_similarity": metrics["cosine"].compute().item(),
        "l2_norm_ratio": metrics["l2_ratio"].compute().item(),
        "relative_reconstruction_bias": metrics["bias"].compute().item(),
        "l0": metrics["l0"].compute().item(),
        "l1": metrics["l1"].compute().item(),
        "dead_latents": int((density == 0).sum()),
        "frac_alive": (density > 0).double().mean().item(),
        "freq_over_1_percent": (density > 0.01).double().mean().item(),
        "freq_over_10_percent": (density > 0.1).double().mean().item(),
        "scored_predictions": metrics["splice"].count.item(),
        **splice,
        "density": density.tolist(),
    }


LABELS = {
    "tokens": "held-out tokens (BOS left out)",
    "mse": "MSE, mean over features (ours)",
    "mse_saelens": "MSE, sum over features (SAELens)",
    "fvu": "FVU",
    "explained_variance": "explained variance (1 - FVU)",
    "cosine_similarity": "cosine similarity",
    "l2_norm_ratio": "L2 norm ratio |x_hat| / |x|",
    "relative_reconstruction_bias": "relative reconstruction bias",
    "l0": "L0 (active latents per token)",
    "l1": "L1 (sum of |latents| per token)",
    "dead_latents": "dead latents (never fired)",
    "frac_alive": "frac_alive",
    "freq_over_1_percent": "latents firing on > 1% of tokens",
    "freq_over_10_percent": "latents firing on > 10% of tokens",
    "scored_predictions": "scored predictions",
    "ce_clean": "CE, clean",
    "ce_spliced": "CE, SAE spliced in",
    "ce_ablated": "CE, zero-ablated",
    "ce_loss_score": "CE loss score",
    "kl_spliced": "KL, SAE spliced in",
    "kl_ablated": "KL, zero-ablated",
    "kl_div_score": "KL divergence score",
}


def metric_lines(result: dict) -> list[str]:
    """One line per metric: the name, then the value to 10 significant digits."""
    return [f"{label:<36}{result[key]:.10g}" for key, label in LABELS.items()]


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
        language, model, sae = trained_models(args)
        metrics = evaluate(language, model, sae, args, rank=rank, world_size=world_size)
        result = summarise(metrics, args.d_model)
        seconds = time.perf_counter() - start
        if rank == 0:
            sizes = chunk_sizes(args.sequences, args.chunk)
            shards = [sum(sizes[r::world_size]) for r in range(world_size)]
            print(
                f"world_size={world_size} sequences per rank={shards} d_model={args.d_model} "
                f"d_sae={args.d_sae} ({seconds:.1f}s to train the LM and the SAE and evaluate)"
            )
            print("\n".join(metric_lines(result)))
            args.out_dir.mkdir(parents=True, exist_ok=True)
            plot_path = args.out_dir / "feature_density.png"
            plot_density(result["density"], result["tokens"], args.bins, plot_path)
            (args.out_dir / "evaluate_metrics.json").write_text(json.dumps(result, indent=1))
            print(f"Feature-density histogram: {plot_path}")
        return result
    finally:
        # Nothing here holds process-group resources (no DDP model, no pending work).
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
