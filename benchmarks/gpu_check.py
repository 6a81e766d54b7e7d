"""One run that checks sae_losses on a CUDA device: correctness, host syncs, bandwidth.

    python benchmarks/gpu_check.py                         # one GPU: under 4 minutes on an H200
    python benchmarks/gpu_check.py --quick                 # small sizes: a smoke run
    python benchmarks/gpu_check.py --device cpu --quick    # the same code paths on the CPU (CI)

It prints one markdown table and exits 0, whatever it finds: a failing op is a FAIL row, not a
crash. Without a CUDA device (and without ``--device cpu``) it prints "no CUDA device" and exits 0.

Sections of the table:

- **coverage**: every callable in ``sae_losses.__all__`` has a row in ``OPS`` below, or a
  "not covered: name" warning row says it has none.
- **correctness**: each row of ``OPS`` on the device in float32 and bfloat16, forward and
  backward, against two float64 CPU references computed from the same input values (the inputs
  are rounded to the dtype first): the op itself on float64 CPU copies, and an independent
  plain-torch formula (for the fused functions the first is their eager twin, so nothing is
  compiled on the CPU). The error is ``max |got - ref| / max |ref|`` over each output and each
  gradient (the largest is reported); the bound is 1e-5 for float32 and 1e-2 for bfloat16 (whose
  gradients are rounded to bfloat16: up to 2^-8 relative each). Outputs must stay on the
  device, half inputs must give float32 results, and gradients must have their input's dtype.
- **host sync**: each op of the training step path, forward and backward, with
  ``torch.cuda.set_sync_debug_mode("error")``; a sync is reported with the line that made it.
  ``all_reduce`` is left out: its eager fingerprint check reads to the host by design.
- **training step**: a toy SAE (encoder, ReLU, decoder; L2 + L1 and the other terms; backward;
  Adam) for a few steps, each stage under the sync debug mode, after one warm-up step that
  compiles the fused kernels.
- **bandwidth**: forward and forward + backward times (CUDA events, median of ``--reps``) at
  sizes that live in HBM, as ratios to the read floor (``x.sum()`` over the same inputs), to
  ``F.mse_loss(d, s, reduction="none").mean(-1).mean(0)`` on a pair of inputs of that size, and
  to the row's plain formula.

On the CPU (``--device cpu``) the host-sync rows are n/a, the training step runs without the
sync check, and the bandwidth rows are CPU timings of small inputs (the code path, not HBM).

To cover a new public term, add one row to ``OPS``: how to build its inputs from an
:class:`Inputs`, how to call it, which inputs get gradients, and a plain formula.
"""

import argparse
import contextlib
import dataclasses
import datetime
import math
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

import sae_losses as sl

Tensors = dict[str, torch.Tensor]
Outputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class Op:
    """One row of the public-op table.

    ``call`` returns a tensor or a tuple of tensors; every one is compared with the references,
    and the first is the one differentiated (with a seeded random cotangent). ``formula`` is the
    independent plain-torch reference, run in float64 on the CPU, and differentiated by autograd
    unless ``formula_grads`` gives the gradients by hand.
    """

    name: str
    covers: tuple[str, ...]  # the names of sae_losses.__all__ that this row exercises
    make: Callable[["Inputs"], Tensors]  # the inputs, by name
    call: Callable[[Tensors], Outputs]
    grad: tuple[str, ...] = ()  # inputs whose gradients are checked
    formula: Callable[[Tensors], Outputs] | None = None
    formula_grads: Callable[[Tensors, torch.Tensor], tuple[torch.Tensor, ...]] | None = None
    # The float64 CPU reference when it is not ``call``: the fused rows use their eager twin, so
    # no CPU kernel is compiled (and a machine without a C++ compiler still checks the GPU).
    ref_call: Callable[[Tensors], Outputs] | None = None
    grad_free: tuple[str, ...] = ()  # inputs given requires_grad; the result must not require it
    compiles: bool = False  # runs torch.compile-generated kernels (Triton on CUDA)
    step_path: bool = True  # part of a training or evaluation step: must not sync with the host
    bench: bool = True  # timed in the bandwidth section
    half_result: bool = False  # returns activations in the input dtype (auxk_reconstruction)
    bench_grad: tuple[str, ...] | None = None  # inputs differentiated there (default: grad)
    floor: tuple[str, ...] | None = None  # the inputs of the read floor (default: batched ones)


