"""Every expected value in the seed's loss tests, re-expressed as calls to sae_losses.

The seed is ai-safety-foundation/sparse_autoencoder, at two versions with two APIs:

- MAIN = commit b6ba6cb (GitHub main, never released), ``sparse_autoencoder/metrics/``:
  torchmetrics classes. One ``forward`` is one ``update`` on a fresh state, then ``compute``:
  the batch mean, per component. Here that is ``reduce="mean"``, and also a ``StreamingMean``
  fed one row per ``update``.
- RELEASE = tag v1.10.0 (commit e798cf4, the newest release), ``sparse_autoencoder/loss/tests/``:
  stateless modules whose ``forward`` is per row (``reduce="none"`` here).

The expected numbers are the seed's, copied from its test files and from its ``.ambr``
snapshot. Where the seed's expected side is a formula (Neel's loss, a loop), the formula is
copied. The actual side is always a sae_losses call, with plain torch for the seed's
coefficients and reductions over components. Each test cites ``file @ version :: test [case]``.

Not re-expressed:
- test_neel_loss.py @ RELEASE :: test_total_loss_the_same: ``@pytest.mark.skip`` in the seed
  ("Neel's L2 approach is different"). It asserts nothing, and its equality is false: Neel
  sums the squared error over features, where the seed and we take the mean.
- test_abstract_loss.py @ RELEASE: the log's names and its ``MetricResult`` list are seed
  plumbing. Its numbers are re-expressed below, but not on the seed's inputs: its
  ``DummyLoss`` ignores them (ones) and returns fixed rows [1, 2, 3].
"""
# The seed's case tables below keep one row per case, with the seed's ids: they run past 100.
# ruff: noqa: E501

import pytest
import torch
from torch import ones, tensor, zeros

from sae_losses import StreamingMean, l0_norm, l1_absolute, l2_reconstruction


def streamed(rows: torch.Tensor) -> torch.Tensor:
    """A torchmetrics-style running batch mean: one ``update`` per row, then ``compute``."""
    metric = StreamingMean.empty(tuple(rows.shape[1:]))
    for i in range(rows.shape[0]):
        metric = metric.update(rows[i : i + 1])
    return metric.compute()


