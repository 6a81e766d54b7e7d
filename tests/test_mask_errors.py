"""The mask errors of every term (tests/terms.py) and of the streaming updates: shape, dtype,
type and device, with the exact messages. The terms are called unchecked (the body, without the
runtime type check's wrapper), so the body's own checks are what raises.
"""

import inspect

import pytest
import torch

from sae_losses import StreamingFVU, StreamingMean
from terms import cases

# Every term's mask: shape, type and device.
SHAPE_ERRORS = [
    (
        torch.ones(4, 2, dtype=torch.bool),
        ValueError,
        r"`mask` must have shape \(batch,\) = \(4,\), got \(4, 2\)\.",
    ),
    (
        torch.ones(3, dtype=torch.bool),
        ValueError,
        r"`mask` must have shape \(batch,\) = \(4,\), got \(3,\)\.",
    ),
    (
        torch.ones((), dtype=torch.bool),
        ValueError,
        r"`mask` must have shape \(batch,\) = \(4,\), got \(\)\.",
    ),
    (
        [True, True, False, True],
        TypeError,
        r"`mask` must be a torch\.Tensor or None, got list\.",
    ),
    (
        torch.ones(4, dtype=torch.bool, device="meta"),
        ValueError,
        r"`mask` is on meta but the inputs are on cpu\.",
    ),
]
# The masks of terms that take row weights.
WEIGHTS_ERRORS = [
    (
        torch.ones(1),
        ValueError,
        r"`mask` must have shape \(batch,\) = \(4,\), got \(1,\)\.",  # no broadcasting
    ),
    (
        torch.ones(4, dtype=torch.int64),
        TypeError,
        r"`mask` must be a bool or floating \(row weights\) tensor, got dtype torch\.int64\.",
    ),
    (
        torch.ones(4, dtype=torch.uint8),
        TypeError,
        r"`mask` must be a bool or floating \(row weights\) tensor, got dtype torch\.uint8\.",
    ),
    (
        torch.ones(4, dtype=torch.complex64),
        TypeError,
        r"got dtype torch\.complex64\.",
    ),
]


@pytest.mark.parametrize(
    ("term", "mask", "error", "message"),
    [
        pytest.param(*param.values, *case, id=f"{param.id}-{i}")
        for param in cases(lambda term: term.masks)
        for i, case in enumerate(
            SHAPE_ERRORS + (WEIGHTS_ERRORS if param.values[0].float_masks else [])
        )
    ],
)
def test_mask_errors(term, mask, error, message):
    # The fused terms check eagerly, before any compiled kernel: nothing compiles here.
    inputs = term.inputs(4, (3,), torch.float32)
    with pytest.raises(error, match=message):
        term(*inputs, mask=mask, unchecked=True)


FVU_UPDATE_UNCHECKED = inspect.unwrap(StreamingFVU.update)
UPDATE_UNCHECKED = inspect.unwrap(StreamingMean.update)
BOOL_ONLY = [
    pytest.param(
        lambda m, term=param.values[0]: term(*term.inputs(4, (3,)), mask=m, unchecked=True),
        id=param.id,
        marks=param.marks,
    )
    for param in cases(lambda term: term.masks == "bool")
] + [
    pytest.param(
        lambda m: UPDATE_UNCHECKED(StreamingMean.empty(), torch.ones(4), mask=m),
        id="StreamingMean.update",
    ),
    pytest.param(
        lambda m: FVU_UPDATE_UNCHECKED(
            StreamingFVU.empty((3,)), torch.ones(4, 3), torch.ones(4, 3), mask=m
        ),
        id="StreamingFVU.update",
    ),
]


@pytest.mark.parametrize("call", BOOL_ONLY)
def test_bool_only_masks_reject_float_and_integer_masks(call):
    for dtype in (torch.float32, torch.float64, torch.int64):
        with pytest.raises(TypeError, match=r"`mask` must be a bool tensor, got dtype torch\."):
            call(torch.ones(4, dtype=dtype))
    with pytest.raises(ValueError, match=r"`mask` must have shape \(batch,\) = \(4,\), got \(2,"):
        call(torch.ones(2, dtype=torch.bool))
