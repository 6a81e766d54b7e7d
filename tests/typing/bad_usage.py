"""Calls that a type checker must reject before they run.

It is not a test module (pytest does not collect it, and nothing runs it). ``tests/test_typing.py``
checks it with mypy, whose exit code is the verdict: each rejected call carries a
``# type: ignore[code]`` with the error code mypy must raise there, and the project's mypy
configuration sets ``warn_unused_ignores``, so an ignore that no longer fires (a wrong call that
starts passing) fails the check, as does an error with another code. One rejected call a line.
"""

import torch

from sae_losses import l1_absolute, l2_reconstruction

x = torch.randn(4, 8)
# "reduce" is one of "none", "mean", "sum".
l2_reconstruction(x, x, reduce="avg")  # type: ignore[arg-type]
# A list is not a tensor.
l1_absolute([1.0, 2.0])  # type: ignore[arg-type]
