"""Benchmarks of the evaluation metrics: FVU speed, and FVU precision at large feature offsets.

    python benchmarks/bench_eval.py            # the full tables (about a minute on 2 CPU cores)
    python benchmarks/bench_eval.py --quick    # tiny sizes, to check that it runs (CI)

Speed: `fraction_of_variance_unexplained`, its fused twin and `StreamingFVU.update` against the
read floor of their two inputs, beside torchmetrics' `ExplainedVariance.update`; and the fused
twin at a DRAM-sized 16384 x 2048.

Precision: float32 sources whose features carry offsets (massive activations), streamed in
uneven chunks. Each method's relative error is measured against a float64 two-pass reference of
its own definition, so only numerical error is compared:
- `StreamingFVU` (Chan's update in float64);
- a one-pass float64 `Σx, Σx²` (SAELens's current calculator);
- torchmetrics `ExplainedVariance` (float32 sums), against the float64 value of its definition,
  which centres the numerator too;
- combining 3 ranks' states by sums about the reference point 0 (what one all_reduce of
  `count, count·mean, M2 + count·mean²` does), against the gather and Chan merge all_reduce uses.
"""

import argparse
import random
from collections.abc import Callable

import torch
from _timing import Timer, goals, table
from torch import Tensor

from sae_losses import (
    StreamingFVU,
    _rowops,
    fraction_of_variance_unexplained,
    fused_fraction_of_variance_unexplained,
)

FLOOR = "read floor: d.sum(); s.sum()"


TWO_PASS_BOUND = "bound: d - s into a cached block buffer, then s.sum(0)"
FLOAT64_BOUND = "bound: d and s copied into cached float64 block buffers"


def blocked(run_block: Callable[[slice], object], rows: int, block_rows: int) -> None:
    for start in range(0, rows, block_rows):
        run_block(slice(start, start + block_rows))


