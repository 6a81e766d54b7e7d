"""The seed, ai-safety-foundation/sparse_autoencoder: the real release sparse-autoencoder 1.10.0
(peers/seed.txt), and the expected values of its own tests.

The 1.10.0 release has stateless loss modules, in ``site-packages/sparse_autoencoder/loss/``:

- ``decoded_activations_l2.py``: ``L2ReconstructionLoss(reduction)``: ``mse_loss(source,
  decoded, reduction="none")``, then ``.mean(dim=-1)`` (MEAN, the default), ``.sum(dim=-1)``
  (SUM) or nothing (NONE), per row.
- ``learned_activations_l1.py``: ``LearnedActivationsL1Loss(l1_coefficient)``:
  ``torch.abs(learned).sum(dim=-1) * l1_coefficient`` per row.
- ``abstract_loss.py``: ``AbstractLoss.batch_loss``: the per-row loss, ``.mean(dim=0)`` or
  ``.sum(dim=0)`` over the batch; ``reducer.py``: ``LossReducer`` sums its children.

The torchmetrics classes ``L2ReconstructionLoss`` and ``L1AbsoluteLoss`` (and
``SparseAutoencoderLoss``, ``L0NormMetric``) exist only on the repository's main branch, never in
a release; their tests are re-expressed at the end of this file from the commit b6ba6cb.

The release's package ``__init__`` does not import on torch 2.13: ``sparse_autoencoder/
autoencoder/model.py`` does ``from torch.serialization import FILE_LIKE``, a name torch has
removed, and ``__init__`` imports that module first. So the loss modules are imported from
their files, under a bare ``sparse_autoencoder`` package whose ``__init__`` is not run (see
``seed_module``); the loss modules themselves import only ``loss``, ``metrics.abstract_metric``
and ``tensor_types``, which do import on torch 2.13.

Run with ``make test-peers`` (this file needs the .peer-venvs/seed venv).
"""

import importlib
import importlib.util
import re
import sys
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from peer_support import F32, F64, close, close_grads, randn
from sae_losses import l0_norm, l1_absolute, l2_reconstruction

SPEC = importlib.util.find_spec("sparse_autoencoder")  # finds the package, does not import it
PACKAGE_DIR = Path(SPEC.submodule_search_locations[0])


def test_the_installed_version_is_the_pinned_one():
    # docs/peer_conventions.md states every row for this version (peers/*.txt pins it).
    assert version("sparse-autoencoder") == "1.10.0"


def seed_module(name):
    """``sparse_autoencoder.<name>`` from its file, without running the package ``__init__``
    (it fails on torch 2.13: ``torch.serialization.FILE_LIKE`` is gone)."""
    if "sparse_autoencoder" not in sys.modules:
        package = types.ModuleType("sparse_autoencoder")
        package.__path__ = [str(PACKAGE_DIR)]
        sys.modules["sparse_autoencoder"] = package
    return importlib.import_module(f"sparse_autoencoder.{name}")


L2ReconstructionLoss = seed_module("loss.decoded_activations_l2").L2ReconstructionLoss
LearnedActivationsL1Loss = seed_module("loss.learned_activations_l1").LearnedActivationsL1Loss
LossReducer = seed_module("loss.reducer").LossReducer
LossReductionType = seed_module("loss.abstract_loss").LossReductionType
MEAN, SUM, NONE = LossReductionType.MEAN, LossReductionType.SUM, LossReductionType.NONE

SHAPES = [(7, 5), (33, 16), (12, 3, 8)]


def reconstruction(shape, seed):
    source = randn(*shape, seed=seed)
    return source + 0.3 * randn(*shape, seed=seed + 100), source


def test_the_package_init_fails_on_this_torch():
    # Why the modules are loaded from their files: importing the package runs
    # sparse_autoencoder/__init__.py, which reaches autoencoder/model.py's FILE_LIKE import.
    saved = {k: v for k, v in sys.modules.items() if k.startswith("sparse_autoencoder")}
    for name in saved:
        del sys.modules[name]
    try:
        with pytest.raises(ImportError, match="FILE_LIKE"):
            importlib.import_module("sparse_autoencoder")
    finally:
        for name in [k for k in sys.modules if k.startswith("sparse_autoencoder")]:
            del sys.modules[name]
        sys.modules.update(saved)


