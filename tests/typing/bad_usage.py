"""Two calls that a type checker must reject before they run.

It is not a test module (pytest does not collect it, and nothing runs it). ``tests/test_typing.py``
checks it with mypy and expects one error on each line marked ``# rejected:``, with that message.
"""

import torch

from sae_losses import l1_absolute, l2_reconstruction

x = torch.randn(4, 8)
l2_reconstruction(x, x, reduce="avg")  # rejected: "reduce" is one of "none", "mean", "sum"
l1_absolute([1.0, 2.0])  # rejected: a list is not a tensor
