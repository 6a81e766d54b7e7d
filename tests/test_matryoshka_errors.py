"""matryoshka_l2's argument errors: each names the argument, and the runtime type check reads
the shapes.

Bad widths (empty, not Python ints, not strictly increasing, outside 1..d_sae) are ValueErrors;
bad latents, decoder, source, bias, reduce or mask name the argument and what was expected.
"""

import inspect

import pytest
import torch

from matryoshka_cases import inputs
from sae_losses import matryoshka_l2

# --- errors --------------------------------------------------------------------------------------

# The body's own checks, without the runtime type check's wrapper (which would catch some first).
unchecked = inspect.unwrap(matryoshka_l2)


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ([], r"`widths` must be a non-empty list of Python ints, got \[\]"),
        (5, "`widths` must be a non-empty list of Python ints, got 5"),
        ([2, 4.0], r"Python ints, got \[2, 4.0\]"),
        ([True, 4], r"Python ints, got \[True, 4\]"),
        (torch.tensor([2, 4]), "Python ints, got tensor"),
        ("abc", "Python ints, got 'abc'"),
        ([4, 4], r"`widths` must be strictly increasing, got \[4, 4\]"),
        ([6, 3], r"strictly increasing, got \[6, 3\]"),
        ([0, 3], r"`widths` must lie in 1..d_sae = 1..12 \(latents.shape\[1\]\), got \[0, 3\]"),
        ([-1], r"1..12 \(latents.shape\[1\]\), got \[-1\]"),
        ([3, 13], r"1..12 \(latents.shape\[1\]\), got \[3, 13\]"),
    ],
)
def test_bad_widths_are_value_errors(widths, message):
    z, w_dec, x, _ = inputs(grad=False)
    with pytest.raises(ValueError, match=message):
        unchecked(z, w_dec, x, widths=widths)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"z": torch.ones(7, 12, 1)},
            ValueError,
            r"`latents` must have shape \(batch, d_sae\), got \(7, 12, 1\)",
        ),
        (
            {"x": torch.ones(7, 5, 1)},
            ValueError,
            r"`source` must have shape \(batch, d_model\), got \(7, 5, 1\)",
        ),
        (
            {"x": torch.ones(6, 5)},
            ValueError,
            r"`source` must have shape \(batch, d_model\) = \(7, 5\), got \(6, 5\)",
        ),
        ({"x": torch.ones(7, 0)}, ValueError, r"`source` has an empty feature axis"),
        (
            {"w": torch.ones(5, 12)},
            ValueError,
            r"`decoder_weight` must have shape \(d_sae, d_model\) = \(12, 5\), got \(5, 12\)",
        ),
        (
            {"b": torch.ones(12)},
            ValueError,
            r"`decoder_bias` must have shape \(d_model,\) = \(5,\), got \(12,\)",
        ),
        (
            {"z": torch.ones(7, 12, dtype=torch.int64)},
            TypeError,
            "`latents` must be a floating-point tensor",
        ),
        ({"w": [[1.0]]}, TypeError, "`decoder_weight` must be a torch.Tensor, got list"),
        (
            {"b": torch.ones(5, dtype=torch.float8_e4m3fn)},
            TypeError,
            "`decoder_bias` has dtype torch.float8_e4m3fn",
        ),
        (
            {"w": torch.ones(12, 5, device="meta")},
            ValueError,
            "`decoder_weight` is on meta but `latents` is on cpu",
        ),
        ({"reduce": "max"}, ValueError, "`reduce` must be one of"),
        (
            {"mask": torch.ones(6, dtype=torch.bool)},
            ValueError,
            r"`mask` must have shape \(batch,\) = \(7,\)",
        ),
        (
            {"mask": torch.ones(7, dtype=torch.int64)},
            TypeError,
            "`mask` must be a bool or floating",
        ),
    ],
)
def test_bad_inputs_name_the_argument(change, error, message):
    z, w_dec, x, b_dec = inputs(dtype=torch.float32, grad=False)
    z, w_dec, x, b_dec = (
        change.get(k, v) for k, v in zip("zwxb", (z, w_dec, x, b_dec), strict=True)
    )
    options = {k: change[k] for k in ("reduce", "mask") if k in change}
    with pytest.raises(error, match=message):
        unchecked(z, w_dec, x, widths=[3], decoder_bias=b_dec, **options)


def test_the_runtime_type_check_reads_the_shapes(request):
    if request.config.getoption("--no-typecheck"):
        pytest.skip("this pass runs without the import hook")
    import jaxtyping

    z, w_dec, x, _ = inputs(grad=False)
    with pytest.raises(jaxtyping.TypeCheckError):
        matryoshka_l2(z, w_dec.T, x, widths=[3])