# === the release's loss modules ==============================================================


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
def test_l2_reconstruction_loss_is_l2_reconstruction(shape, seed):
    # decoded_activations_l2.py, reduction MEAN (the default): the mean over features per row,
    # the convention here. SUM is SAELens's (times the feature count). Arguments are (source,
    # learned, decoded) there, (decoded, source) here.
    decoded, source = reconstruction(shape, seed)
    decoded.requires_grad_()
    learned = torch.zeros((*shape[:-1], 4), dtype=torch.float64)
    theirs = L2ReconstructionLoss().forward(source, learned, decoded)
    ours = l2_reconstruction(decoded, source, reduce="none")
    close(ours, theirs, F64)
    close_grads(ours.sum(), theirs.sum(), [decoded], F64)
    theirs_sum = L2ReconstructionLoss(SUM).forward(source, learned, decoded)
    close(ours * shape[-1], theirs_sum, F64)
    # abstract_loss.py batch_loss: the batch mean or sum of those rows.
    for reduction, reduce in ((MEAN, "mean"), (SUM, "sum")):
        theirs_batch = L2ReconstructionLoss().batch_loss(source, learned, decoded, reduction)
        ours_batch = l2_reconstruction(decoded, source, reduce=reduce)
        close(ours_batch, theirs_batch, F64)
        close_grads(ours_batch.sum(), theirs_batch.sum(), [decoded], F64)
    # NONE keeps every element: (x - x_hat)^2, which no call here returns.
    assert L2ReconstructionLoss(NONE).forward(source, learned, decoded).shape == shape


