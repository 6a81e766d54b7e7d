"""Benchmarks of matryoshka_l2 against the bound of issue 18 and the peers' formulas.

    python benchmarks/bench_matryoshka.py            # batch 4096, d_sae 16384, d_model 768, G = 5
    python benchmarks/bench_matryoshka.py --quick    # tiny sizes, to check that it runs (CI)

Every candidate is one forward and backward, with gradients to the latents, the decoder weight
and the decoder bias (the source takes none), timed side by side in one process (_timing.py).

- bound: one full decode ``latents @ decoder_weight + bias`` and ``l2_reconstruction``;
- SAELens 6.54.12 (``saes/matryoshka_batchtopk_sae.py``): the full decode's loss, plus each
  inner prefix decoded incrementally from ``b_dec`` (``_iterable_decode``), each its own
  ``F.mse_loss(...).sum(-1).mean()``; without and with its default
  ``rescale_acts_by_decoder_norm`` (the latents times ``1 / W_dec.norm(dim=-1)``, in both
  decodes), against the recipe, which normalises the decoder's rows instead (``d_sae x d_model``
  rather than ``batch x d_sae``);
- dictionary_learning 0.1.0 (``trainers/matryoshka_batch_top_k.py``, ``loss``): ``t.split`` of
  the latents and the decoder, one running reconstruction, a weighted mean of the G losses.

The loss's constant factors (``d_model``, the group weights) change nothing in the cost, so
``matryoshka_l2`` is timed once, summed over the widths.

Peak memory is measured with ``torch.profiler`` (``profile_memory=True``): its ``[memory]``
events are every allocation and free of the CPU (and CUDA) allocator, in order, so their running
sum is the memory held at each moment of the call beyond what existed before it (the inputs).
``tracemalloc`` would not see them: torch's allocator does not go through Python's. The
gradients of the inputs, returned and alive at the end, are subtracted.
"""

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from _timing import Timer
from torch.profiler import ProfilerActivity, profile

from sae_losses import l2_reconstruction, matryoshka_l2


def bound(z, w_dec, b_dec, x, widths):
    return l2_reconstruction(z @ w_dec + b_dec, x)


def ours(z, w_dec, b_dec, x, widths):
    return (matryoshka_l2(z, w_dec, x, widths=widths, decoder_bias=b_dec) * x.shape[1]).sum()


def ours_rescaled(z, w_dec, b_dec, x, widths):
    """rescale_acts_by_decoder_norm: the recipe normalises the decoder rows, not the latents."""
    return ours(z, w_dec / w_dec.norm(dim=1, keepdim=True), b_dec, x, widths)


def saelens(z, w_dec, b_dec, x, widths, rescale=False):
    """TrainingSAE.training_forward_pass's mse_loss plus every inner_mse_loss_{width}."""
    acts = z * (1 / w_dec.norm(dim=-1)) if rescale else z  # act_times_W_dec
    sae_out = acts @ w_dec + b_dec
    loss = F.mse_loss(sae_out, x, reduction="none").sum(dim=-1).mean()
    if rescale:  # _iterable_decode rescales again
        z = z * (1 / w_dec.norm(dim=-1))
    decoded, previous = b_dec, 0
    for width in widths[:-1]:
        decoded = z[:, previous:width] @ w_dec[previous:width] + decoded
        loss = loss + F.mse_loss(decoded, x, reduction="none").sum(dim=-1).mean()
        previous = width
    return loss


def saelens_rescaled(z, w_dec, b_dec, x, widths):
    return saelens(z, w_dec, b_dec, x, widths, rescale=True)


def dictionary_learning(z, w_dec, b_dec, x, widths):
    """MatryoshkaBatchTopKTrainer.loss's mean_l2_loss, with its default weights 1 / G."""
    sizes = [b - a for a, b in zip((0, *widths[:-1]), widths, strict=True)]
    weights = [1.0 / len(sizes)] * len(sizes)
    x_reconstruct = torch.zeros_like(x) + b_dec
    losses = []
    for i, (w_chunk, f_chunk) in enumerate(
        zip(torch.split(w_dec, sizes, dim=0), torch.split(z, sizes, dim=1), strict=True)
    ):
        x_reconstruct = x_reconstruct + f_chunk @ w_chunk
        losses.append((x - x_reconstruct).pow(2).sum(dim=-1).mean() * weights[i])
    return torch.stack(losses).mean()