def assert_seed(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The seed's check (``torch.allclose``, default tolerances), plus the seed's shape."""
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected.to(actual.dtype))


def per_component(rows: torch.Tensor, n: int = 3) -> torch.Tensor:
    """The seed's ``einops.repeat(rows, "batch ... -> batch component ...", component=n)``."""
    return torch.stack([rows] * n, dim=1)


# The seed's case tables, one row per case, with the seed's pytest ids.
# fmt: off
MAIN_L1 = [  # MAIN :: metrics/loss/tests/test_l1_absolute_loss.py :: test_l1_absolute_loss
    pytest.param(zeros(2, 3), tensor(0.0), id="All zero activations -> zero loss (single component)"),
    pytest.param(zeros(2, 2, 3), tensor([0.0, 0.0]), id="All zero activations -> zero loss (2 components)"),
    pytest.param(ones(2, 3), tensor(3.0), id="All 1.0 activations -> 3.0 loss (single component)"),
    pytest.param(ones(2, 2, 3), tensor([3.0, 3.0]), id="All 1.0 activations -> 3.0 loss (2 components)"),
    pytest.param(-ones(2, 2, 3), tensor([3.0, 3.0]), id="All -ve 1.0 activations -> 3.0 loss (2 components)"),
]
MAIN_L2 = [  # MAIN :: metrics/loss/tests/test_l2_reconstruction_loss.py :: test_l2_reconstruction_loss
    pytest.param(ones(2, 3), ones(2, 3), tensor(0.0), id="Perfect reconstruction -> zero loss (single component)"),
    pytest.param(ones(2, 2, 3), ones(2, 2, 3), tensor([0.0, 0.0]), id="Perfect reconstruction -> zero loss (2 components)"),
    pytest.param(zeros(2, 3), ones(2, 3), tensor(1.0), id="All errors 1.0 -> 1.0 loss (single component)"),
    pytest.param(zeros(2, 2, 3), ones(2, 2, 3), tensor([1.0, 1.0]), id="All errors 1.0 -> 1.0 loss (2 components)"),
]
MAIN_SAE = [  # MAIN :: metrics/loss/tests/test_sae_loss.py :: test_sae_loss (l1_coefficient 0.01)
    pytest.param(ones(2, 3), zeros(2, 4), ones(2, 3), tensor(0.0), id="Perfect reconstruction & perfect sparsity -> zero loss (single component)"),
    pytest.param(ones(2, 2, 3), zeros(2, 2, 4), ones(2, 2, 3), tensor([0.0, 0.0]), id="Perfect reconstruction & perfect sparsity -> zero loss (2 components)"),
    pytest.param(ones(2, 3), ones(2, 4), ones(2, 3), tensor(0.04), id="Just sparsity error (single component)"),
    pytest.param(ones(2, 2, 3), ones(2, 2, 4), ones(2, 2, 3), tensor([0.04, 0.04]), id="Just sparsity error (2 components)"),
    pytest.param(zeros(2, 3), zeros(2, 4), ones(2, 3), tensor(1.0), id="Just reconstruction error (single component)"),
    pytest.param(zeros(2, 2, 3), zeros(2, 2, 4), ones(2, 2, 3), tensor([1.0, 1.0]), id="Just reconstruction error (2 components)"),
    pytest.param(zeros(2, 3), ones(2, 4), ones(2, 3), tensor(1.04), id="Sparsity and reconstruction error (single component)"),
    pytest.param(zeros(2, 2, 3), ones(2, 2, 4), ones(2, 2, 3), tensor([1.04, 1.04]), id="Sparsity and reconstruction error (2 components)"),
]
MAIN_L0 = [  # MAIN :: metrics/train/tests/test_l0_norm.py :: test_l0_norm_metric
    pytest.param(1, tensor([[[1.0, 0.0, 1.0]]]), tensor(2.0), id="Single component, mixed activity"),
    pytest.param(None, tensor([[1.0, 0.0, 1.0]]), tensor(2.0), id="No component axis, mixed activity"),
    pytest.param(1, tensor([[[0.0, 0.0, 0.0]]]), tensor(0.0), id="Single component, no neurons active"),
    pytest.param(2, tensor([[[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]]), tensor([1.5, 2.0]), id="Multiple components, mixed activity"),
]
# RELEASE :: test_decoded_activations_l2.py :: test_l2_loss_with_varying_input_shapes; the strings
# are transcribed from loss/tests/__snapshots__/test_decoded_activations_l2.ambr @ v1.10.0.
RELEASE_L2_SNAPSHOT = [
    pytest.param((2, 3), (2, 6), "[5043, 10200]", id="input_shape0-learned_activations_shape0"),
    pytest.param((2, 4, 3), (2, 4, 6), "[[26640, 3069, 3791, 10252], [26593, 12966, 17873, 21149]]", id="input_shape1-learned_activations_shape1"),
]
ROWS = tensor([[2.0, -3.0], [2.0, -3.0]])
RELEASE_L1 = [  # RELEASE :: test_learned_activations_l1.py :: test_l1_loss_forward
    pytest.param(0.1, ROWS, tensor([0.5, 0.5]), id="0.1-learned_activations0-expected_loss0"),
    pytest.param(0.1, per_component(ROWS), per_component(tensor([0.5, 0.5])), id="0.1-learned_activations1-expected_loss1"),
    pytest.param(tensor([0.1, 0.1, 0.1]), per_component(ROWS), per_component(tensor([0.5, 0.5])), id="l1_coefficient2-learned_activations2-expected_loss2"),
    pytest.param(tensor([0.1, 0.2, 0.3]), per_component(ROWS), tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]), id="l1_coefficient3-learned_activations3-expected_loss3"),
]
# RELEASE :: test_abstract_loss.py :: test_batch_loss (n_components, loss_reduction, expected)
RELEASE_BATCH_LOSS = [(None, "mean", 2.0), (None, "sum", 6.0), (1, "mean", 2.0), (1, "sum", 6.0), (2, "mean", 4.0), (2, "sum", 12.0)]
# fmt: on


# --- MAIN: the torchmetrics classes at b6ba6cb --------------------------------------------
# ``num_components`` is our component axis, absent for 2-D input (where the seed's (1,) state
# is squeezed to a scalar by torchmetrics, as our 0-d result).


@pytest.mark.parametrize(("learned", "expected"), MAIN_L1)
def test_main_l1_absolute_loss(learned, expected):
    """MAIN :: test_l1_absolute_loss.py :: test_l1_absolute_loss [id]: L1AbsoluteLoss.forward."""
    assert_seed(l1_absolute(learned), expected)
    assert_seed(streamed(l1_absolute(learned, reduce="none")), expected)


@pytest.mark.parametrize(("source", "decoded", "expected"), MAIN_L2)
def test_main_l2_reconstruction_loss(source, decoded, expected):
    """MAIN :: test_l2_reconstruction_loss.py :: test_l2_reconstruction_loss [id]."""
    assert_seed(l2_reconstruction(decoded, source), expected)
    assert_seed(streamed(l2_reconstruction(decoded, source, reduce="none")), expected)


