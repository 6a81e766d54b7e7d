"""Benchmarks of the training-loss family: masks, the sparsity terms eager and fused, a size sweep.

    python benchmarks/bench_family.py            # the full tables (a few minutes on 2 CPU cores)
    python benchmarks/bench_family.py --quick    # tiny sizes, to check that it runs (CI)

Ratios are measured side by side in one process, as in bench.py (see _timing.py).
"""

import argparse
import random

import torch
from _timing import Timer, goals, table
from bench import mse_loss_l2, seed_l1, seed_l2

from sae_losses import (
    fused_jumprelu_l0,
    fused_l0_norm,
    fused_l1_absolute,
    fused_l2_reconstruction,
    fused_lp_sparsity,
    fused_tanh_sparsity,
    jumprelu_l0,
    l0_norm,
    l1_absolute,
    l2_reconstruction,
    lp_sparsity,
    tanh_sparsity,
)

FLOOR = "read floor: z.sum()"


def masked(timer: Timer, shape: tuple[int, int], device: torch.device) -> list[str]:
    decoded, source = torch.randn(shape, device=device), torch.randn(shape, device=device)
    mask = torch.rand(shape[0], device=device) > 0.1
    weights = torch.rand(shape[0], device=device)
    results = timer.medians(
        {
            "l2_reconstruction": lambda: l2_reconstruction(decoded, source),
            "l2_reconstruction, bool mask": lambda: l2_reconstruction(decoded, source, mask=mask),
            "l2_reconstruction, row weights": lambda: l2_reconstruction(
                decoded, source, mask=weights
            ),
            "l1_absolute": lambda: l1_absolute(decoded),
            "l1_absolute, bool mask": lambda: l1_absolute(decoded, mask=mask),
        }
    )
    lines = table(f"Masked calls on {shape}, eager forward", results, None, None)
    lines.append("")
    for op in ("l2_reconstruction", "l1_absolute"):
        ratio = results[f"{op}, bool mask"] / results[op]
        lines.append(f"- {op}: masked / unmasked = {ratio:.2f}x (goal <= 1.1)")
    return lines


def sparsity_terms(timer: Timer, shape: tuple[int, int], device: torch.device) -> list[str]:
    learned = torch.randn(shape, device=device)
    weight = torch.rand(shape[1], device=device)
    threshold = torch.rand(shape[1], device=device)
    naive_l0 = torch.compile(lambda z: (z.abs() > 0).sum(-1, dtype=z.dtype).mean(0), fullgraph=True)
    results = timer.medians(
        {
            FLOOR: lambda: learned.sum(),
            "l1_absolute": lambda: l1_absolute(learned),
            "l1_absolute(weight=)": lambda: l1_absolute(learned, weight=weight),
            "naive weighted L1 (z.abs() * w).sum(-1)": lambda: (
                (learned.abs() * weight).sum(-1).mean(0)
            ),
            "l0_norm": lambda: l0_norm(learned),
            "fused_l0_norm": lambda: fused_l0_norm(learned),
            "naive L0 (z != 0).sum(-1)": lambda: (learned != 0).float().sum(-1).mean(0),
            "naive L0, inductor": lambda: naive_l0(learned),
            "jumprelu_l0": lambda: jumprelu_l0(learned, threshold, bandwidth=1e-3),
            "fused_jumprelu_l0": lambda: fused_jumprelu_l0(learned, threshold, bandwidth=1e-3),
        }
    )
    lines = table(f"Sparsity terms on {shape}, forward", results, FLOOR, None)
    wanted = [("l0_norm", 2.0), ("jumprelu_l0", 2.0), ("fused_l0_norm", 1.3)]
    return lines + goals(results, FLOOR, [*wanted, ("fused_jumprelu_l0", 1.3)])


