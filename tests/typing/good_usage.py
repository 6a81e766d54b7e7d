"""A typed user script: an SAE training step and an evaluation loop on the public API.

It is not a test module (pytest does not collect it). ``tests/test_typing.py`` checks it with mypy
in the project's strict configuration and expects no error (exit code 0), and also runs it once.
Each ``assert_type`` pins the type a result must have; mypy fails when it differs.
``typing_extensions.assert_type`` is ``typing.assert_type`` (3.11+) for Python 3.10, the version
the mypy configuration targets.
"""

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import assert_type

from sae_losses import PendingAllReduce, StreamingMean, all_reduce, l1_absolute, l2_reconstruction


class SparseAutoencoder(nn.Module):
    def __init__(self, d_model: int, d_sae: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(d_model, d_sae)
        self.decoder = nn.Linear(d_sae, d_model)

    def encode(self, source: Tensor) -> Tensor:
        return torch.relu(self.encoder(source))

    def decode(self, learned: Tensor) -> Tensor:
        decoded: Tensor = self.decoder(learned)
        return decoded


def objective(
    sae: SparseAutoencoder,
    source: Tensor,
    *,
    l1_coefficient: float,
    reduce: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """L2 reconstruction plus the decoder-norm-weighted L1 of the latents."""
    learned = sae.encode(source)
    decoder_norms = sae.decoder.weight.norm(dim=0)  # (d_sae,): one norm per latent
    reconstruction = assert_type(
        l2_reconstruction(sae.decode(learned), source, reduce=reduce), Tensor
    )
    sparsity = assert_type(l1_absolute(learned, weight=decoder_norms, reduce=reduce), Tensor)
    return reconstruction + l1_coefficient * sparsity


def training_step(
    sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, source: Tensor, l1_coefficient: float
) -> float:
    optimizer.zero_grad()
    loss = objective(sae, source, l1_coefficient=l1_coefficient)
    loss.backward()
    optimizer.step()
    return loss.item()


def evaluate(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> dict[str, float]:
    metrics = {"l2": StreamingMean.empty(), "l1": StreamingMean.empty()}
    assert_type(metrics["l2"].update(torch.zeros(2), mask=None), StreamingMean)
    assert_type(metrics["l2"].merge(metrics["l1"]), StreamingMean)
    assert_type(metrics["l2"].compute(), Tensor)
    summed_l2 = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for source in batches:
            learned = sae.encode(source)
            decoded = sae.decode(learned)
            metrics = {
                "l2": metrics["l2"].update(l2_reconstruction(decoded, source, reduce="none")),
                "l1": metrics["l1"].update(l1_absolute(learned, reduce="none")),
            }
            summed_l2 += l2_reconstruction(decoded, source, reduce="sum")
    # all_reduce is generic: the tree it returns has the type of the tree it is given.
    metrics = all_reduce(metrics)
    assert_type(all_reduce(metrics), dict[str, StreamingMean])
    assert_type(all_reduce(metrics["l2"]), StreamingMean)
    pending = all_reduce(metrics, async_op=True)
    assert_type(pending, PendingAllReduce[dict[str, StreamingMean]])
    metrics = pending.wait()
    return {name: float(mean.compute()) for name, mean in metrics.items()} | {
        "l2 sum": float(summed_l2)
    }


def main() -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_model=8, d_sae=32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(3):
        training_step(sae, optimizer, torch.randn(16, 8), l1_coefficient=1e-3)
    print(evaluate(sae, [torch.randn(16, 8), torch.randn(5, 8)]))


if __name__ == "__main__":
    main()