@pytest.mark.parametrize(("source", "learned", "decoded", "expected"), MAIN_SAE)
def test_main_sae_loss(source, learned, decoded, expected):
    """MAIN :: test_sae_loss.py :: test_sae_loss [id]: SparseAutoencoderLoss(n, 0.01).forward.

    The seed's loss is ``L1AbsoluteLoss * l1_coefficient + L2ReconstructionLoss``.
    """
    assert_seed(l2_reconstruction(decoded, source) + 0.01 * l1_absolute(learned), expected)
    rows = l2_reconstruction(decoded, source, reduce="none")
    assert_seed(streamed(rows + 0.01 * l1_absolute(learned, reduce="none")), expected)


def test_main_sae_loss_composition():
    """MAIN :: test_sae_loss.py :: test_compare_sae_loss_to_composition."""
    # The seed compares two of its own classes on (unseeded) rand inputs. Its expected side,
    # SparseAutoencoderLoss's update and compute, is copied in plain torch.
    torch.manual_seed(0)
    n, coefficient = 3, 0.01
    source, learned, decoded = torch.rand(2, n, 3), torch.rand(2, n, 4), torch.rand(2, n, 3)
    abs_sum = learned.abs().sum(dim=-1).sum(dim=0) / 2
    mse = (decoded - source).pow(2).mean(dim=-1).sum(dim=0) / 2
    ours = l1_absolute(learned) * coefficient + l2_reconstruction(decoded, source)
    assert_seed(ours, abs_sum * coefficient + mse)


@pytest.mark.parametrize(("num_components", "learned", "expected"), MAIN_L0)
def test_main_l0_norm(num_components, learned, expected):
    """MAIN :: metrics/train/tests/test_l0_norm.py :: test_l0_norm_metric [id]."""
    result, running = l0_norm(learned), streamed(l0_norm(learned, reduce="none"))
    if num_components == 1:
        # Differs: for (batch, 1, feature) the seed returns a scalar (torchmetrics squeezes its
        # (1,) state), and we keep the component axis, (1,). The number is the same.
        assert result.shape == running.shape == (1,)
        result, running = result.squeeze(0), running.squeeze(0)
    assert_seed(result, expected)
    assert_seed(running, expected)


# --- RELEASE: the stateless losses at v1.10.0 ---------------------------------------------
# L2ReconstructionLoss().forward(source, learned, decoded) is per row, the mean over features:
# our l2_reconstruction(decoded, source, reduce="none"); ``learned`` is unused.


def test_release_l2_forward_and_zero_input():
    """RELEASE :: test_decoded_activations_l2.py :: test_l2_loss_forward, ..._with_zero_input."""
    source = tensor([[5.0, 4.0], [3.0, 4.0]])
    decoded = tensor([[1.0, 5.0], [1.0, 5.0]])
    assert_seed(l2_reconstruction(decoded, source, reduce="none"), tensor([8.5, 2.5]))
    assert torch.all(l2_reconstruction(zeros(2, 3), zeros(2, 3), reduce="none") == zeros(2))


@pytest.mark.parametrize(("input_shape", "learned_shape", "snapshot"), RELEASE_L2_SNAPSHOT)
def test_release_l2_snapshot(input_shape, learned_shape, snapshot):
    """RELEASE :: test_decoded_activations_l2.py :: test_l2_loss_with_varying_input_shapes [id]."""
    torch.manual_seed(0)
    source, decoded = torch.rand(input_shape), torch.rand(input_shape)
    torch.rand(learned_shape)  # drawn by the seed too (unused by L2); kept for the same stream
    loss = l2_reconstruction(decoded, source, reduce="none")
    assert str(torch.round(loss * 1e5).to(dtype=torch.int).tolist()) == snapshot


def test_release_l2_no_components_vs_1_component():
    """RELEASE :: test_decoded_activations_l2.py :: test_l2_same_no_components_vs_1_component."""
    torch.manual_seed(0)
    source, _learned, decoded = torch.rand(10, 3), torch.rand(10, 5), torch.rand(10, 3)
    flat = l2_reconstruction(decoded, source, reduce="none")
    one = l2_reconstruction(decoded.unsqueeze(1), source.unsqueeze(1), reduce="none")
    assert torch.allclose(flat, one.squeeze(1))


# LearnedActivationsL1Loss(c).forward(...) is per row, c * sum_f |z_f|. Differs: l1_absolute
# has no coefficient (its ``weight`` is per feature), so c, a float or one per component, is
# a plain torch product with the (batch, *component) result, as in the seed.