def smooth_penalties(timer: Timer, shape: tuple[int, int], device: torch.device) -> list[str]:
    """Lp and tanh have eager kernels (in place on each row block); the fused twins compile."""
    learned = torch.randn(shape, device=device)
    weight = torch.rand(shape[1], device=device) + 0.5
    tanh_alone = torch.compile(lambda z: z.tanh().sum(-1), fullgraph=True)
    bound = "bound: inductor's tanh alone, z.tanh().sum(-1)"
    results = timer.medians(
        {
            FLOOR: lambda: learned.sum(),
            bound: lambda: tanh_alone(learned),
            "lp_sparsity(p=0.5, weight=)": lambda: lp_sparsity(learned, p=0.5, weight=weight),
            "fused_lp_sparsity(p=0.5, weight=)": lambda: fused_lp_sparsity(
                learned, p=0.5, weight=weight
            ),
            "tanh_sparsity(weight=)": lambda: tanh_sparsity(learned, scale=4.0, weight=weight),
            "fused_tanh_sparsity(weight=)": lambda: fused_tanh_sparsity(
                learned, scale=4.0, weight=weight
            ),
        }
    )
    lines = table(f"Lp and tanh penalties on {shape}, forward", results, FLOOR, None)
    return lines + goals(
        results,
        FLOOR,
        [
            ("fused_lp_sparsity(p=0.5, weight=)", 1.3),
            ("fused_tanh_sparsity(weight=)", 1.3),
            (bound, 1.3),
        ],
    )


def sweep(rounds: int, sizes: list[tuple[int, int]], device: torch.device) -> list[str]:
    naive_l2 = torch.compile(seed_l2, fullgraph=True, dynamic=False)
    naive_l1 = torch.compile(seed_l1, fullgraph=True, dynamic=False)
    header = (
        "| size | read floor | F.mse_loss | seed | inductor | eager | fused | eager / mse_loss |"
    )
    lines = ["\n### Size sweep, L2 forward (ratios to the read floor)", "", header]
    lines.append("|---|---|---|---|---|---|---|---|")
    l1_lines = ["\n### Size sweep, L1 forward (ratios to the read floor)", ""]
    l1_lines += [
        "| size | read floor | seed | inductor | eager | fused |",
        "|---|---|---|---|---|---|",
    ]
    for shape in sizes:
        elements = shape[0] * shape[1]
        timer = Timer(device, rounds, block=max(1, min(50, 2**22 // elements)))
        d, s = torch.randn(shape, device=device), torch.randn(shape, device=device)
        r = timer.medians(
            {
                "floor": lambda d=d, s=s: (d.sum(), s.sum()),
                "mse": lambda d=d, s=s: mse_loss_l2(d, s),
                "seed": lambda d=d, s=s: seed_l2(d, s),
                "inductor": lambda d=d, s=s: naive_l2(d, s),
                "eager": lambda d=d, s=s: l2_reconstruction(d, s),
                "fused": lambda d=d, s=s: fused_l2_reconstruction(d, s),
            }
        )
        cells = " | ".join(f"{r[k] / r['floor']:.2f}x" for k in ("mse", "seed", "inductor"))
        lines.append(
            f"| {shape[0]}x{shape[1]} | {r['floor'] * 1e3:.3f} ms | {cells} | "
            f"{r['eager'] / r['floor']:.2f}x | {r['fused'] / r['floor']:.2f}x | "
            f"{r['eager'] / r['mse']:.2f}x |"
        )
        r = timer.medians(
            {
                "floor": lambda d=d: d.sum(),
                "seed": lambda d=d: seed_l1(d),
                "inductor": lambda d=d: naive_l1(d),
                "eager": lambda d=d: l1_absolute(d),
                "fused": lambda d=d: fused_l1_absolute(d),
            }
        )
        cells = " | ".join(f"{r[k] / r['floor']:.2f}x" for k in ("seed", "inductor", "eager"))
        l1_lines.append(
            f"| {shape[0]}x{shape[1]} | {r['floor'] * 1e3:.3f} ms | {cells} | "
            f"{r['fused'] / r['floor']:.2f}x |"
        )
        del d, s
    return lines + l1_lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds, for CI")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    random.seed(0)
    torch.manual_seed(0)
    rounds = 2 if args.quick else 15
    timer = Timer(device, rounds, block=1 if args.quick else 20)
    slow_timer = Timer(device, rounds, block=1 if args.quick else 3)
    sizes = (
        [(64, 48), (128, 96)]
        if args.quick
        else [
            (256, 768),
            (1024, 768),
            (4096, 768),
            (16384, 2048),
            (32768, 4096),
        ]
    )
    lines = [
        f"device: {device}, torch {torch.__version__}, threads: {torch.get_num_threads()}, "
        f"rounds: {rounds}, float32"
    ]
    lines += masked(timer, (64, 48) if args.quick else (4096, 768), device)
    sparsity_shape = (64, 256) if args.quick else (4096, 16384)
    lines += sparsity_terms(slow_timer, sparsity_shape, device)
    lines += smooth_penalties(Timer(device, 2 if args.quick else 5, 1), sparsity_shape, device)
    lines += sweep(2 if args.quick else 9, sizes, device)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
