"""Train a toy sparse autoencoder with sae_losses: eager, compiled, and under 2-process DDP.

    python examples/demo.py                 # what `make demo` runs
    python examples/demo.py --steps 600 --seed 1 --out-dir out

The data is a toy model of superposition: `n_features` sparse ground-truth features, each a
random unit direction in a `d_model`-dimensional space with fewer dimensions than features. An SAE
with `d_sae` latents is trained to reconstruct the mixtures with

    loss = l2_reconstruction(decoded, source) + l1_coefficient * l1_absolute(learned)

and its per-epoch L2, L1 and total are streamed with StreamingMean. The same training runs three
times: eager, with the loss step under torch.compile(fullgraph=True), and on 2 processes (gloo,
launched with torchrun) where all_reduce syncs the streamed metrics. At the end the SAE's decoder
directions are matched against the true features: a feature is recovered when some decoder
direction has cosine similarity above 0.9 with it. Each SAE is also evaluated on held-out rows:
its FVU (StreamingFVU), L0 (l0_norm) and dead fraction (the share of latents that never fire,
from StreamingMean.empty((d_sae,)).update(learned > 0)) go into the summary table.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sae_losses import (
    StreamingFVU,
    StreamingMean,
    all_reduce,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
)

METRICS = ("l2", "l1", "total")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=3000, help="training steps per run")
    parser.add_argument("--epochs", type=positive_int, default=10, help="metric reports per run")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="rows per step")
    parser.add_argument("--d-model", type=positive_int, default=32, help="activation dimension")
    parser.add_argument("--n-features", type=positive_int, default=64, help="true features")
    parser.add_argument("--d-sae", type=positive_int, default=128, help="SAE latents")
    parser.add_argument("--sparsity", type=positive_float, default=0.03, help="P(feature on)")
    parser.add_argument("--l1-coefficient", type=positive_float, default=3e-3)
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", type=Path, default=Path("out"), help="plot and summary go here"
    )
    parser.add_argument("--skip-ddp", action="store_true", help="do not run the 2-process part")
    parser.add_argument("--ddp-rank-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs > args.steps:
        parser.error(f"--epochs ({args.epochs}) cannot exceed --steps ({args.steps})")
    if args.batch_size % 2:
        parser.error(
            f"--batch-size must be even, to split evenly over 2 ranks; got {args.batch_size}"
        )
    if args.d_model >= args.n_features:
        parser.error("a toy model of superposition needs --d-model < --n-features")
    if not args.sparsity < 1:
        parser.error(f"--sparsity is a probability below 1, got {args.sparsity}")
    return args


class ToySuperposition:
    """Sparse features in superposition: rows of `features @ directions`, features mostly 0."""

    def __init__(self, args: argparse.Namespace) -> None:
        generator = torch.Generator().manual_seed(args.seed)
        directions = torch.randn(args.n_features, args.d_model, generator=generator)
        self.directions = directions / directions.norm(dim=-1, keepdim=True)
        self.sparsity = args.sparsity
        self.seed = args.seed

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The same rows for a given step on every process, so runs can be compared."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n_features = self.directions.shape[0]
        on = torch.rand(batch_size, n_features, generator=generator) < self.sparsity
        magnitudes = torch.rand(batch_size, n_features, generator=generator)
        return (on * magnitudes) @ self.directions


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, d_model: int, d_sae: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed + 1)
        decoder = torch.randn(d_sae, d_model, generator=generator)
        self.w_dec = torch.nn.Parameter(decoder / decoder.norm(dim=-1, keepdim=True))
        self.w_enc = torch.nn.Parameter(self.w_dec.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))

    def forward(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        learned = torch.relu((source - self.b_dec) @ self.w_enc + self.b_enc)
        return learned, learned @ self.w_dec + self.b_dec

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.w_dec /= self.w_dec.norm(dim=-1, keepdim=True)


def loss_step(sae, metrics, source, l1_coefficient):
    """The loss and the updated streamed metrics for one batch (compiled in the second run)."""
    learned, decoded = sae(source)
    l2 = l2_reconstruction(decoded, source, reduce="none")
    l1 = l1_absolute(learned, reduce="none")
    total = l2 + l1_coefficient * l1
    metrics = {
        "l2": metrics["l2"].update(l2),
        "l1": metrics["l1"].update(l1),
        "total": metrics["total"].update(total),
    }
    return total.mean(), metrics


def empty_metrics() -> dict[str, StreamingMean]:
    return {name: StreamingMean.empty() for name in METRICS}


def train(args, data, *, compiled=False, rank=0, world_size=1, log=print):
    """Train one SAE; return it, its per-epoch metric means and the wall time in seconds."""
    sae = SparseAutoencoder(args.d_model, args.d_sae, args.seed)
    model = torch.nn.parallel.DistributedDataParallel(sae) if world_size > 1 else sae
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    step_fn = torch.compile(loss_step, fullgraph=True) if compiled else loss_step
    shard = args.batch_size // world_size
    history = {name: [] for name in METRICS}
    steps_per_epoch = args.steps // args.epochs
    metrics = empty_metrics()
    start = time.perf_counter()
    for step in range(args.steps):
        source = data.batch(step, args.batch_size)[rank * shard : (rank + 1) * shard]
        loss, metrics = step_fn(model, metrics, source, args.l1_coefficient)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sae.normalise_decoder()
        if (step + 1) % steps_per_epoch == 0 and len(history["l2"]) < args.epochs:
            synced = all_reduce(metrics)  # every rank calls this at the same steps
            for name in METRICS:
                history[name].append(synced[name].compute().item())
            epoch = len(history["l2"])
            log(
                f"  epoch {epoch:>2}/{args.epochs}  step {step + 1:>5}  "
                f"l2 {history['l2'][-1]:.5f}  l1 {history['l1'][-1]:.4f}  "
                f"total {history['total'][-1]:.5f}"
            )
            metrics = empty_metrics()
    return sae, history, time.perf_counter() - start


def evaluation_batches(args, data):
    return [data.batch(10_000_000 + i, args.batch_size) for i in range(4)]


@torch.no_grad()
def evaluate(sae, batches, l1_coefficient, rank=0, world_size=1):
    """Stream L2, L1, total, FVU, L0 and feature density over this rank's share of the
    evaluation rows, then sync them all in one all_reduce."""
    d_sae, d_model = sae.w_dec.shape
    metrics = {
        **empty_metrics(),
        "fvu": StreamingFVU.empty((d_model,)),
        "l0": StreamingMean.empty(),
        "density": StreamingMean.empty((d_sae,)),  # each latent's firing frequency
    }
    for source in batches:
        rows = source[rank::world_size]
        losses = {name: metrics[name] for name in METRICS}
        _, losses = loss_step(sae, losses, rows, l1_coefficient)
        learned, decoded = sae(rows)
        metrics = {
            **losses,
            "fvu": metrics["fvu"].update(decoded, rows),
            "l0": metrics["l0"].update(l0_norm(learned, reduce="none")),
            "density": metrics["density"].update(learned > 0),
        }
    return all_reduce(metrics)


def quality(synced: dict) -> dict[str, float]:
    """FVU, L0 and the fraction of latents that never fired, from `evaluate`'s result."""
    return {
        "fvu": synced["fvu"].compute().item(),
        "l0": synced["l0"].compute().item(),
        "dead_fraction": (synced["density"].compute() == 0).double().mean().item(),
    }


