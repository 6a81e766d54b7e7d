"""The one registry of public terms that the contract tests are parametrised over.

The mask, ``torch.func``, ``DTensor``, ``torch.compile``, saved-for-backward and float64-reference
tests take a :class:`Term` from ``TERMS``: they draw its inputs from a seed, call it, and compare
with its float64 reference or with itself on other inputs. Adding a term to the library is one
entry here (its schema: tests/term_schema.py); ``test_terms.py`` fails while a public
function has none.
"""

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from helpers import masked_reduce, randn
from term_schema import REDUCE_MODES, Term, arg

__all__ = ["NOT_TERMS", "REDUCE_MODES", "TERMS", "cases", "cases_with_masks", "cases_with_reduce"]


def activations(shape, dtype, seed):
    """Normal values: decoded or source activations, pre-activations."""
    return randn(*shape, dtype=dtype, seed=seed)


def latents(shape, dtype, seed):
    """Sparse latents: about 38% exact zeros (as after a ReLU); the rest have |z| >= 0.5, away
    from the kink of |z| for finite differences."""
    z = randn(*shape, dtype=torch.float64, seed=seed)
    return torch.where(z.abs() < 0.5, 0.0, z).to(dtype)


def weights(shape, dtype, seed):
    """Positive per-feature weights, such as decoder column norms: 0.5 + |N(0, 1)|."""
    return (randn(*shape, dtype=torch.float64, seed=seed).abs() + 0.5).to(dtype)


def thresholds(shape, dtype, seed):
    """JumpReLU thresholds around 0: 0.3 N(0, 1)."""
    return (0.3 * randn(*shape, dtype=torch.float64, seed=seed)).to(dtype)


def dead_latents(shape, dtype, seed):
    """A bool mask of dead latents: about half, and always the first."""
    dead = randn(*shape, dtype=torch.float64, seed=seed) > 0
    dead[..., 0] = True
    return dead


# --- float64 references ---------------------------------------------------------------------------