def aten_bounds(decoded: Tensor, source: Tensor) -> dict[str, Callable[[], object]]:
    """The least ATen work each eager FVU design needs, without any of its arithmetic.

    Any two-pass FVU writes the difference once (ATen has no subtract-square-sum that does not
    write) and reads ``source`` once more for the mean. StreamingFVU's float64 exactness needs
    both inputs in float64, in blocks of the size ``batch_state`` uses.
    """
    rows, features = decoded.shape
    two_pass = max(1, _rowops.BLOCK_ELEMENTS // features)
    wide = max(1, _rowops.BLOCK_ELEMENTS // 4 // features)
    buffer = decoded.new_empty(two_pass, features)
    d64, s64 = (decoded.new_empty(wide, features, dtype=torch.float64) for _ in range(2))

    def difference(b: slice) -> None:
        torch.sub(decoded[b], source[b], out=buffer[: decoded[b].shape[0]])

    def copies(b: slice) -> None:
        n = decoded[b].shape[0]
        d64[:n].copy_(decoded[b])
        s64[:n].copy_(source[b])

    return {
        TWO_PASS_BOUND: lambda: (blocked(difference, rows, two_pass), source.sum(0)),
        FLOAT64_BOUND: lambda: blocked(copies, rows, wide),
    }


def speed(timer: Timer, shape: tuple[int, int], device: torch.device) -> list[str]:
    import torchmetrics

    decoded, source = torch.randn(shape, device=device), torch.randn(shape, device=device)
    empty = StreamingFVU.empty(shape[1:], device=device)
    explained = torchmetrics.ExplainedVariance().to(device)
    results = timer.medians(
        {
            FLOOR: lambda: (decoded.sum(), source.sum()),
            **aten_bounds(decoded, source),
            "fraction_of_variance_unexplained": lambda: fraction_of_variance_unexplained(
                decoded, source
            ),
            "fused_fraction_of_variance_unexplained": lambda: (
                fused_fraction_of_variance_unexplained(decoded, source)
            ),
            "StreamingFVU.update": lambda: empty.update(decoded, source),
            "torchmetrics ExplainedVariance.update": lambda: explained.update(decoded, source),
        }
    )
    lines = table(f"FVU on {shape}, forward", results, FLOOR, None)
    wanted = [("fraction_of_variance_unexplained", 2.0), ("StreamingFVU.update", 4.0)]
    wanted += [(TWO_PASS_BOUND, 2.0), (FLOAT64_BOUND, 4.0)]  # can a goal be met at all
    return lines + goals(results, FLOOR, wanted)


def dram_speed(timer: Timer, shape: tuple[int, int], device: torch.device) -> list[str]:
    """The compiled path at a size that does not fit the caches."""
    decoded, source = torch.randn(shape, device=device), torch.randn(shape, device=device)
    bound = "bound: two passes over source, d.sum(); s.sum(); s.sum()"
    results = timer.medians(
        {
            FLOOR: lambda: (decoded.sum(), source.sum()),
            bound: lambda: (decoded.sum(), source.sum(), source.sum()),
            "fraction_of_variance_unexplained": lambda: fraction_of_variance_unexplained(
                decoded, source
            ),
            "fused_fraction_of_variance_unexplained": lambda: (
                fused_fraction_of_variance_unexplained(decoded, source)
            ),
        }
    )
    lines = table(f"FVU on {shape}, forward", results, FLOOR, None)
    wanted = [("fused_fraction_of_variance_unexplained", 1.3), (bound, 1.3)]
    return lines + goals(results, FLOOR, wanted)


def chunks(rows: int, features: int, offset: float, seed: int):
    """Uneven float32 chunks: 8 of the features sit near `offset`, the rest near 0."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.zeros(features, dtype=torch.float64)
    scale[:8] = 1 + 0.1 * torch.rand(8, generator=generator, dtype=torch.float64)
    done = 0
    while done < rows:
        size = min(rows - done, int(torch.randint(1, 4096, (1,), generator=generator)))
        x = offset * scale + torch.randn(size, features, generator=generator, dtype=torch.float64)
        x = x.float()
        yield x + 0.1 * torch.randn(size, features, generator=generator), x
        done += size


def reference(rows: int, features: int, offset: float, seed: int) -> dict[str, float]:
    """Float64 two-pass values of FVU and of torchmetrics' explained variance."""
    n, total, total_err = 0, torch.zeros(features, dtype=torch.float64), 0.0
    total_e = torch.zeros(features, dtype=torch.float64)
    for d, s in chunks(rows, features, offset, seed):
        n += s.shape[0]
        total += s.double().sum(0)
        total_e += (s.double() - d.double()).sum(0)
    mean, mean_e = total / n, total_e / n
    m2, m2_e = (
        torch.zeros(features, dtype=torch.float64),
        torch.zeros(features, dtype=torch.float64),
    )
    for d, s in chunks(rows, features, offset, seed):
        m2 += (s.double() - mean).square().sum(0)
        m2_e += (s.double() - d.double() - mean_e).square().sum(0)
        total_err += (d.double() - s.double()).square().sum().item()
    return {"fvu": total_err / m2.sum().item(), "tm": 1 - (m2_e / m2).mean().item()}


def precision(rows: int, offsets: list[float]) -> list[str]:
    import torchmetrics

    features = 64
    lines = [
        f"\n### FVU precision, {rows} rows x {features} features in uneven chunks",
        "",
        "relative error against the float64 two-pass value of each method's own definition",
        "",
        "| offset | StreamingFVU | one-pass float64 Σx, Σx² | 3 ranks: sums about 0 "
        "| 3 ranks: gather + Chan | torchmetrics ExplainedVariance |",
        "|---|---|---|---|---|---|",
    ]
    for offset in offsets:
        ref = reference(rows, features, offset, seed=1)
        streamed, ranks = StreamingFVU.empty((features,)), [StreamingFVU.empty((features,))] * 3
        n, s1, s2, err = 0, 0.0, 0.0, 0.0
        explained = torchmetrics.ExplainedVariance()
        for i, (d, s) in enumerate(chunks(rows, features, offset, seed=1)):
            streamed = streamed.update(d, s)
            ranks[i % 3] = ranks[i % 3].update(d, s)
            x = s.double()
            n, s1, s2 = n + x.shape[0], s1 + x.sum(0), s2 + x.square().sum(0)
            err += (d.double() - x).square().sum().item()
            explained.update(d, s)
        one_pass = err / (s2 - s1.square() / n).sum().item()
        # One all_reduce of count, count*mean and M2 + count*mean^2 about the point 0:
        count = sum(r.count.item() for r in ranks)
        first = sum(r.count * r.mean for r in ranks)
        second = sum(r.m2 + r.count * r.mean.square() for r in ranks)
        summed = sum(r.error for r in ranks) / (second - first.square() / count).sum()
        gathered = ranks[0].merge(ranks[1]).merge(ranks[2]).compute()
        cells = [
            abs(streamed.compute().item() / ref["fvu"] - 1),
            abs(one_pass / ref["fvu"] - 1),
            abs(summed.item() / ref["fvu"] - 1),
            abs(gathered.item() / ref["fvu"] - 1),
            abs(explained.compute().item() / ref["tm"] - 1),
        ]
        lines.append(f"| {offset:g} | " + " | ".join(f"{c:.1e}" for c in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds, for CI")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    random.seed(0)
    torch.manual_seed(0)
    rounds = 2 if args.quick else 25
    timer = Timer(device, rounds, block=1 if args.quick else 10)
    lines = [
        f"device: {device}, torch {torch.__version__}, threads: {torch.get_num_threads()}, "
        f"rounds: {rounds}, float32"
    ]
    lines += speed(timer, (64, 48) if args.quick else (4096, 768), device)
    slow_timer = Timer(device, rounds, block=1 if args.quick else 2)
    lines += dram_speed(slow_timer, (64, 48) if args.quick else (16384, 2048), device)
    print("\n".join(lines), flush=True)
    rows = 20_000 if args.quick else 200_000
    print("\n".join(precision(rows, [3000.0] if args.quick else [0.0, 3000.0, 1e4, 1e5, 1e6])))


if __name__ == "__main__":
    main()
