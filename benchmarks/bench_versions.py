"""Before and after: this checkout's kernels against an earlier commit's, in one process.

    python benchmarks/bench_versions.py --before f9ff003   # 0.2.0, before issues 15 and 20
    python benchmarks/bench_versions.py --quick            # tiny sizes, HEAD against HEAD (CI)

Separate runs of the other scripts drift by 2x on a shared machine (the CPU's speed changes
between minutes), so their "before" and "after" tables cannot be compared figure by figure. This
script extracts the ``sae_losses`` package of ``--before`` with ``git archive``, renames it
``sae_losses_before``, imports both, and times each term of both versions side by side with
``_timing.Timer`` (blocks, shuffled order, medians). Only terms that exist in both versions
are timed. Each figure is also quoted against the read floor of the same inputs.
"""

import argparse
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from _timing import Timer

import sae_losses

ROOT = Path(__file__).resolve().parents[1]
Maker = Callable[[ModuleType], Callable[[], object]]  # a version -> a timed call of one term


def import_version(revision: str, into: Path) -> ModuleType:
    """The package as it was at ``revision``, importable as ``sae_losses_before``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "sae_losses"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "sae_losses_before"
    (into / "sae_losses").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\bsae_losses\b", "sae_losses_before", path.read_text()))
    sys.path.insert(0, str(into))
    import sae_losses_before

    return sae_losses_before


def forward_and_backward(loss: Callable[[], torch.Tensor], wrt: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        torch.autograd.grad(loss(), wrt)

    return run


def repeated(make: Maker, times: int) -> Maker:
    """``make``, whose call runs the term ``times`` times: one call of a tiny term is a few µs."""

    def make_repeated(version: ModuleType) -> Callable[[], object]:
        run = make(version)
        return lambda: [run() for _ in range(times)]

    return make_repeated


def has_term(version: ModuleType, make: Maker) -> bool:
    """Whether the version has the term: one call, which raises if a name is missing."""
    try:
        make(version)()
    except AttributeError:
        return False
    return True


def streaming_update(v: ModuleType, d: torch.Tensor, s: torch.Tensor) -> Callable[[], object]:
    empty = v.StreamingFVU.empty(s.shape[1:])
    return lambda: empty.update(d, s)


def groups(quick: bool) -> list[tuple[str, dict[str, Maker], list[torch.Tensor]]]:
    """Each group: a title, its terms (a version -> a timed call) and the floor's inputs."""
    g = torch.Generator().manual_seed(0)
    rows, features = (64, 96) if quick else (4096, 16384)
    z = torch.randn(rows, features, generator=g).relu()
    w = torch.rand(features, generator=g) + 0.5
    sparsity = {
        "l1_absolute": lambda v: lambda: v.l1_absolute(z),
        "l1_absolute(weight=)": lambda v: lambda: v.l1_absolute(z, weight=w),
        "lp_sparsity(p=0.5, weight=)": lambda v: lambda: v.lp_sparsity(z, p=0.5, weight=w),
        "tanh_sparsity(weight=)": lambda v: lambda: v.tanh_sparsity(z, scale=4.0, weight=w),
        "l0_norm": lambda v: lambda: v.l0_norm(z),
        "jumprelu_l0": lambda v: lambda: v.jumprelu_l0(z, w, bandwidth=0.1),
        # The compiled twins, where both versions have them (they compile in the warm-up).
        "fused_lp_sparsity(p=0.5, weight=)": lambda v: (
            lambda: v.fused_lp_sparsity(z, p=0.5, weight=w)
        ),
        "fused_l0_norm": lambda v: lambda: v.fused_l0_norm(z),
        "fused_jumprelu_l0": lambda v: lambda: v.fused_jumprelu_l0(z, w, bandwidth=0.1),
    }
    out = [(f"Sparsity terms on {tuple(z.shape)}, forward (floor: z.sum())", sparsity, [z])]
    # Per-call overhead: tiny inputs, where the checks and the dispatch are the whole cost.
    ts, tz = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g).relu()
    td = ts + 0.1
    tiny = {
        "l2_reconstruction": lambda v: lambda: v.l2_reconstruction(td, ts),
        "l1_absolute": lambda v: lambda: v.l1_absolute(tz),
        "l0_norm": lambda v: lambda: v.l0_norm(tz),
        "fraction_of_variance_unexplained": lambda v: (
            lambda: v.fraction_of_variance_unexplained(td, ts)
        ),
    }
    title = "Per-call overhead on 8 x 16 inputs, 100 calls a timing (floor: d.sum(); s.sum())"
    out.append((title, {name: repeated(make, 100) for name, make in tiny.items()}, [td, ts] * 100))
    for shape in [(32, 48)] if quick else [(4096, 768), (16384, 2048)]:
        s = torch.randn(*shape, generator=g) + 100
        d = s + 0.3 * torch.randn(*shape, generator=g)
        leaf = d.clone().requires_grad_()
        keep = torch.rand(shape[0], generator=g) > 0.1
        reconstruction = {
            "l2_reconstruction": lambda v, d=d, s=s: lambda: v.l2_reconstruction(d, s),
            "l2_reconstruction, bool mask": (
                lambda v, d=d, s=s, keep=keep: lambda: v.l2_reconstruction(d, s, mask=keep)
            ),
            "l2_reconstruction, forward + backward": lambda v, s=s, leaf=leaf: forward_and_backward(
                lambda: v.l2_reconstruction(leaf, s), leaf
            ),
            "l1_absolute": lambda v, d=d: lambda: v.l1_absolute(d),
            "fraction_of_variance_unexplained": (
                lambda v, d=d, s=s: lambda: v.fraction_of_variance_unexplained(d, s)
            ),
            "StreamingFVU.update": lambda v, d=d, s=s: streaming_update(v, d, s),
        }
        title = f"Reconstruction terms on {shape}, forward (floor: d.sum(); s.sum())"
        out.append((title, reconstruction, [d, s]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="the earlier commit (default: HEAD)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds, for CI")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 15)
    timer = Timer(torch.device("cpu"), rounds=rounds, block=1 if args.quick else 4)
    with tempfile.TemporaryDirectory() as tmp:
        before = import_version(args.before, Path(tmp))
        print(
            f"before: {args.before}; after: this checkout; cpu, torch {torch.__version__}, "
            f"threads: {torch.get_num_threads()}, rounds: {rounds}, float32"
        )
        for title, group, inputs in groups(args.quick):
            candidates: dict[str, Callable[[], object]] = {
                "read floor": lambda inputs=inputs: [x.sum() for x in inputs]
            }
            for name, make in group.items():
                for label, version in (("before", before), ("after", sae_losses)):
                    if has_term(version, make):
                        candidates[f"{name} ({label})"] = make(version)
            times = timer.medians(candidates)
            floor = times["read floor"]
            print(f"\n### {title}\n")
            print("| term | before / floor | after / floor | after / before |")
            print("|---|---|---|---|")
            for name in group:
                old, new = times.get(f"{name} (before)"), times.get(f"{name} (after)")
                if old is None or new is None:
                    continue
                print(f"| {name} | {old / floor:.2f}x | {new / floor:.2f}x | {new / old:.2f}x |")


if __name__ == "__main__":
    main()