def per_row(rows: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The reference of a term with ``reduce``: its float64 rows, then the mask and the reduce."""

    def reference(*inputs, reduce, mask=None):
        return masked_reduce(rows(*(t.double() for t in inputs)), reduce, mask)

    return reference


def matryoshka_reference(z, x, w, b, *, reduce, mask=None):
    """The L2 of each nested prefix's decode, ``(batch, G)``, then the mask and the reduce."""
    z, x, w, b = (t.double() for t in (z, x, w, b))
    rows = [((b + z[:, :width] @ w[:width]) - x).square().mean(-1) for width in widths_of(z)]
    return masked_reduce(torch.stack(rows, -1), reduce, mask)


def widths_of(latents):
    """Two nested widths, half the latents and all of them (one when there is one latent)."""
    d_sae = latents.shape[-1]
    return tuple(sorted({max(1, d_sae // 2), d_sae}))


def auxk_decode(pre, dead, w, k_aux):
    """ê dense: each row's ``k_aux`` largest dead pre-activations (relu) times decoder rows."""
    pre, w = pre.double(), w.double()
    k = min(k_aux, int(dead.sum()))
    top = pre.masked_fill(~dead, -torch.inf).topk(k, dim=-1).indices
    return (pre.gather(-1, top).relu()[..., None] * w[top]).sum(-2)


K_AUX = 2


def auxk_options(pre):
    return {"k_aux": min(K_AUX, pre.shape[-1])}


def fvu_reference(decoded, source, *, reduce=None, mask=None):
    """Float64 two-pass FVU per component over the kept rows; NaN below 2 rows."""
    d, s = decoded.double(), source.double()
    if mask is not None:
        d, s = d[mask], s[mask]
    error = (d - s).square().sum((0, -1))
    variance = (s - s.mean(0)).square().sum((0, -1))
    return torch.where(torch.tensor(d.shape[0] >= 2), error / variance, torch.nan)


# --- the registry ---------------------------------------------------------------------------------

L2_ROWS = per_row(lambda d, s: (d - s).square().mean(-1))
L1_ROWS = per_row(lambda z: z.abs().sum(-1))
WEIGHTED_L1_ROWS = per_row(lambda z, w: (z.abs() * w).sum(-1))

TERMS = [
    Term(
        "l2_reconstruction",
        "l2_reconstruction",
        bind=lambda d, s: ((d, s), {}),
        batched=(activations, activations),
        reference=L2_ROWS,
        grads=(0, 1),
    ),
    Term(
        "l1_absolute",
        "l1_absolute",
        bind=lambda z: ((z,), {}),
        batched=(latents,),
        reference=L1_ROWS,
        grads=(0,),
    ),
    Term(
        "l1_absolute_weighted",
        "l1_absolute",
        bind=lambda z, w: ((z,), {"weight": w}),
        batched=(latents,),
        params=(weights,),
        reference=WEIGHTED_L1_ROWS,
        grads=(0, 1),
    ),
    Term(
        "lp_sparsity",
        "lp_sparsity",
        bind=lambda z, w: ((z,), {"p": 0.5, "weight": w}),
        batched=(latents,),
        params=(weights,),
        reference=per_row(lambda z, w: (z * w).abs().pow(0.5).sum(-1)),
        grads=(0, 1),
    ),
    Term(
        "lp_sparsity_root",
        "lp_sparsity",
        bind=lambda z: ((z,), {"p": 3.0, "root": True}),
        batched=(latents,),
        reference=per_row(lambda z: z.abs().pow(3.0).sum(-1).pow(1 / 3.0)),
        grads=(0,),
    ),
    Term(
        "tanh_sparsity",
        "tanh_sparsity",
        bind=lambda z, w: ((z,), {"scale": 4.0, "weight": w}),
        batched=(latents,),
        params=(weights,),
        reference=per_row(lambda z, w: torch.tanh(4.0 * w * z.abs()).sum(-1)),
        grads=(0, 1),
        gradients_to_largest=True,
    ),
    Term(
        "l0_norm",
        "l0_norm",
        bind=lambda z: ((z,), {"threshold": 0.5}),
        batched=(activations,),
        reference=per_row(lambda z: (z.abs() > 0.5).sum(-1).double()),
    ),
    # A straight-through gradient for the threshold only (bandwidth 1: many rows in the window).
    Term(
        "jumprelu_l0",
        "jumprelu_l0",
        bind=lambda pre, threshold: ((pre, threshold), {"bandwidth": 1.0}),
        batched=(activations,),
        params=(thresholds,),
        reference=per_row(lambda pre, threshold: (pre > threshold).sum(-1).double()),
        grads=(1,),
    ),
    Term(
        "cosine_similarity",
        "cosine_similarity",
        bind=lambda d, s: ((d, s), {}),
        batched=(activations, activations),
        reference=per_row(lambda d, s: (d * s).sum(-1) / (d.norm(dim=-1) * s.norm(dim=-1))),
        grads=(0, 1),
        value_scale=1.0,
    ),
    Term(
        "l2_norm_ratio",
        "l2_norm_ratio",
        bind=lambda d, s: ((d, s), {}),
        batched=(activations, activations),
        reference=per_row(lambda d, s: d.norm(dim=-1) / s.norm(dim=-1)),
        grads=(0, 1),
    ),
    # The targets are drawn as scores over the vocabulary: the target is each row's argmax.
    Term(
        "cross_entropy",
        "cross_entropy",
        bind=lambda logits, scores: ((logits, scores.argmax(-1)), {}),
        batched=(activations, activations),
        reference=per_row(
            lambda z, u: z.logsumexp(-1) - z.gather(-1, u.argmax(-1, keepdim=True))[..., 0]
        ),
        grads=(0,),
        known_failures=(
            (
                "dtensor",
                "vocab-sharded logits: AssertionError in DTensor's Partial reduce, from "
                "(picked_exp + rest) in _minus_log_probability",
            ),
        ),
    ),
    Term(
        "kl_divergence",
        "kl_divergence",
        bind=lambda r, z: ((r, z), {}),
        batched=(activations, activations),
        reference=per_row(
            lambda r, z: (r.softmax(-1) * (r.log_softmax(-1) - z.log_softmax(-1))).sum(-1)
        ),
        grads=(0, 1),
        # A sum of signed terms: in float32 it is 1e-6 off, 10 roundings, at 9 x 12.
        rtol=((torch.float32, 1e-5),),
    ),
    Term(
        "fraction_of_variance_unexplained",
        "fraction_of_variance_unexplained",
        bind=lambda d, s: ((d, s), {}),
        batched=(activations, activations),
        reference=fvu_reference,
        grads=(0, 1),
        reduce=False,
        masks="bool",
        ratio=True,
        gradients_to_largest=True,
    ),
    Term(
        "matryoshka_l2",
        "matryoshka_l2",
        bind=lambda z, x, w, b: ((z, w, x), {"widths": widths_of(z), "decoder_bias": b}),
        batched=(arg(latents, "batch", "feature"), arg(activations, "batch", "model")),
        params=(arg(activations, "feature", "model"), arg(activations, "model")),
        sizes=(("model", 6),),
        reference=matryoshka_reference,
        grads=(0, 1, 2, 3),
        blocked=False,
        gradients_to_largest=True,  # the decoder's and bias's sum residuals of both signs
        # Half inputs: each segment's decode is rounded to half once, and the residual cancels.
        rtol=((torch.bfloat16, 3e-2), (torch.float16, 5e-3)),
        known_failures=(("dtensor", "mixes plain tensors with DTensors (aten.add, aten.where)"),),
    ),
    Term(
        "auxk_loss",
        "auxk_loss",
        bind=lambda pre, e, dead, w: ((pre, dead, w, e), auxk_options(pre)),
        batched=(arg(activations, "batch", "feature"), arg(activations, "batch", "model")),
        params=(arg(dead_latents, "feature"), arg(activations, "feature", "model")),
        sizes=(("model", 6),),
        reference=lambda pre, e, dead, w, *, reduce, mask=None: fvu_reference(
            auxk_decode(pre, dead, w, K_AUX), e, mask=mask
        ),
        grads=(0, 3),  # the residual is detached inside: AuxK trains the dead latents only
        reduce=False,
        masks="bool",
        blocked=False,  # its (batch, latent) top-k is not computed in row blocks
        ratio=True,
        gradients_to_largest=True,
        # Half inputs: ê is rounded to half once per row (documented), then its FVU is taken.
        rtol=((torch.bfloat16, 2e-2), (torch.float16, 2e-3)),
        known_failures=(
            ("dtensor", "F.embedding_bag gets a plain index tensor and DTensor weights"),
        ),
    ),
]


def compiled_twin(name, function):
    """The entry of a compiled (fused) term: its eager twin's, calling ``function``."""
    twin = {term.name: term for term in TERMS}[name]
    return dataclasses.replace(twin, name=f"fused_{name}", function=function, eager=twin.function)


# Each fused term has the same inputs, gradients and reference as its eager twin.
TERMS += [
    compiled_twin("l2_reconstruction", "fused_l2_reconstruction"),
    compiled_twin("l1_absolute_weighted", "fused_l1_absolute"),
    compiled_twin("l0_norm", "fused_l0_norm"),
    compiled_twin("jumprelu_l0", "fused_jumprelu_l0"),
    compiled_twin("lp_sparsity", "fused_lp_sparsity"),
    compiled_twin("lp_sparsity_root", "fused_lp_sparsity"),
    compiled_twin("tanh_sparsity", "fused_tanh_sparsity"),
    compiled_twin("fraction_of_variance_unexplained", "fused_fraction_of_variance_unexplained"),
]

# Public names that are not terms, and where they are tested.
NOT_TERMS = {
    "PendingAllReduce": "tests/test_all_reduce.py",
    "StreamingFVU": "tests/test_fvu.py, tests/test_streaming.py",
    "StreamingMean": "tests/test_streaming.py",
    "StreamingReconstructionBias": "tests/test_downstream.py",
    "StreamingSpliceScores": "tests/test_downstream.py",
    "TokensSinceFired": "tests/test_dead_latents.py",
    # A reconstruction in the inputs' dtype, not a loss: auxk_loss's entry runs it in every
    # contract; its own tests are in tests/test_auxk.py.
    "auxk_reconstruction": "tests/test_auxk.py",
    "__version__": "tests/test_packaging.py",
    "all_reduce": "tests/test_all_reduce.py, tests/test_all_reduce_mismatched_trees.py",
}


def marks_of(term, contract=None):
    """The compile mark of a compiled term, and xfail where it is known to fail ``contract``."""
    marks = [pytest.mark.compile] if term.compiled else []
    marks += [
        pytest.mark.xfail(strict=True, reason=reason)
        for name, reason in term.known_failures
        if name == contract
    ]
    return marks


def cases(where=lambda term: True, *, compiled=True, contract=None):
    """``TERMS`` as pytest params (id: the name), compiled terms with the compile mark.

    ``compiled=False`` leaves the compiled terms out: for tests that would compile them at many
    signatures, or whose assertions do not apply to them. ``contract``: the name of the tests'
    contract, for :attr:`Term.known_failures`.
    """
    return [
        pytest.param(term, id=term.name, marks=marks_of(term, contract))
        for term in TERMS
        if where(term) and (compiled or not term.compiled)
    ]


def cases_with_masks(where=lambda term: True, *, compiled=True, kinds=("none", "bool", "float")):
    """``(term, mask kind)`` pytest params: each of ``kinds`` the term takes."""
    return [
        pytest.param(term, kind, id=f"{term.name}-{kind}", marks=param.marks)
        for param in cases(where, compiled=compiled)
        for term in param.values
        for kind in term.mask_kinds
        if kind in kinds
    ]


def cases_with_reduce(where=lambda term: True, *, compiled=True, reduces=REDUCE_MODES):
    """``(term, reduce)`` pytest params: each of ``reduces`` the term takes, or None once."""
    params = []
    for param in cases(where, compiled=compiled):
        (term,) = param.values
        for reduce in [r for r in term.reduces if r in reduces] if term.reduce else [None]:
            params.append(pytest.param(term, reduce, id=f"{term.name}-{reduce}", marks=param.marks))
    return params


def term(name):
    """The entry called ``name``."""
    (found,) = [t for t in TERMS if t.name == name]
    return found