def recovered_features(sae: SparseAutoencoder, data: ToySuperposition, threshold=0.9) -> int:
    decoder = sae.w_dec.detach()
    cosine = data.directions @ (decoder / decoder.norm(dim=-1, keepdim=True)).T
    return int((cosine.max(dim=1).values > threshold).sum())


def run_ddp_rank(args: argparse.Namespace) -> None:
    """One torchrun rank: train with DDP, evaluate with synced metrics, write rank 0's results."""
    # Import before init: torch.distributed.nn binds group.WORLD as default arguments, so imported
    # later (DDP and Adam do) it keeps the group's gloo threads alive into interpreter shutdown.
    import torch.distributed.nn

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = ToySuperposition(args)
    log = print if rank == 0 else (lambda *_: None)
    sae, history, seconds = train(args, data, rank=rank, world_size=world_size, log=log)
    synced = evaluate(sae, evaluation_batches(args, data), args.l1_coefficient, rank, world_size)
    if rank == 0:
        torch.save(sae.state_dict(), args.out_dir / "ddp_sae.pt")
        result = {
            "history": history,
            "seconds": seconds,
            "eval": {name: synced[name].compute().item() for name in METRICS},
            "eval_rows": synced["l2"].count.item(),
            "quality": quality(synced),  # FVU, L0 and dead fraction, synced over the 2 ranks
        }
        (args.out_dir / "ddp_result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def launch_ddp(args: argparse.Namespace, argv: list[str]) -> dict:
    # torchrun, torch's own launcher; --standalone picks a free local port for the rendezvous.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += [__file__, *argv, "--ddp-rank-run", "--out-dir", str(args.out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(command, check=True, env=env)
    return json.loads((args.out_dir / "ddp_result.json").read_text())


def plot(runs: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, name in zip(axes, METRICS, strict=True):
        # The runs see the same data from the same start, so their curves overlap: line styles
        # keep each one visible.
        for (run, history), style in zip(runs.items(), ("-", "--", ":"), strict=False):
            epochs = range(1, len(history[name]) + 1)
            axis.plot(
                epochs, history[name], style, marker="o", markersize=3, linewidth=2, label=run
            )
        axis.set_title(
            {"l2": "L2 reconstruction", "l1": "L1 absolute", "total": "total loss"}[name]
        )
        axis.set_xlabel("epoch")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("Toy SAE trained with sae_losses: streamed per-epoch means")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.ddp_rank_run:
        run_ddp_rank(args)
        return {}

    data = ToySuperposition(args)
    print(
        f"Toy superposition: {args.n_features} sparse features in {args.d_model} dimensions; "
        f"SAE with {args.d_sae} latents; {args.steps} steps of {args.batch_size} rows."
    )
    print("Run 1/3: eager")
    eager_sae, eager_history, eager_seconds = train(args, data)
    print("Run 2/3: loss step under torch.compile(fullgraph=True) (the first steps compile)")
    compiled_sae, compiled_history, compiled_seconds = train(args, data, compiled=True)
    runs = {"eager": eager_history, "compiled": compiled_history}

    eval_batches = evaluation_batches(args, data)
    summary = {
        "eager": {
            "seconds": eager_seconds,
            "recovered": recovered_features(eager_sae, data),
            "history": eager_history,
            **quality(evaluate(eager_sae, eval_batches, args.l1_coefficient)),
        },
        "compiled": {
            "seconds": compiled_seconds,
            "recovered": recovered_features(compiled_sae, data),
            "history": compiled_history,
            **quality(evaluate(compiled_sae, eval_batches, args.l1_coefficient)),
        },
    }
    if not args.skip_ddp:
        print("Run 3/3: 2 processes with DDP over gloo, launched with torchrun")
        ddp = launch_ddp(args, [a for a in argv if a != "--skip-ddp"])
        ddp_sae = SparseAutoencoder(args.d_model, args.d_sae, args.seed)
        ddp_sae.load_state_dict(torch.load(args.out_dir / "ddp_sae.pt", weights_only=True))
        one_process = evaluate(ddp_sae, eval_batches, args.l1_coefficient)
        runs["ddp (2 ranks)"] = ddp["history"]
        summary["ddp"] = {
            "seconds": ddp["seconds"],
            "recovered": recovered_features(ddp_sae, data),
            "history": ddp["history"],
            "synced_eval": ddp["eval"],
            "one_process_eval": {name: one_process[name].compute().item() for name in METRICS},
            "eval_rows": ddp["eval_rows"],
            **ddp["quality"],  # FVU, L0, dead fraction, streamed on the 2 ranks and synced
        }

    plot_path = args.out_dir / "demo_losses.png"
    plot(runs, plot_path)
    summary["plot"] = str(plot_path)
    print_summary(args, summary)
    (args.out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def print_summary(args: argparse.Namespace, summary: dict) -> None:
    print(
        f"\nSummary ({args.n_features} true features; recovered = max cosine > 0.9; "
        f"FVU, L0 and dead latent fraction on {4 * args.batch_size} held-out rows)"
    )
    print(
        f"{'run':<16}{'wall time':>11}{'first L2':>11}{'last L2':>11}{'last L1':>9}"
        f"{'last total':>12}{'recovered':>11}{'FVU':>9}{'L0':>7}{'dead':>7}"
    )
    for run in ("eager", "compiled", "ddp"):
        if run not in summary:
            continue
        result, history = summary[run], summary[run]["history"]
        print(
            f"{run:<16}{result['seconds']:>10.1f}s{history['l2'][0]:>11.5f}{history['l2'][-1]:>11.5f}"
            f"{history['l1'][-1]:>9.4f}{history['total'][-1]:>12.5f}"
            f"{result['recovered']:>6}/{args.n_features}"
            f"{result['fvu']:>9.4f}{result['l0']:>7.2f}{result['dead_fraction']:>7.3f}"
        )
    print("(the compiled run's wall time includes its one-time compile)")
    if "ddp" in summary:
        ddp = summary["ddp"]
        print(
            f"\nDDP model on {ddp['eval_rows']} held-out rows, metrics synced with all_reduce "
            "versus the same model evaluated in one process:"
        )
        for name in METRICS:
            synced, single = ddp["synced_eval"][name], ddp["one_process_eval"][name]
            print(
                f"  {name:<6} synced {synced:.12f}   one process {single:.12f}   "
                f"difference {abs(synced - single):.1e}"
            )
    print(f"\nPlot of the loss curves: {summary['plot']}")


if __name__ == "__main__":
    main()