# fmt: off
OPS: list[Op] = [
    Op("l2_reconstruction", ("l2_reconstruction",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s")},
       call=lambda t: sl.l2_reconstruction(t["d"], t["s"]),
       grad=("d", "s"), bench_grad=("d",),
       formula=lambda t: reduce_ref(l2_rows(t["d"], t["s"]), "mean")),
    Op("l2_reconstruction(reduce='none', mask=bool)", ("l2_reconstruction",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s"), "keep": g.keep("keep")},
       call=lambda t: sl.l2_reconstruction(t["d"], t["s"], reduce="none", mask=t["keep"]),
       grad=("d", "s"), bench=False,
       formula=lambda t: reduce_ref(l2_rows(t["d"], t["s"]), "none", t["keep"])),
    Op("l2_reconstruction(reduce='sum', mask=weights), 2-D", ("l2_reconstruction",),
       make=lambda g: {"d": g.act("d", flat=True), "s": g.act("s", flat=True),
                       "w": g.weights("w")},
       call=lambda t: sl.l2_reconstruction(t["d"], t["s"], reduce="sum", mask=t["w"]),
       grad=("d",), bench=False,
       formula=lambda t: reduce_ref(l2_rows(t["d"], t["s"]), "sum", t["w"])),
    Op("fraction_of_variance_unexplained", ("fraction_of_variance_unexplained",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s")},
       call=lambda t: sl.fraction_of_variance_unexplained(t["d"], t["s"]),
       grad=("d", "s"), bench_grad=("d",),
       formula=lambda t: fvu_ref(t["d"], t["s"])),
    Op("fraction_of_variance_unexplained(mask=bool)", ("fraction_of_variance_unexplained",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s"), "keep": g.keep("keep")},
       call=lambda t: sl.fraction_of_variance_unexplained(t["d"], t["s"], mask=t["keep"]),
       grad=("d", "s"), bench=False,
       formula=lambda t: fvu_ref(t["d"], t["s"], t["keep"])),
    Op("l1_absolute", ("l1_absolute",),
       make=lambda g: {"z": g.act("z")},
       call=lambda t: sl.l1_absolute(t["z"]),
       grad=("z",),
       formula=lambda t: reduce_ref(t["z"].abs().sum(-1), "mean")),
    Op("l1_absolute(weight=, mask=weights)", ("l1_absolute",),
       make=lambda g: {"z": g.act("z"), "wf": g.vector("wf"), "w": g.weights("w")},
       call=lambda t: sl.l1_absolute(t["z"], weight=t["wf"], mask=t["w"]),
       grad=("z", "wf"),
       formula=lambda t: reduce_ref((t["z"].abs() * t["wf"]).sum(-1), "mean", t["w"])),
    Op("lp_sparsity(p=2, root=True, weight=)", ("lp_sparsity",),
       make=lambda g: {"z": g.act("z"), "wf": g.vector("wf")},
       call=lambda t: sl.lp_sparsity(t["z"], p=2, root=True, weight=t["wf"]),
       grad=("z", "wf"),
       formula=lambda t: reduce_ref((t["z"] * t["wf"]).square().sum(-1).sqrt(), "mean")),
    Op("lp_sparsity(p=0.5, reduce='sum')", ("lp_sparsity",),
       make=lambda g: {"z": g.act("z")},
       call=lambda t: sl.lp_sparsity(t["z"], p=0.5, reduce="sum"),
       grad=("z",), bench=False,
       formula=lambda t: reduce_ref(t["z"].abs().sqrt().sum(-1), "sum")),
    Op("tanh_sparsity(scale=4, weight=)", ("tanh_sparsity",),
       make=lambda g: {"z": g.act("z"), "wf": g.vector("wf")},
       call=lambda t: sl.tanh_sparsity(t["z"], scale=4, weight=t["wf"]),
       grad=("z", "wf"),
       formula=lambda t: reduce_ref(torch.tanh(4 * t["z"].abs() * t["wf"]).sum(-1), "mean")),
    Op("l0_norm(threshold=0.5)", ("l0_norm",),
       make=lambda g: {"z": g.act("z")},
       call=lambda t: sl.l0_norm(t["z"], threshold=0.5),
       grad_free=("z",),
       formula=lambda t: reduce_ref((t["z"].abs() > 0.5).sum(-1).to(t["z"].dtype), "mean")),
    Op("jumprelu_l0(bandwidth=0.3)", ("jumprelu_l0",),
       make=lambda g: {"pre": g.grid("pre"),
                       "theta": g.grid("theta", shape=(g.feature,), normal=False)},
       call=lambda t: sl.jumprelu_l0(t["pre"], t["theta"], bandwidth=0.3),
       grad=("theta",),
       formula=lambda t: reduce_ref((t["pre"] > t["theta"]).sum(-1).to(t["pre"].dtype), "mean"),
       formula_grads=lambda t, cot: (jumprelu_threshold_grad(t["pre"], t["theta"], 0.3, cot),)),
    Op("fused_l2_reconstruction", ("fused_l2_reconstruction",), compiles=True,
       make=lambda g: {"d": g.act("d"), "s": g.act("s")},
       call=lambda t: sl.fused_l2_reconstruction(t["d"], t["s"]),
       ref_call=lambda t: sl.l2_reconstruction(t["d"], t["s"]),
       grad=("d", "s"), bench_grad=("d",),
       formula=lambda t: reduce_ref(l2_rows(t["d"], t["s"]), "mean")),
    Op("fused_l2_reconstruction(reduce='none', mask=bool)", ("fused_l2_reconstruction",),
       compiles=True, bench=False,
       make=lambda g: {"d": g.act("d"), "s": g.act("s"), "keep": g.keep("keep")},
       call=lambda t: sl.fused_l2_reconstruction(t["d"], t["s"], reduce="none", mask=t["keep"]),
       ref_call=lambda t: sl.l2_reconstruction(t["d"], t["s"], reduce="none", mask=t["keep"]),
       grad=("d", "s"),
       formula=lambda t: reduce_ref(l2_rows(t["d"], t["s"]), "none", t["keep"])),
    Op("fused_l1_absolute", ("fused_l1_absolute",), compiles=True,
       make=lambda g: {"z": g.act("z")},
       call=lambda t: sl.fused_l1_absolute(t["z"]),
       ref_call=lambda t: sl.l1_absolute(t["z"]),
       grad=("z",),
       formula=lambda t: reduce_ref(t["z"].abs().sum(-1), "mean")),
    Op("fused_l1_absolute(weight=, mask=weights)", ("fused_l1_absolute",), compiles=True,
       bench=False,
       make=lambda g: {"z": g.act("z"), "wf": g.vector("wf"), "w": g.weights("w")},
       call=lambda t: sl.fused_l1_absolute(t["z"], weight=t["wf"], mask=t["w"]),
       ref_call=lambda t: sl.l1_absolute(t["z"], weight=t["wf"], mask=t["w"]),
       grad=("z", "wf"),
       formula=lambda t: reduce_ref((t["z"].abs() * t["wf"]).sum(-1), "mean", t["w"])),
    Op("StreamingMean: update (and mask=bool), merge, compute", ("StreamingMean",),
       make=lambda g: {"v": g.per_row("v"), "keep": g.keep("keep")},
       call=lambda t: streaming_mean(t["v"], t["keep"]), floor=("v",),
       formula=lambda t: streaming_mean_ref(t["v"], t["keep"])),
    Op("StreamingFVU: update (and mask=bool), merge, compute", ("StreamingFVU",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s"), "keep": g.keep("keep")},
       call=lambda t: streaming_fvu(t["d"], t["s"], t["keep"]), floor=("d", "s"),
       formula=lambda t: streaming_fvu_ref(t["d"], t["s"], t["keep"])),
    Op("cosine_similarity", ("cosine_similarity",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s")},
       call=lambda t: sl.cosine_similarity(t["d"], t["s"]),
       grad=("d", "s"),
       formula=lambda t: reduce_ref(cosine_rows(t["d"], t["s"]), "mean")),
    Op("cosine_similarity(reduce='none', mask=bool)", ("cosine_similarity",), bench=False,
       make=lambda g: {"d": g.act("d"), "s": g.act("s"), "keep": g.keep("keep")},
       call=lambda t: sl.cosine_similarity(t["d"], t["s"], reduce="none", mask=t["keep"]),
       grad=("d", "s"),
       formula=lambda t: reduce_ref(cosine_rows(t["d"], t["s"]), "none", t["keep"])),
    Op("l2_norm_ratio(mask=weights)", ("l2_norm_ratio",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s"), "w": g.weights("w")},
       call=lambda t: sl.l2_norm_ratio(t["d"], t["s"], mask=t["w"]),
       grad=("d", "s"),
       formula=lambda t: reduce_ref(t["d"].norm(dim=-1) / t["s"].norm(dim=-1), "mean", t["w"])),
    Op("StreamingReconstructionBias: update (and mask=bool), merge, compute",
       ("StreamingReconstructionBias",),
       make=lambda g: {"d": g.act("d"), "s": g.act("s"), "keep": g.keep("keep")},
       call=lambda t: streaming_bias(t["d"], t["s"], t["keep"]), floor=("d", "s"),
       formula=lambda t: streaming_bias_ref(t["d"], t["s"], t["keep"])),
    Op("StreamingSpliceScores: update (mask=, kl_mask=), merge, compute",
       ("StreamingSpliceScores",),
       make=lambda g: {"clean": g.act("clean", flat=True), "noise": g.act("noise", flat=True),
                       "keep": g.keep("keep")},
       call=lambda t: splice_scores(t["clean"], t["noise"], t["keep"]),
       floor=("clean", "noise"),
       formula=lambda t: splice_scores_ref(t["clean"], t["noise"], t["keep"])),
    Op("auxk_reconstruction(k_aux=8)", ("auxk_reconstruction",), make=lambda g: auxk_inputs(g),
       half_result=True,
       call=lambda t: sl.auxk_reconstruction(t["pre"], t["dead"], t["w"], k_aux=8),
       grad=("pre", "w"), floor=("pre",),
       formula=lambda t: auxk_e_hat_ref(t["pre"], t["dead"], t["w"], 8)),
    Op("auxk_loss(k_aux=8, mask=bool)", ("auxk_loss",), make=lambda g: auxk_inputs(g, keep=True),
       call=lambda t: sl.auxk_loss(t["pre"], t["dead"], t["w"], t["e"], k_aux=8, mask=t["keep"]),
       grad=("pre", "w"), floor=("pre",),
       formula=lambda t: fvu_ref(auxk_e_hat_ref(t["pre"], t["dead"], t["w"], 8), t["e"],
                                 t["keep"])),
    Op("matryoshka_l2(4 nested widths, decoder_bias=, mask=weights)", ("matryoshka_l2",),
       make=lambda g: {"z": g.act("z", flat=True).relu(), "w": g.grid("w", shape=(g.feature, 16)),
                       "x": g.grid("x", shape=(g.batch, 16)), "b": g.grid("b", shape=(16,)),
                       "mw": g.weights("mw")},
       call=lambda t: sl.matryoshka_l2(t["z"], t["w"], t["x"], widths=nested_widths(t["z"]),
                                       decoder_bias=t["b"], mask=t["mw"]),
       grad=("z", "w", "x", "b"), floor=("z", "x"),
       formula=lambda t: reduce_ref(matryoshka_rows(t["z"], t["w"], t["x"], t["b"]), "mean",
                                    t["mw"])),
    Op("cross_entropy", ("cross_entropy",),
       make=lambda g: {"z": g.act("z"), "u": g.act("u")},
       call=lambda t: sl.cross_entropy(t["z"], t["u"].argmax(-1)),
       grad=("z",),
       formula=lambda t: reduce_ref(ce_rows(t["z"], t["u"].argmax(-1)), "mean")),
    Op("kl_divergence", ("kl_divergence",),
       make=lambda g: {"r": g.act("r"), "z": g.act("z")},
       call=lambda t: sl.kl_divergence(t["r"], t["z"]),
       grad=("r", "z"),
       formula=lambda t: reduce_ref(kl_rows(t["r"], t["z"]), "mean")),
    Op("fused_lp_sparsity(p=2, root=True)", ("fused_lp_sparsity",), compiles=True, bench=False,
       make=lambda g: {"z": g.act("z")},
       call=lambda t: sl.fused_lp_sparsity(t["z"], p=2, root=True),
       ref_call=lambda t: sl.lp_sparsity(t["z"], p=2, root=True), grad=("z",),
       formula=lambda t: reduce_ref(t["z"].square().sum(-1).sqrt(), "mean")),
    Op("fused_tanh_sparsity(scale=4)", ("fused_tanh_sparsity",), compiles=True, bench=False,
       make=lambda g: {"z": g.act("z")},
       call=lambda t: sl.fused_tanh_sparsity(t["z"], scale=4),
       ref_call=lambda t: sl.tanh_sparsity(t["z"], scale=4), grad=("z",),
       formula=lambda t: reduce_ref(torch.tanh(4 * t["z"].abs()).sum(-1), "mean")),
    Op("fused_l0_norm(threshold=0.5)", ("fused_l0_norm",), compiles=True, bench=False,
       make=lambda g: {"z": g.act("z")},
       call=lambda t: sl.fused_l0_norm(t["z"], threshold=0.5),
       ref_call=lambda t: sl.l0_norm(t["z"], threshold=0.5), grad_free=("z",),
       formula=lambda t: reduce_ref((t["z"].abs() > 0.5).sum(-1).to(t["z"].dtype), "mean")),
    Op("fused_fraction_of_variance_unexplained", ("fused_fraction_of_variance_unexplained",),
       compiles=True, bench=False,
       make=lambda g: {"d": g.act("d"), "s": g.act("s")},
       call=lambda t: sl.fused_fraction_of_variance_unexplained(t["d"], t["s"]),
       ref_call=lambda t: sl.fraction_of_variance_unexplained(t["d"], t["s"]),
       grad=("d", "s"), formula=lambda t: fvu_ref(t["d"], t["s"])),
    Op("fused_jumprelu_l0(bandwidth=0.3)", ("fused_jumprelu_l0",), compiles=True, bench=False,
       make=lambda g: {"pre": g.grid("pre"),
                       "theta": g.grid("theta", shape=(g.feature,), normal=False)},
       call=lambda t: sl.fused_jumprelu_l0(t["pre"], t["theta"], bandwidth=0.3),
       ref_call=lambda t: sl.jumprelu_l0(t["pre"], t["theta"], bandwidth=0.3),
       grad=("theta",),
       formula=lambda t: reduce_ref((t["pre"] > t["theta"]).sum(-1).to(t["pre"].dtype), "mean"),
       formula_grads=lambda t, cot: (jumprelu_threshold_grad(t["pre"], t["theta"], 0.3, cot),)),
    Op("all_reduce on a world of 1 (and async_op=True)", ("all_reduce", "PendingAllReduce"),
       make=lambda g: {"v": g.per_row("v"), "d": g.act("d"), "s": g.act("s")},
       call=lambda t: all_reduced(t["v"], t["d"], t["s"]),
       formula=lambda t: all_reduced_ref(t["v"], t["d"], t["s"]),
       step_path=False, bench=False),
]
# fmt: on

# Names of sae_losses.__all__ that are not ops, so they need no row.
NOT_OPS = {
    "__version__": "the version string",
    "TokensSinceFired": "integer state; its update is checked in tests/test_dead_latents.py",
}

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.bfloat16)
BUDGET_S = 190.0  # no bandwidth row starts after this, so a full run ends in under 4 minutes


class Inputs:
    """Seeded inputs for the rows of ``OPS``, memoised by name and shape.

    Activations are ``(batch, *component, feature)``; ``flat=True`` drops the component axes.
    The correctness section builds them in float64 on the CPU and rounds them to each dtype; the
    bandwidth section builds them in float32 on the device, at sizes without component axes.
    """

    def __init__(
        self,
        batch: int,
        component: tuple[int, ...],
        feature: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
    ) -> None:
        self.batch, self.component, self.feature = batch, tuple(component), feature
        self.device, self.dtype = torch.device(device), dtype
        self._generator = torch.Generator(self.device).manual_seed(seed)
        self._memo: Tensors = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.component, self.feature)

    def _memoised(self, name: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor]):
        key = f"{name}{shape}"
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def _random(self, shape: tuple[int, ...], normal: bool = True) -> torch.Tensor:
        sample = torch.randn if normal else torch.rand
        return sample(shape, generator=self._generator, device=self.device, dtype=self.dtype)

    def act(self, name: str, *, flat: bool = False) -> torch.Tensor:
        """Standard-normal activations, ``(batch, *component, feature)``."""
        shape = (self.batch, self.feature) if flat else self.shape
        return self._memoised(name, shape, lambda: self._random(shape))

    def per_row(self, name: str) -> torch.Tensor:
        """Per-row values, ``(batch, *component)``, as an op's ``reduce="none"`` gives."""
        shape = self.shape[:-1]
        return self._memoised(name, shape, lambda: self._random(shape).abs())

    def vector(self, name: str) -> torch.Tensor:
        """A ``(feature,)`` weight in [0.5, 1.5)."""
        shape = (self.feature,)
        return self._memoised(name, shape, lambda: 0.5 + self._random(shape, normal=False))

    def keep(self, name: str) -> torch.Tensor:
        """A bool ``(batch,)`` mask that keeps about 70% of the rows, the first two always."""

        def make() -> torch.Tensor:
            keep = self._random((self.batch,), normal=False) > 0.3
            keep[:2] = True
            keep[-1] = False
            return keep

        return self._memoised(name, (self.batch,), make)

    def weights(self, name: str) -> torch.Tensor:
        """Floating ``(batch,)`` row weights in [0.5, 1.5), with one row of weight 0."""

        def make() -> torch.Tensor:
            weights = 0.5 + self._random((self.batch,), normal=False)
            weights[-1] = 0
            return weights

        return self._memoised(name, (self.batch,), make)

    def grid(self, name: str, *, shape: tuple[int, ...] | None = None, normal: bool = True):
        """Values on the 1/16 grid, in [-4, 4] (normal) or [0, 1]: exact in every dtype.

        A comparison such as ``|pre - threshold| < bandwidth / 2`` then has the same answer in
        bfloat16, float32 and float64, so a count cannot flip between the op and its reference.
        """
        shape = self.shape if shape is None else shape
        return self._memoised(
            name,
            shape,
            lambda: (self._random(shape, normal) * 16).round().clamp(-64, 64) / 16,
        )


# Plain-torch references: what each term is by definition, with no sae_losses code.


def l2_rows(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The mean over features of the squared error."""
    return (d - s).square().mean(-1)


def reduce_ref(rows: torch.Tensor, reduce: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row weights (a bool mask as 0/1), then none / sum / weighted mean over the batch axis."""
    if mask is None:
        weights = torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)
    else:
        weights = mask.to(rows.dtype)
    view = weights.reshape(weights.shape + (1,) * (rows.ndim - 1))
    weighted = rows * view
    if reduce == "none":
        return weighted
    if reduce == "sum":
        return weighted.sum(0)
    return weighted.sum(0) / weights.sum()


def fvu_ref(d: torch.Tensor, s: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Summed squared error over summed squared deviation from the kept rows' mean."""
    if keep is not None:
        d, s = d[keep], s[keep]
    error = (d - s).square().sum(0).sum(-1)
    variance = (s - s.mean(0)).square().sum(0).sum(-1)
    return error / variance


def jumprelu_threshold_grad(
    pre: torch.Tensor, theta: torch.Tensor, bandwidth: float, cotangent: torch.Tensor
) -> torch.Tensor:
    """-1/bandwidth times the upstream gradient of each row in the window, for reduce='mean'."""
    per_row = cotangent.expand(pre.shape[:-1]) / pre.shape[0]
    near = ((pre - theta).abs() < bandwidth / 2).to(pre.dtype)
    return -(per_row.unsqueeze(-1) * near).reshape(-1, pre.shape[-1]).sum(0) / bandwidth


def _split(batch: int) -> int:
    return batch // 2


def streaming_mean(v: torch.Tensor, keep: torch.Tensor) -> Outputs:
    half = _split(v.shape[0])
    first = sl.StreamingMean.empty(v.shape[1:], device=v.device).update(v[:half])
    second = sl.StreamingMean.empty(v.shape[1:], device=v.device)
    second = second.update(v[half:], mask=keep[half:])
    merged = first.merge(second)
    return merged.compute(), merged.total, merged.count


def streaming_mean_ref(v: torch.Tensor, keep: torch.Tensor) -> Outputs:
    half = _split(v.shape[0])
    kept = torch.cat([v[:half], v[half:][keep[half:]]])
    return kept.sum(0) / kept.shape[0], kept.sum(0), torch.tensor(kept.shape[0])


def streaming_fvu(d: torch.Tensor, s: torch.Tensor, keep: torch.Tensor) -> Outputs:
    half = _split(s.shape[0])
    first = sl.StreamingFVU.empty(s.shape[1:], device=s.device).update(d[:half], s[:half])
    second = sl.StreamingFVU.empty(s.shape[1:], device=s.device)
    second = second.update(d[half:], s[half:], mask=keep[half:])
    merged = first.merge(second)
    return (
        merged.compute(),
        merged.explained_variance(),
        merged.mean,
        merged.m2,
        merged.error,
        merged.count,
    )


def streaming_fvu_ref(d: torch.Tensor, s: torch.Tensor, keep: torch.Tensor) -> Outputs:
    half = _split(s.shape[0])
    rows = torch.cat([torch.ones(half, dtype=torch.bool, device=keep.device), keep[half:]])
    dk, sk = d[rows], s[rows]
    fvu = fvu_ref(dk, sk)
    mean = sk.mean(0)
    return (
        fvu,
        1 - fvu,
        mean,
        (sk - mean).square().sum(0),
        (dk - sk).square().sum(0).sum(-1),
        torch.tensor(sk.shape[0]),
    )


def auxk_inputs(g, *, keep=False):
    """Distinct pre-activations on the 1/16 grid (exact in bf16 while feature <= 512, so no tie
    flips the top-k between device and reference), ~half dead, a (feature, 16) decoder."""

    def pre():
        ranks = g._random((g.batch, g.feature), normal=False).argsort(-1) - g.feature // 2
        return (ranks / 16).to(g.dtype)

    t = {
        "pre": g._memoised("auxk_pre", (g.batch, g.feature), pre),
        "dead": g._memoised(
            "auxk_dead", (g.feature,), lambda: g._random((g.feature,), normal=False) < 0.5
        ),
        "w": g._memoised("auxk_w", (g.feature, 16), lambda: g._random((g.feature, 16)) / 4),
        "e": g._memoised("auxk_e", (g.batch, 16), lambda: g._random((g.batch, 16))),
    }
    return {**t, "keep": g.keep("keep")} if keep else t


def auxk_e_hat_ref(pre, dead, w, k):
    v, i = torch.where(dead, pre, -torch.inf).topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(1, i, torch.where(dead[i], v.relu(), 0)) @ w


def nested_widths(z):
    d_sae = z.shape[-1]
    return sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})


def matryoshka_rows(z, w, x, b):
    return torch.stack([(b + z[:, :k] @ w[:k] - x).square().mean(-1) for k in nested_widths(z)], -1)


def ce_rows(z, targets):
    return torch.logsumexp(z, -1) - z.gather(-1, targets[..., None])[..., 0]


def kl_rows(r, z):
    p = torch.log_softmax(r, -1)
    return (p.exp() * (p - torch.log_softmax(z, -1))).sum(-1)


def cosine_rows(d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The textbook per-row cosine."""
    return (d * s).sum(-1) / (d.norm(dim=-1) * s.norm(dim=-1))


def streaming_bias(d: torch.Tensor, s: torch.Tensor, keep: torch.Tensor) -> Outputs:
    half = _split(s.shape[0])
    empty = sl.StreamingReconstructionBias.empty(s.shape[1:-1], device=s.device)
    merged = empty.update(d[:half], s[:half]).merge(
        empty.update(d[half:], s[half:], mask=keep[half:])
    )
    return merged.compute(), merged.squared_norm, merged.inner_product, merged.count


def streaming_bias_ref(d: torch.Tensor, s: torch.Tensor, keep: torch.Tensor) -> Outputs:
    half = _split(s.shape[0])
    rows = torch.cat([torch.ones(half, dtype=torch.bool, device=keep.device), keep[half:]])
    dk, sk = d[rows], s[rows]
    squared, inner = dk.square().sum(-1).sum(0), (dk * sk).sum(-1).sum(0)
    return squared / inner, squared, inner, torch.tensor(dk.shape[0])


def splice_runs(clean: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(clean, spliced, ablated, targets): spliced = clean + noise / 2, ablated = noise."""
    return clean, clean + 0.5 * noise, noise, clean.argmax(-1)


def splice_scores(clean: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor) -> Outputs:
    *runs, targets = splice_runs(clean, noise)
    half = _split(clean.shape[0])
    empty = sl.StreamingSpliceScores.empty(device=clean.device)
    first = empty.update(*(x[:half] for x in runs), targets[:half])
    second = empty.update(
        *(x[half:] for x in runs), targets[half:], mask=keep[half:], kl_mask=~keep[half:]
    )
    return tuple(first.merge(second).compute().values())


def splice_scores_ref(clean: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor) -> Outputs:
    """The five means over their kept rows, then the two scores, from log_softmax."""
    *runs, targets = splice_runs(clean, noise)
    half = _split(clean.shape[0])
    first = torch.ones(half, dtype=torch.bool, device=keep.device)
    ce_rows, kl_rows = torch.cat([first, keep[half:]]), torch.cat([first, ~keep[half:]])
    ce = [-x.log_softmax(-1).gather(-1, targets[:, None])[:, 0][ce_rows].mean() for x in runs]
    log_p = runs[0].log_softmax(-1)
    kl = [(log_p.exp() * (log_p - x.log_softmax(-1))).sum(-1)[kl_rows].mean() for x in runs[1:]]
    return (*ce, *kl, (ce[2] - ce[1]) / (ce[2] - ce[0]), (kl[1] - kl[0]) / kl[1])


@contextlib.contextmanager
def world_of_one(device: torch.device) -> Iterator[None]:
    """A one-rank default process group (NCCL on CUDA, gloo on the CPU), then none again."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build")
    if dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_reduced(v: torch.Tensor, d: torch.Tensor, s: torch.Tensor) -> Outputs:
    tree = {
        "l2": sl.StreamingMean.empty(v.shape[1:], device=v.device).update(v),
        "fvu": [sl.StreamingFVU.empty(s.shape[1:], device=s.device).update(d, s)],
    }
    with world_of_one(v.device):
        now = sl.all_reduce(tree)
        later = sl.all_reduce(tree, async_op=True).wait()
    return (
        now["l2"].compute(),
        now["l2"].count,
        now["fvu"][0].compute(),
        later["l2"].total,
        later["fvu"][0].m2,
    )


def all_reduced_ref(v: torch.Tensor, d: torch.Tensor, s: torch.Tensor) -> Outputs:
    """On one rank, all_reduce gives back what the one process computed."""
    total = v.sum(0)
    m2 = (s - s.mean(0)).square().sum(0)
    return total / v.shape[0], torch.tensor(v.shape[0]), fvu_ref(d, s), total, m2


# The table.


class Row(NamedTuple):
    section: str
    check: str
    dtype: str
    measured: str
    bound: str
    result: str  # PASS, FAIL, WARN, n/a or info

    def markdown(self) -> str:
        return "| " + " | ".join(" ".join(c.replace("|", "/").split()) for c in self) + " |"


class Table:
    """Prints rows as they come, so a run cut short still shows what it measured."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def start(self) -> None:
        print("| " + " | ".join(Row._fields) + " |")
        print("|" + "---|" * len(Row._fields), flush=True)

    def add(self, *rows: Row) -> None:
        for row in rows:
            self.rows.append(row)
            print(row.markdown(), flush=True)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def failure(error: BaseException) -> str:
    """The error's type and first line, and the line of sae_losses (or else the last) raising it."""
    frames = traceback.extract_tb(error.__traceback__)
    package = str(Path(sl.__file__).resolve().parent)
    inside = [f for f in frames if str(Path(f.filename).resolve()).startswith(package)]
    where = ""
    if inside or frames:
        frame = (inside or frames)[-1]
        where = f" at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first_line}{where}"


_WARNINGS: list[str] = []
_START = time.perf_counter()


def log(text: str) -> None:
    """Progress on stderr, so a run cut short by a timeout shows where it was."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {text}", file=sys.stderr, flush=True)


def _record_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _WARNINGS.append(f"{category.__name__}: {message}")
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def fallback_marks() -> tuple[int, str]:
    """How many times the fused functions fell back to the eager kernels so far, and why.

    Reads the fallback warning and, where they exist, the private records of
    ``sae_losses._compile_cache`` (one per input kind that runs eagerly), so a fused row cannot
    pass on the eager kernels.
    """
    reasons = [w for w in _WARNINGS if "fused" in w and "eager" in w]
    count = len(reasons)
    module = sys.modules.get("sae_losses._compile_cache")
    for name in ("_fallback", "_eager_keys"):
        state = getattr(module, name, None)
        if isinstance(state, list | tuple | dict | set):
            count += len(state)
            reasons += [f"{name} = {state!r}"] if state else []
    return count, "; ".join(reasons)[:300]


# Coverage.


def coverage_rows(names: list[str], module: Any = sl, ops: list[Op] = OPS) -> list[Row]:
    """A warning row for every public callable that no row of ``ops`` covers."""
    covered = {name for op in ops for name in op.covers}
    rows = []
    for name in names:
        if name in covered or name in NOT_OPS:
            continue
        if not hasattr(module, name):
            rows.append(Row("coverage", f"missing: {name}", "-", "not in the module", "-", "FAIL"))
        elif callable(getattr(module, name)):
            text = "a public callable with no row in OPS"
            rows.append(Row("coverage", f"not covered: {name}", "-", text, "-", "WARN"))
    for name in sorted(covered - set(names)):
        text = "a row of OPS covers it; not in __all__"
        rows.append(Row("coverage", f"stale row: {name}", "-", text, "-", "WARN"))
    if not rows:
        text = f"{len(ops)} rows of OPS cover every callable"
        rows.append(Row("coverage", f"{len(names)} names in __all__", "-", text, "-", "PASS"))
    return rows


# Correctness.


def as_tuple(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|``, on the CPU in float64; NaN and inf must match exactly."""
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape:
        return math.inf
    same = (got.isnan() & ref.isnan()) | (got.isinf() & (got == ref))
    got, ref = got[~same], ref[~same]
    if not (got.isfinite().all() and ref.isfinite().all()):
        return math.inf
    if got.numel() == 0:
        return 0.0
    difference = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    return difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)


def worst(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...] | None) -> float | None:
    if ref is None:
        return None
    if len(got) != len(ref):
        return math.inf
    return max((relative_error(g, r) for g, r in zip(got, ref, strict=True)), default=0.0)


def prepare(x: torch.Tensor, dtype: torch.dtype, device: torch.device, grad: bool):
    """``x`` rounded to ``dtype`` (floating inputs only), on ``device``."""
    x = (x.to(dtype) if x.is_floating_point() else x).to(device)
    return x.requires_grad_() if grad else x


def reference_copy(x: torch.Tensor, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    """The same values as ``prepare(x, dtype, ...)``, in float64 on the CPU."""
    x = x.to(dtype).to(torch.float64) if x.is_floating_point() else x.clone()
    return x.requires_grad_() if grad else x


def cotangent(like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(like.shape, generator=generator, dtype=torch.float64)


def _err(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def check_op(
    op: Op, base: Tensors, dtype: torch.dtype, device: torch.device
) -> tuple[Row, Callable[[], object] | None]:
    """The correctness row of one op on one dtype, and a rerun of its device fwd (and bwd)."""
    tol, label = TOLERANCE[dtype], dtype_name(dtype)
    try:
        needs = set(op.grad) | set(op.grad_free)
        dev = {k: prepare(v, dtype, device, k in needs) for k, v in base.items()}
        ref = {k: reference_copy(v, dtype, k in op.grad) for k, v in base.items()}
        fallbacks, _ = fallback_marks()
        out = as_tuple(op.call(dev))
        ref_out = as_tuple((op.ref_call or op.call)(ref))
        formula_out = as_tuple(op.formula(ref)) if op.formula else None

        problems = [f"an output is on {o.device}" for o in out if o.device != device]
        if out[0].dtype in (torch.float16, torch.bfloat16) and not op.half_result:
            problems.append(f"the result is {dtype_name(out[0].dtype)}, not float32")
        if op.grad_free and out[0].requires_grad:
            problems.append("the result requires grad")
        errors = {"fwd": (worst(out, ref_out), worst(out, formula_out))}

        def rerun() -> object:
            return op.call(dev)

        if op.grad:
            wrt, ref_wrt = [dev[k] for k in op.grad], [ref[k] for k in op.grad]
            cot = cotangent(out[0])
            cot_dev = cot.to(out[0].dtype).to(device)
            grads = torch.autograd.grad(out[0], wrt, cot_dev)
            for name, g in zip(op.grad, grads, strict=True):
                x = dev[name]
                if (g.dtype, g.device, g.shape) != (x.dtype, x.device, x.shape):
                    problems.append(f"grad of {name}: {g.dtype} {tuple(g.shape)} on {g.device}")
            ref_grads = torch.autograd.grad(ref_out[0], ref_wrt, cot)
            formula_grads = None
            if op.formula_grads is not None:
                formula_grads = op.formula_grads(ref, cot)
            elif formula_out is not None:
                formula_grads = torch.autograd.grad(formula_out[0], ref_wrt, cot)
            errors["bwd"] = (worst(grads, ref_grads), worst(grads, formula_grads))

            def rerun() -> object:
                return torch.autograd.grad(as_tuple(op.call(dev))[0], wrt, cot_dev)

        if op.compiles and (marks := fallback_marks())[0] > fallbacks:
            problems.append(f"the fused path fell back to the eager kernels: {marks[1]}")
        found = [e for pair in errors.values() for e in pair if e is not None]
        ok = not problems and all(e <= tol for e in found)
        parts = [f"{k} {_err(a)} / {_err(b)}" for k, (a, b) in errors.items()]
        measured = "; ".join(parts + ([] if op.grad else ["no grad"]) + problems)
        return Row("correctness", op.name, label, measured, f"{tol:.0e}", _verdict(ok)), rerun
    except Exception as error:
        return Row("correctness", op.name, label, failure(error), f"{tol:.0e}", "FAIL"), None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# Host syncs.


SYNC_HINT = "synchroniz"  # in the message of the error the sync debug mode raises
SYNC_BOUND = 'sync_debug_mode("error")'


@contextlib.contextmanager
def sync_debug_error(device: torch.device) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block (a no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def sync_problem(run: Callable[[], object], device: torch.device) -> str | None:
    """None when ``run`` neither syncs with the host nor fails; else what happened."""
    try:
        with sync_debug_error(device):
            run()
    except Exception as error:
        kind = "synced" if SYNC_HINT in str(error) else "failed"
        return f"{kind}: {failure(error)}"
    return None


def host_sync_row(op: Op, reruns: dict[str, Callable[[], object] | None], device) -> Row:
    if not op.step_path:
        return Row(
            "host sync", op.name, "-", "left out: it reads to the host by design", "-", "n/a"
        )
    if device.type != "cuda":
        return Row("host sync", op.name, "-", "n/a on CPU", "-", "n/a")
    found = []
    for label, rerun in reruns.items():
        if rerun is None:
            found.append(f"{label}: not run (its correctness check raised)")
        elif problem := sync_problem(rerun, device):
            found.append(f"{label}: {problem}")
    measured = "; ".join(found) or ("fwd+bwd" if op.grad else "fwd") + ": no host sync"
    return Row("host sync", op.name, ", ".join(reruns), measured, SYNC_BOUND, _verdict(not found))


# The training step.


def training_step_rows(device: torch.device, sizes: "Sizes") -> list[Row]:
    """A toy SAE trained for a few steps; every stage after the warm-up step is sync-checked."""
    d_model, d_sae, batch, steps = sizes.sae
    g = torch.Generator(device).manual_seed(3)

    def param(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=device) * scale).requires_grad_()

    enc, dec = param(d_model, d_sae, scale=d_model**-0.5), param(d_sae, d_model, scale=0.1)
    b_enc, b_dec = param(d_sae, scale=0.0), param(d_model, scale=0.0)
    threshold = (torch.rand(d_sae, generator=g, device=device) * 0.1).requires_grad_()
    optimizer = torch.optim.Adam([enc, b_enc, dec, b_dec, threshold], lr=1e-3)
    xs = [torch.randn(batch, d_model, generator=g, device=device) for _ in range(steps)]
    keep = torch.rand(batch, generator=g, device=device) > 0.1
    weights = torch.rand(batch, generator=g, device=device)
    c: dict[str, Any] = {
        "mean": sl.StreamingMean.empty(device=device),
        "fvu": sl.StreamingFVU.empty((d_model,), device=device),
        "losses": [],
    }

    def forward(c: dict[str, Any]) -> None:
        c["pre"] = c["x"] @ enc + b_enc
        c["z"] = torch.relu(c["pre"])
        c["x_hat"] = c["z"] @ dec + b_dec

    def backward(c: dict[str, Any]) -> None:
        loss = c["l2"] + c["l2_masked"] + c["fused_l2"] + 1e-2 * c["fvu_loss"]
        loss = loss + 1e-3 * (c["l1"] + c["l1_weighted"] + c["fused_l1"] + c["lp"])
        loss = loss + 1e-4 * c["jumprelu"]
        loss.backward()
        c["losses"].append(loss.detach())

    def step(c: dict[str, Any]) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def term(key: str, fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
        def run(c: dict[str, Any]) -> None:
            c[key] = fn(c)

        return run

    def l2_rows_of(c: dict[str, Any]) -> torch.Tensor:
        return sl.l2_reconstruction(c["x_hat"].detach(), c["x"], reduce="none")

    stages = {
        "SAE forward: encoder, ReLU, decoder (torch)": forward,
        "l2_reconstruction": term("l2", lambda c: sl.l2_reconstruction(c["x_hat"], c["x"])),
        "l2_reconstruction(mask=bool)": term(
            "l2_masked", lambda c: sl.l2_reconstruction(c["x_hat"], c["x"], mask=keep)
        ),
        "fused_l2_reconstruction": term(
            "fused_l2", lambda c: sl.fused_l2_reconstruction(c["x_hat"], c["x"])
        ),
        "fraction_of_variance_unexplained(mask=bool)": term(
            "fvu_loss", lambda c: sl.fraction_of_variance_unexplained(c["x_hat"], c["x"], mask=keep)
        ),
        "l1_absolute(weight=W_dec.norm(dim=1))": term(
            "l1", lambda c: sl.l1_absolute(c["z"], weight=dec.norm(dim=1))
        ),
        "l1_absolute(mask=weights)": term(
            "l1_weighted", lambda c: sl.l1_absolute(c["z"], mask=weights)
        ),
        "fused_l1_absolute": term("fused_l1", lambda c: sl.fused_l1_absolute(c["z"])),
        "lp_sparsity(p=0.5)": term("lp", lambda c: sl.lp_sparsity(c["z"], p=0.5)),
        "jumprelu_l0": term(
            "jumprelu", lambda c: sl.jumprelu_l0(c["pre"], threshold, bandwidth=0.1)
        ),
        "l0_norm": term("l0", lambda c: sl.l0_norm(c["z"])),
        "loss.backward()": backward,
        "torch.optim.Adam step, zero_grad (torch)": step,
        "l2_reconstruction(reduce='none'), detached": term("rows", l2_rows_of),
        "StreamingMean.update(mask=bool)": term(
            "mean", lambda c: c["mean"].update(c["rows"], mask=keep)
        ),
        "StreamingMean.merge, compute": term(
            "mean_now", lambda c: c["mean"].merge(c["mean"]).compute()
        ),
        "StreamingFVU.update(mask=bool)": term(
            "fvu", lambda c: c["fvu"].update(c["x_hat"], c["x"], mask=keep)
        ),
        "StreamingFVU.merge, compute": term(
            "fvu_now", lambda c: c["fvu"].merge(c["fvu"]).compute()
        ),
    }

    problems: dict[str, list[str]] = {name: [] for name in stages}
    for index, x in enumerate(xs):
        c["x"] = x
        for name, stage in stages.items():
            if index == 0:  # the warm-up step: compiles the fused kernels, makes Adam's state
                try:
                    stage(c)
                    continue
                except Exception as error:
                    problems[name].append(f"the warm-up step failed: {failure(error)}")
                    break
            problem = sync_problem(lambda stage=stage: stage(c), device)
            if problem is None:
                continue
            problems[name].append(f"step {index}: {problem}")
            try:  # carry on without the check, to test the stages after this one
                stage(c)
            except Exception as error:
                problems[name].append(f"step {index}, rerun: {failure(error)}")
                break
        if index == 0 and any(problems.values()):
            break

    on_cuda = device.type == "cuda"
    rows = []
    for name, found in problems.items():
        if found:
            rows.append(
                Row("training step", name, "float32", "; ".join(found[:2]), SYNC_BOUND, "FAIL")
            )
        elif on_cuda:
            text = f"no host sync in {len(xs) - 1} steps"
            rows.append(Row("training step", name, "float32", text, SYNC_BOUND, "PASS"))
    losses = [float(v) for v in c["losses"]]
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    check = f"toy SAE: d_model {d_model}, d_sae {d_sae}, batch {batch}, Adam"
    text = f"{len(stages)} stages x {len(losses)} steps, loss " + " -> ".join(
        f"{v:.4g}" for v in losses
    )
    if not on_cuda:
        text += "; sync check n/a on CPU"
    verdict = _verdict(finite) if on_cuda or not finite else "n/a"
    rows.append(Row("training step", check, "float32", text, "finite loss", verdict))
    return rows


# Bandwidth.


class Clock:
    """Median time of one call, in ms: CUDA events on CUDA, perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int = 3) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, run: Callable[[], object]) -> float:
        for _ in range(self.warmup):  # and the one-time compiles
            run()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


@dataclasses.dataclass(frozen=True)
class Yardsticks:
    """What every op of one size is compared with."""

    size: str
    where: str
    mse: float  # F.mse_loss(d, s, reduction="none").mean(-1).mean(0), ms
    mse_bwd: float  # the same, forward + backward to d


def yardstick_rows(g: Inputs, clock: Clock, where: str) -> tuple[Yardsticks, list[Row]]:
    d, s = g.act("d"), g.act("s")
    size = f"{g.batch}x{g.feature}"
    floor = clock(lambda: (d.sum(), s.sum()))
    gbps = 2 * d.numel() * d.element_size() / (floor * 1e-3) / 1e9
    mse = clock(lambda: F.mse_loss(d, s, reduction="none").mean(-1).mean(0))
    d_grad = d.detach().requires_grad_()

    def mse_both() -> object:
        return torch.autograd.grad(F.mse_loss(d_grad, s, reduction="none").mean(-1).mean(0), d_grad)

    mse_bwd = clock(mse_both)
    floor_text = f"{floor:.3f} ms = {gbps:.0f} GB/s"
    mse_text = f"fwd {mse:.3f} ms = {mse / floor:.2f}x floor; fwd+bwd (grad of d) {mse_bwd:.3f} ms"
    rows = [
        Row(
            "bandwidth",
            f"read floor: d.sum(); s.sum() @ {size}",
            "float32",
            floor_text,
            where,
            "info",
        ),
        Row(
            "bandwidth",
            f"F.mse_loss(d, s).mean(-1).mean(0) @ {size}",
            "float32",
            mse_text,
            where,
            "info",
        ),
    ]
    return Yardsticks(size, where, mse, mse_bwd), rows


def bandwidth_rows(op: Op, g: Inputs, clock: Clock, yard: Yardsticks) -> list[Row]:
    """The forward and forward + backward times of one op at one size, as ratios."""

    def row(check: str, text: str, result: str = "info") -> Row:
        return Row("bandwidth", f"{check} @ {yard.size}", "float32", text, yard.where, result)

    try:
        fallbacks, _ = fallback_marks()
        inputs = op.make(g)
        names = op.floor or [
            k
            for k, v in inputs.items()
            if v.is_floating_point() and v.ndim >= 2 and len(v) == g.batch
        ]
        reads = [inputs[k] for k in names]
        floor = clock(lambda: [x.sum() for x in reads])
        fwd = clock(lambda: op.call(inputs))
        text = f"{fwd:.3f} ms = {fwd / floor:.2f}x floor, {fwd / yard.mse:.2f}x F.mse_loss"
        if op.formula:
            text += f", {fwd / clock(lambda: op.formula(inputs)):.2f}x plain formula"
        rows = [row(f"{op.name} fwd", text)]
        wanted = op.grad if op.bench_grad is None else op.bench_grad
        if wanted:
            leaves = {
                k: v.detach().requires_grad_() if k in wanted else v for k, v in inputs.items()
            }
            wrt = [leaves[k] for k in wanted]

            def both(fn: Callable[[Tensors], Outputs]) -> Callable[[], object]:
                def run() -> object:
                    out = as_tuple(fn(leaves))[0]
                    return torch.autograd.grad(out, wrt, torch.ones_like(out))

                return run

            fwd_bwd = clock(both(op.call))
            text = f"{fwd_bwd:.3f} ms = {fwd_bwd / floor:.2f}x floor, "
            text += f"{fwd_bwd / yard.mse_bwd:.2f}x F.mse_loss fwd+bwd"
            if op.formula and op.formula_grads is None:
                text += f", {fwd_bwd / clock(both(op.formula)):.2f}x plain formula"
            rows.append(row(f"{op.name} fwd+bwd (grad of {', '.join(wanted)})", text))
        if op.compiles and (marks := fallback_marks())[0] > fallbacks:
            text = f"the fused path fell back to the eager kernels: {marks[1]}"
            rows.append(row(op.name, text, "FAIL"))
        return rows
    except Exception as error:
        return [row(op.name, failure(error), "FAIL")]


# The run.


@dataclasses.dataclass(frozen=True)
class Sizes:
    correctness: tuple[int, tuple[int, ...], int]  # batch, component, feature
    sae: tuple[int, int, int, int]  # d_model, d_sae, batch, steps (the first is a warm-up)
    bench: tuple[tuple[int, int], ...]  # (batch, feature) of each size
    reps: int
    time_fused: bool = True  # False: no bandwidth rows for the fused functions (compiles only)


HBM_SIZES = ((16384, 2048), (4096, 16384))  # 128 and 256 MiB of float32 per input
SIZES = {
    ("cuda", False): Sizes((256, (4,), 1024), (512, 4096, 1024, 4), HBM_SIZES, 25),
    ("cuda", True): Sizes((32, (2,), 64), (64, 256, 128, 3), ((1024, 512),), 5),
    ("cpu", False): Sizes((64, (3,), 256), (64, 256, 128, 3), ((1024, 512),), 5),
    ("cpu", True): Sizes((16, (2,), 32), (16, 64, 32, 3), ((64, 32),), 2, time_fused=False),
}


def describe(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"sae_losses {sl.__version__}"]
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        parts.insert(0, f"{torch.cuda.get_device_name(device)} ({memory:.0f} GiB)")
        parts.append(f"CUDA {torch.version.cuda}")
        try:
            import triton

            parts.append(f"triton {triton.__version__}")
        except ImportError:
            parts.append("no triton: the fused functions cannot compile")
    else:
        parts.insert(0, f"cpu, {torch.get_num_threads()} threads")
    return ", ".join(parts)


def run_sections(device: torch.device, sizes: Sizes, table: Table, deadline: float) -> None:
    table.add(*coverage_rows(list(sl.__all__)))

    batch, component, feature = sizes.correctness
    reruns: dict[str, dict[str, Callable[[], object] | None]] = {}
    for index, op in enumerate(OPS):
        try:
            base = op.make(Inputs(batch, component, feature, seed=100 + index))
        except Exception as error:
            table.add(Row("correctness", op.name, "-", failure(error), "-", "FAIL"))
            continue
        reruns[op.name] = {}
        for dtype in DTYPES:
            log(f"correctness: {op.name}, {dtype_name(dtype)}")
            row, rerun = check_op(op, base, dtype, device)
            table.add(row)
            reruns[op.name][dtype_name(dtype)] = rerun

    log("host sync")
    table.add(*(host_sync_row(op, reruns[op.name], device) for op in OPS if op.name in reruns))
    log("training step")

    try:
        table.add(*training_step_rows(device, sizes))
    except Exception as error:
        table.add(Row("training step", "toy SAE", "float32", failure(error), "-", "FAIL"))

    clock = Clock(device, sizes.reps)
    where = "HBM" if device.type == "cuda" else "CPU timing of small inputs, not HBM"
    for batch, feature in sizes.bench:
        g = Inputs(batch, (), feature, device=device, dtype=torch.float32, seed=1)
        try:
            yard, rows = yardstick_rows(g, clock, where)
            table.add(*rows)
        except Exception as error:
            table.add(
                Row("bandwidth", f"{batch}x{feature}", "float32", failure(error), where, "FAIL")
            )
            continue
        for op in OPS:
            if not op.bench:
                continue
            if op.compiles and not sizes.time_fused:
                text = "skipped in --quick on the CPU: its time would be compile time"
                table.add(Row("bandwidth", f"{op.name} @ {yard.size}", "float32", text, "-", "n/a"))
                continue
            if time.perf_counter() > deadline:
                text = "skipped: the run's time budget is spent"
                table.add(Row("bandwidth", f"{op.name} @ {yard.size}", "float32", text, "-", "n/a"))
                continue
            log(f"bandwidth: {op.name} @ {yard.size}")
            table.add(*bandwidth_rows(op, g, clock, yard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per median")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing checked (`--device cpu` runs the correctness paths here)")
        return 0
    start = time.perf_counter()
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    sizes = SIZES[(device.type, args.quick)]
    if args.reps:
        sizes = dataclasses.replace(sizes, reps=args.reps)
    warnings.showwarning = _record_warning
    torch.manual_seed(0)

    batch, component, feature = sizes.correctness
    print(f"sae_losses check on {describe(device)}\n")
    print(
        f"Correctness on {(batch, *component, feature)}: max |got - ref| / max |ref| against the "
        "op on float64 CPU copies of the same inputs / against a plain-torch float64 formula. "
        f"Toy SAE (d_model, d_sae, batch) = {sizes.sae[:3]}. Bandwidth: median of {sizes.reps} "
        f"at {', '.join(f'{b}x{f}' for b, f in sizes.bench)} float32.\n"
    )
    table = Table()
    table.start()
    try:
        run_sections(device, sizes, table, start + BUDGET_S)
    except Exception as error:  # a bug in this script: still a row, and still exit 0
        table.add(Row("run", "gpu_check.py", "-", failure(error), "-", "FAIL"))
    counts = {r: sum(row.result == r for row in table.rows) for r in ("PASS", "FAIL", "WARN")}
    elapsed = time.perf_counter() - start
    print(
        f"\n{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['WARN']} WARN in {elapsed:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