CANDIDATES = {
    "bound: decode + l2_reconstruction": bound,
    "matryoshka_l2": ours,
    "SAELens formula": saelens,
    "matryoshka_l2, W_dec / W_dec.norm (recipe)": ours_rescaled,
    "SAELens formula, rescale_acts_by_decoder_norm": saelens_rescaled,
    "dictionary_learning formula": dictionary_learning,
}


def step(loss_fn, leaves, x, widths):
    def run():
        return torch.autograd.grad(loss_fn(*leaves, x, widths), leaves)

    return run


def peak_beyond_inputs_and_gradients(run, device: torch.device) -> int:
    """Peak bytes allocated during ``run()`` beyond what existed before, less its results."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as p:
        grads = run()
    events = [e for e in p.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak - sum(g.numel() * g.element_size() for g in grads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds, for CI")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per candidate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    random.seed(0)
    torch.manual_seed(0)
    batch, d_sae, d_model = (64, 256, 32) if args.quick else (4096, 16384, 768)
    widths = [d_sae // 16, d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
    timer = Timer(device, args.rounds or (2 if args.quick else 5), block=1)

    z = torch.randn(batch, d_sae, device=device).relu_().requires_grad_()
    w_dec = (torch.randn(d_sae, d_model, device=device) / d_model**0.5).requires_grad_()
    b_dec = torch.randn(d_model, device=device).requires_grad_()
    x = torch.randn(batch, d_model, device=device)
    runs = {name: step(fn, (z, w_dec, b_dec), x, widths) for name, fn in CANDIDATES.items()}

    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}

    def on_cpu_clock(name, run):
        def timed():
            start = time.process_time()
            result = run()
            cpu_seconds[name].append(time.process_time() - start)
            return result

        return timed

    results = timer.medians({name: on_cpu_clock(name, run) for name, run in runs.items()})
    # The process's CPU time, all its threads: less sensitive to other processes on a shared
    # machine than the wall clock (the first call, the warm-up, is left out).
    cpu = {name: statistics.median(times[1:]) for name, times in cpu_seconds.items()}
    peaks = {name: peak_beyond_inputs_and_gradients(run, device) for name, run in runs.items()}
    floor = results["bound: decode + l2_reconstruction"]
    print(
        f"\n### matryoshka_l2 on {device}: batch {batch}, d_sae {d_sae}, d_model {d_model}, "
        f"widths {widths}, forward + backward, float32\n"
    )
    cpu_floor = cpu["bound: decode + l2_reconstruction"]
    print(
        "| candidate | median | / bound | CPU time | / bound | peak beyond inputs and gradients |"
    )
    print("|---|---|---|---|---|---|")
    for name, seconds in results.items():
        print(
            f"| {name} | {seconds * 1e3:.1f} ms | {seconds / floor:.2f}x | "
            f"{cpu[name] * 1e3:.1f} ms | {cpu[name] / cpu_floor:.2f}x | "
            f"{peaks[name] / 2**20:.1f} MiB |"
        )
    pairs = [
        ("bound", "matryoshka_l2", "bound: decode + l2_reconstruction", 1.4),
        ("SAELens", "matryoshka_l2", "SAELens formula", 0.8),
        (
            "SAELens, rescaled",
            "matryoshka_l2, W_dec / W_dec.norm (recipe)",
            "SAELens formula, rescale_acts_by_decoder_norm",
            0.8,
        ),
        (
            "dictionary_learning",
            "matryoshka_l2",
            "dictionary_learning formula",
            1.2,
        ),
    ]
    print()
    for label, mine, theirs, goal in pairs:
        print(
            f"- time against {label}: {results[mine] / results[theirs]:.2f}x wall, "
            f"{cpu[mine] / cpu[theirs]:.2f}x CPU (goal <= {goal})"
        )
    for label, mine, theirs, _ in pairs[1:]:
        print(f"- peak memory against {label}: {peaks[mine] / peaks[theirs]:.2f}x (goal <= 0.5)")


if __name__ == "__main__":
    main()