@pytest.mark.parametrize("coefficient", [0.001, 0.1, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_learned_activations_l1_loss_is_l1_absolute(shape, coefficient):
    # learned_activations_l1.py: abs(learned).sum(-1) * l1_coefficient per row, and its
    # scalar_loss_with_log logs the batch mean both without and with the coefficient.
    learned = torch.where(randn(*shape, seed=2).abs() < 0.4, 0.0, randn(*shape, seed=2))
    learned.requires_grad_()
    unused = torch.zeros_like(learned)
    loss = LearnedActivationsL1Loss(coefficient)
    theirs = loss.forward(unused, learned, unused)
    ours = coefficient * l1_absolute(learned, reduce="none")
    close(ours, theirs, F64)
    close_grads(ours.sum(), theirs.sum(), [learned], F64)
    result, metrics = loss.scalar_loss_with_log(unused, learned, unused)
    close(coefficient * l1_absolute(learned), result, F64)
    logged = {m.postfix: m.component_wise_values for m in metrics}
    close(l1_absolute(learned).reshape(-1), logged["learned_activations_l1"], F64)


def test_component_wise_l1_coefficient():
    # learned_activations_l1.py accepts a (component,) coefficient tensor; here, multiply the
    # (component,) result by it.
    learned = randn(6, 3, 4, seed=3)
    coefficient = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    theirs = LearnedActivationsL1Loss(coefficient).batch_loss(learned, learned, learned)
    close(coefficient * l1_absolute(learned), theirs, F64)


def test_loss_reducer_is_the_sum():
    # reducer.py LossReducer(L2ReconstructionLoss(), LearnedActivationsL1Loss(c)): the sum of
    # the children's per-row losses; batch_loss averages it over the batch.
    decoded, source = reconstruction((10, 3, 6), 4)
    learned = randn(10, 3, 12, seed=5).relu()
    reducer = LossReducer(L2ReconstructionLoss(), LearnedActivationsL1Loss(0.01))
    theirs = reducer.batch_loss(source, learned, decoded)
    close(l2_reconstruction(decoded, source) + 0.01 * l1_absolute(learned), theirs, F64)


def test_float32_inputs_agree_to_float32_rounding():
    # The release computes in the input dtype: float32 in, float32 sums. Ours accumulates in
    # float32 too (the dtype policy), in a different order, so they agree to float32 rounding.
    decoded, source = (t.float() for t in reconstruction((256, 64), 6))
    learned = torch.zeros(256, 1)
    theirs = L2ReconstructionLoss().batch_loss(source, learned, decoded)
    close(l2_reconstruction(decoded, source), theirs, F32)


def test_single_component_shape():
    # (batch, 1, feature): the release returns (1,) from batch_loss, as here. (The torchmetrics
    # classes on GitHub main return a scalar: see test_b6ba6cb_* below.)
    decoded, source = reconstruction((9, 1, 4), 7)
    learned = torch.zeros(9, 1, 2, dtype=torch.float64)
    theirs = L2ReconstructionLoss().batch_loss(source, learned, decoded)
    ours = l2_reconstruction(decoded, source)
    assert theirs.shape == ours.shape == (1,)
    close(ours, theirs, F64)


# === the release's own tests (sparse_autoencoder/loss/tests/ in the 1.10.0 wheel) =============


def test_v1_10_0_test_decoded_activations_l2_cases():
    # loss/tests/test_decoded_activations_l2.py::test_l2_loss_forward and
    # ::test_l2_loss_with_zero_input, with their expected values.
    source = torch.tensor([[5.0, 4.0], [3.0, 4.0]])
    decoded = torch.tensor([[1.0, 5.0], [1.0, 5.0]])
    theirs = L2ReconstructionLoss().forward(source, torch.zeros_like(source), decoded)
    ours = l2_reconstruction(decoded, source, reduce="none")
    assert torch.allclose(ours, torch.tensor([8.5, 2.5]))
    close(ours, theirs, F64)
    zeros = torch.zeros(2, 3)
    assert torch.equal(l2_reconstruction(zeros, zeros, reduce="none"), torch.zeros(2))
    # ::test_l2_same_no_components_vs_1_component
    torch.manual_seed(0)
    source, learned, decoded = torch.rand(10, 3), torch.rand(10, 5), torch.rand(10, 3)
    flat = l2_reconstruction(decoded, source, reduce="none")
    one = l2_reconstruction(decoded.unsqueeze(1), source.unsqueeze(1), reduce="none")
    assert torch.allclose(flat, one.squeeze(1))
    close(flat, L2ReconstructionLoss().forward(source, learned, decoded), F32)


def snapshots():
    """loss/tests/__snapshots__/test_decoded_activations_l2.ambr, as shipped in the wheel."""
    path = PACKAGE_DIR / "loss" / "tests" / "__snapshots__" / "test_decoded_activations_l2.ambr"
    text = path.read_text()
    found = re.findall(r"# name: (\S+)\n  '(.*)'\n", text)
    assert len(found) == 2, text
    return dict(found)


@pytest.mark.parametrize(
    ("case", "input_shape", "learned_shape"),
    [
        ("input_shape0-learned_activations_shape0", (2, 3), (2, 6)),
        ("input_shape1-learned_activations_shape1", (2, 4, 3), (2, 4, 6)),
    ],
)
def test_v1_10_0_snapshot(case, input_shape, learned_shape):
    # loss/tests/test_decoded_activations_l2.py::test_l2_loss_with_varying_input_shapes: the
    # same seeded torch.rand draws (input, output, learned; shape_with_optional_dimensions
    # leaves these shapes as they are), rounded to 1e-5 and compared with the .ambr snapshot.
    torch.manual_seed(0)
    source = torch.rand(input_shape)
    decoded = torch.rand(input_shape)
    torch.rand(learned_shape)
    ours = l2_reconstruction(decoded, source, reduce="none")
    rounded = torch.round(ours * 1e5).to(dtype=torch.int).tolist()
    assert str(rounded) == snapshots()[f"test_l2_loss_with_varying_input_shapes[{case}]"]


@pytest.mark.parametrize(
    ("coefficient", "learned", "expected"),
    [
        (0.1, [[2.0, -3.0], [2.0, -3.0]], [0.5, 0.5]),
        (0.1, [[[2.0, -3.0]] * 3] * 2, [[0.5] * 3] * 2),
        ([0.1, 0.1, 0.1], [[[2.0, -3.0]] * 3] * 2, [[0.5] * 3] * 2),
        ([0.1, 0.2, 0.3], [[[2.0, -3.0]] * 3] * 2, [[0.5, 1.0, 1.5]] * 2),
        (0.1, [[-2.0, -3.0], [-1.0, -4.0]], [0.5, 0.5]),  # ::test_l1_loss_with_negative_input
        (0.1, [[0.0, 0.0, 0.0]] * 2, [0.0, 0.0]),  # ::test_l1_loss_with_zero_input
    ],
)
def test_v1_10_0_test_learned_activations_l1_cases(coefficient, learned, expected):
    # loss/tests/test_learned_activations_l1.py::test_l1_loss_forward (the four parametrized
    # cases; the component axis is the einops repeat of the 2-D case) and the two named above.
    learned = torch.tensor(learned)
    coefficient = torch.tensor(coefficient) if isinstance(coefficient, list) else coefficient
    ours = coefficient * l1_absolute(learned, reduce="none")
    assert torch.allclose(ours, torch.tensor(expected))
    unused = torch.zeros_like(learned)
    close(ours, LearnedActivationsL1Loss(coefficient).forward(unused, learned, unused), F32)


def test_v1_10_0_towards_monosemanticity_and_neel_cases():
    # loss/tests/test_towards_monosemanticity_loss.py::TestTowardsMonosemanticityLoss::test_loss:
    # LossReducer(L2, L1(0.5)) on one row: squared errors / 2 + 0.5 * sum |z| = 2.5 + 2.5.
    source, learned, decoded = (torch.tensor([v]) for v in ([3.0, 4], [2.0, -3], [1.0, 5]))
    ours = l2_reconstruction(decoded, source) + 0.5 * l1_absolute(learned)
    assert torch.allclose(ours, torch.tensor(5.0))
    result, _ = LossReducer(L2ReconstructionLoss(), LearnedActivationsL1Loss(0.5))(
        source, learned, decoded
    )
    close(ours, result, F32)
    # loss/tests/test_neel_loss.py::test_l2_loss_the_same: Neel's sum over features, mean over
    # the batch, times batch / feature, equals the seed's summed per-row means (the row sum of
    # l2_reconstruction); ::test_l1_loss_the_same: 0.01 * sum of |z| = 0.01 * l1 summed.
    torch.manual_seed(0)
    source, learned, decoded = torch.rand(10, 20), torch.rand(10, 50), torch.rand(10, 20)
    neel_l2 = (decoded - source).pow(2).sum(-1).mean(0)
    summed = l2_reconstruction(decoded, source, reduce="sum")
    assert torch.allclose(neel_l2 * 10 / 20, summed)
    close(summed, L2ReconstructionLoss().forward(source, learned, decoded).sum(), F32)
    assert torch.allclose(0.01 * learned.abs().sum(), 0.01 * l1_absolute(learned, reduce="sum"))


# === GitHub main at b6ba6cb: the torchmetrics classes, never released =========================
# Expected values copied from the seed's tests at commit b6ba6cb7c90372cb5462855c21e5f52fc9130557
# (ai-safety-foundation/sparse_autoencoder), files named in each test. The classes themselves are
# not installable; these are the tests' numbers, compared with the calls here. torchmetrics
# squeezes a single-element result to a scalar, so where the seed expects `tensor(3.0)` for one
# component, ours gives `tensor([3.0])` (shape (1,)), and `tensor(3.0)` without a component axis.


def expect(ours, expected, *, seed_squeezes=False):
    expected = torch.as_tensor(expected)
    if seed_squeezes:  # (batch, 1, feature): (1,) here, () in the seed
        assert ours.shape == (1,)
        assert expected.shape == ()
        ours = ours.squeeze(0)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected)


@pytest.mark.parametrize(
    ("source", "decoded", "expected"),
    [
        (torch.ones(2, 3), torch.ones(2, 3), 0.0),
        (torch.ones(2, 2, 3), torch.ones(2, 2, 3), [0.0, 0.0]),
        (torch.zeros(2, 3), torch.ones(2, 3), 1.0),
        (torch.zeros(2, 2, 3), torch.ones(2, 2, 3), [1.0, 1.0]),
    ],
)
def test_b6ba6cb_test_l2_reconstruction_loss(source, decoded, expected):
    # sparse_autoencoder/metrics/loss/tests/test_l2_reconstruction_loss.py, the four cases.
    expect(l2_reconstruction(decoded, source), expected)


def test_b6ba6cb_l2_reconstruction_loss_docstring():
    # sparse_autoencoder/metrics/loss/l2_reconstruction_loss.py, the class docstring: one
    # component, expected `tensor(3.)`; here `tensor([3.])`.
    source = torch.tensor([[[4.0, 2.0]], [[2.0, 0.0]]])
    decoded = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    expect(l2_reconstruction(decoded, source), 3.0, seed_squeezes=True)


@pytest.mark.parametrize(
    ("learned", "expected"),
    [
        (torch.zeros(2, 3), 0.0),
        (torch.zeros(2, 2, 3), [0.0, 0.0]),
        (torch.ones(2, 3), 3.0),
        (torch.ones(2, 2, 3), [3.0, 3.0]),
        (-torch.ones(2, 2, 3), [3.0, 3.0]),
    ],
)
def test_b6ba6cb_test_l1_absolute_loss(learned, expected):
    # sparse_autoencoder/metrics/loss/tests/test_l1_absolute_loss.py, the five cases.
    expect(l1_absolute(learned), expected)


@pytest.mark.parametrize(
    ("source", "learned", "decoded", "expected"),
    [
        (torch.ones(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 0.0),
        (torch.ones(2, 2, 3), torch.zeros(2, 2, 4), torch.ones(2, 2, 3), [0.0, 0.0]),
        (torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3), 0.04),
        (torch.ones(2, 2, 3), torch.ones(2, 2, 4), torch.ones(2, 2, 3), [0.04, 0.04]),
        (torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0),
        (torch.zeros(2, 2, 3), torch.zeros(2, 2, 4), torch.ones(2, 2, 3), [1.0, 1.0]),
        (torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2, 3), 1.04),
        (torch.zeros(2, 2, 3), torch.ones(2, 2, 4), torch.ones(2, 2, 3), [1.04, 1.04]),
    ],
)
def test_b6ba6cb_test_sae_loss(source, learned, decoded, expected):
    # sparse_autoencoder/metrics/loss/tests/test_sae_loss.py::test_sae_loss, the eight cases:
    # SparseAutoencoderLoss(num_components, l1_coefficient=0.01) = L2 + 0.01 * L1.
    expect(l2_reconstruction(decoded, source) + 0.01 * l1_absolute(learned), expected)


@pytest.mark.parametrize(
    ("learned", "expected", "seed_squeezes"),
    [
        (torch.tensor([[[1.0, 0.0, 1.0]]]), 2.0, True),
        (torch.tensor([[1.0, 0.0, 1.0]]), 2.0, False),
        (torch.tensor([[[0.0, 0.0, 0.0]]]), 0.0, True),
        (
            torch.tensor([[[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]]),
            [1.5, 2.0],
            False,
        ),
    ],
)
def test_b6ba6cb_test_l0_norm(learned, expected, seed_squeezes):
    # sparse_autoencoder/metrics/train/tests/test_l0_norm.py::test_l0_norm_metric, the four
    # cases, which also assert the result's shape: a scalar for (batch, 1, feature) there.
    expect(l0_norm(learned), expected, seed_squeezes=seed_squeezes)