@pytest.mark.parametrize(("l1_coefficient", "learned", "expected"), RELEASE_L1)
def test_release_l1_forward(l1_coefficient, learned, expected):
    """RELEASE :: test_learned_activations_l1.py :: test_l1_loss_forward [id]."""
    assert_seed(l1_absolute(learned, reduce="none") * l1_coefficient, expected)


@pytest.mark.parametrize("l1_coefficient", [0.01, 0.1, 0.5])
def test_release_l1_coefficients(l1_coefficient):
    """RELEASE :: test_learned_activations_l1.py :: test_l1_loss_with_different_l1_coefficients."""
    expected = torch.abs(ROWS).sum(dim=-1) * l1_coefficient  # the seed's formula
    assert_seed(l1_coefficient * l1_absolute(ROWS, reduce="none"), expected)


def test_release_l1_zero_and_negative_input():
    """RELEASE :: test_learned_activations_l1.py :: test_l1_loss_with_{zero,negative}_input."""
    assert torch.all(0.1 * l1_absolute(zeros(2, 3), reduce="none") == zeros(2))
    learned = tensor([[-2.0, -3.0], [-1.0, -4.0]])
    assert_seed(0.1 * l1_absolute(learned, reduce="none"), tensor([0.5, 0.5]))


def test_release_neel_l1_and_l2():
    """RELEASE :: test_neel_loss.py :: test_l1_loss_the_same, test_l2_loss_the_same."""
    torch.manual_seed(0)  # the seed's fixture draws unseeded rand(10, 20), (10, 50), (10, 20)
    source, learned, decoded = torch.rand(10, 20), torch.rand(10, 50), torch.rand(10, 20)
    coefficient = 0.01
    # Neel's loss, copied from the seed's test: the expected side.
    neel_l2 = (decoded.float() - source.float()).pow(2).sum(-1).mean(0)
    neel_l1 = coefficient * (learned.float().abs().sum())
    # The seed's library side sums its per-row losses over the batch: our reduce="sum". For L2
    # the seed rescales Neel's (sum over features, mean over batch) by batch / features.
    assert torch.allclose(neel_l1, coefficient * l1_absolute(learned, reduce="sum"))
    neel_l2_fixed = neel_l2 * source.shape[0] / source.shape[1]
    assert torch.allclose(neel_l2_fixed, l2_reconstruction(decoded, source, reduce="sum"))


def test_release_towards_monosemanticity_loss():
    """RELEASE :: test_towards_monosemanticity_loss.py :: TestTowardsMonosemanticityLoss::test_loss"""
    source, learned, decoded, coefficient = [3.0, 4], [2.0, -3], [1.0, 5], 0.5
    # The seed's non-vectorised expected value, copied.
    squared_errors = sum((i - o) ** 2 for i, o in zip(source, decoded, strict=True))
    expected = squared_errors / 2 + sum(abs(neuron) * coefficient for neuron in learned)
    # LossReducer(L2ReconstructionLoss(), LearnedActivationsL1Loss(0.5))(...) on (1, 2) inputs,
    # with its default batch mean.
    s, z, d = (tensor(v).unsqueeze(0) for v in (source, learned, decoded))
    assert_seed(l2_reconstruction(d, s) + coefficient * l1_absolute(z), tensor(expected))


def dummy_rows(n_components: int | None) -> torch.Tensor:
    """Learned (3, [n,] 24) whose per-row L1 is the DummyLoss's [1, 2, 3] on every component."""
    learned = zeros(3, 24)
    learned[:, 0] = tensor([1.0, 2.0, 3.0])
    return learned if n_components is None else per_component(learned, n_components)


@pytest.mark.parametrize(("n_components", "reduce", "expected"), RELEASE_BATCH_LOSS)
def test_release_batch_loss(n_components, reduce, expected):
    """RELEASE :: test_abstract_loss.py :: test_batch_loss [n_components, reduction, expected].

    ``batch_loss(..., LossReductionType.MEAN/SUM)`` reduces over the batch only, as ``reduce=``
    does; the seed's ``.sum()`` over the components is plain torch.
    """
    assert l1_absolute(dummy_rows(n_components), reduce=reduce).sum() == expected


@pytest.mark.parametrize("n_components", [None, 3])
def test_release_log_component_wise_values(n_components):
    """RELEASE :: test_abstract_loss.py :: test_batch_loss_with_log, test_call_method (None),
    test_scalar_loss_with_log_and_component_axis (3): ``component_wise_values`` are all 2.0.

    Differs: the seed's log holds a 0-d batch mean as shape (1,); ours is 0-d, so reshape(-1).
    """
    values = l1_absolute(dummy_rows(n_components)).reshape(-1)
    assert values.shape == (n_components or 1,)
    assert all(value == 2.0 for value in values)
