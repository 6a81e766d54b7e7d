"""What cross_entropy and kl_divergence accept: targets, masks, and the error messages.

Targets out of range in a kept row raise (F.cross_entropy silently scores -100 as 0); a masked
row's target is never read; the next-token recipes agree with TransformerLens's formula; masked
rows are inert even holding NaN or inf, on the one-call and the blocked path; every argument
error names the argument.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

from helpers import gradients
from logits_cases import REDUCE_MODES, draw, make_mask, targets_for
from sae_losses import _rowops, cross_entropy, kl_divergence

ce_unchecked = inspect.unwrap(cross_entropy)
kl_unchecked = inspect.unwrap(kl_divergence)


# --- targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-100, -1, 7, 2**40])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("blocked", [False, True])
def test_an_out_of_range_target_in_a_kept_row_raises(monkeypatch, bad, requires_grad, blocked):
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 14)
    logits = draw((6, 7), seed=40).requires_grad_(requires_grad)
    targets = targets_for(logits, seed=41)
    targets[4] = bad
    for mask in (None, torch.tensor([True, False, True, True, True, False])):
        with pytest.raises(RuntimeError, match="out of bounds"):
            cross_entropy(logits, targets, mask=mask)
    if bad == -100:  # what F.cross_entropy does instead: the row silently scores 0
        assert F.cross_entropy(logits, targets, reduction="none")[4].item() == 0.0


@pytest.mark.parametrize("blocked", [False, True])
def test_masked_rows_targets_are_never_read(monkeypatch, blocked):
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 14)
    logits = draw((6, 7), seed=42).requires_grad_()
    targets = targets_for(logits, seed=43)
    keep = torch.tensor([True, False, True, True, False, True])
    padded = torch.where(keep, targets, torch.tensor([-100, 2**40, -1, 7, -100, 99]))
    before = padded.clone()
    for mask in (keep, keep * torch.linspace(0.5, 2.0, 6, dtype=torch.float64)):
        value = cross_entropy(logits, padded, mask=mask, reduce="sum")
        expected = cross_entropy(logits, targets, mask=mask, reduce="sum")
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(*(gradients(v, [logits])[0] for v in (value, expected)))
    assert torch.equal(padded, before)  # the caller's targets are not modified


def test_next_token_recipes_agree_with_transformer_lens_formula():
    # TransformerLens's lm_cross_entropy_loss(per_token=True), transcribed in float64:
    # -log_softmax(logits)[..., :-1, :].gather(-1, tokens[..., 1:, None])[..., 0].
    logits = draw((3, 6, 10), torch.float32, seed=50)
    tokens = targets_for(logits, seed=51)
    lens = -logits.double().log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    flattened = cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduce="none")
    torch.testing.assert_close(flattened.double(), lens.flatten(), rtol=1e-6, atol=0)
    per_position = cross_entropy(logits[:, :-1], tokens[:, 1:], reduce="none")
    torch.testing.assert_close(per_position.double(), lens, rtol=1e-6, atol=0)
    scored = torch.ones_like(tokens, dtype=torch.bool)
    scored[:, -1] = False
    rolled = cross_entropy(
        logits.flatten(0, 1), tokens.roll(-1, dims=1).flatten(), mask=scored.flatten()
    )
    torch.testing.assert_close(rolled.double(), lens.mean(), rtol=1e-6, atol=0)


# --- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("blocked", [False, True])
def test_masked_rows_are_inert_even_holding_nan(monkeypatch, fill, mask_kind, blocked):
    if blocked:
        monkeypatch.setattr(_rowops, "BLOCK_ELEMENTS", 2 * 3 * 5)
    keep, mask = make_mask("bool", 7), make_mask(mask_kind, 7)  # drops rows 1 and 4
    clean = [draw((7, 3, 5), seed=60), draw((7, 3, 5), seed=61)]
    padded = [t.clone() for t in clean]
    for t in padded:
        t[~keep] = fill
    targets = torch.where(keep[:, None], targets_for(clean[0], seed=62), -100)
    for reduce in REDUCE_MODES:
        for call in (
            lambda z, r, reduce=reduce: cross_entropy(z, targets, reduce=reduce, mask=mask),
            lambda z, r, reduce=reduce: kl_divergence(r, z, reduce=reduce, mask=mask),
        ):
            inputs = [t.clone().requires_grad_() for t in padded]
            clean_inputs = [t.clone().requires_grad_() for t in clean]
            value, expected = call(*inputs), call(*clean_inputs)
            assert value.isfinite().all()
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
            for got, want in zip(
                gradients(value, inputs), gradients(expected, clean_inputs), strict=True
            ):
                assert got.isfinite().all()
                assert not got[~keep].any()
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: ce_unchecked(torch.ones(2, 3), torch.zeros(2, dtype=torch.int32)),
            TypeError,
            r"`targets` must be an int64 tensor of vocabulary indices, got dtype torch\.int32\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 3), [0, 1]),
            TypeError,
            r"`targets` must be a torch\.Tensor, got list\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 4, 3), torch.zeros(2, dtype=torch.int64)),
            ValueError,
            r"`targets` must have the shape of `logits` without its vocab axis, \(2, 4\), "
            r"got \(2,\)\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(3), torch.zeros((), dtype=torch.int64)),
            ValueError,
            r"`logits` must have shape \(batch, \*component, vocab\) with at least 2 dimensions, "
            r"got shape \(3,\)\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 0), torch.zeros(2, dtype=torch.int64)),
            ValueError,
            r"`logits` has an empty vocabulary axis: shape \(2, 0\)\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 3, dtype=torch.int64), torch.zeros(2)),
            TypeError,
            r"`logits` must be a floating-point tensor, got dtype torch\.int64\.",
        ),
        (
            lambda: ce_unchecked(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), reduce="max"),
            ValueError,
            r"`reduce` must be one of 'none', 'mean' or 'sum', got 'max'\.",
        ),
        (
            lambda: ce_unchecked(
                torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), mask=torch.ones(3).bool()
            ),
            ValueError,
            r"`mask` must have shape \(batch,\) = \(2,\), got \(3,\)\.",
        ),
        (
            lambda: kl_unchecked(torch.ones(2, 3), torch.ones(2, 4)),
            ValueError,
            r"`reference_logits` and `logits` must have the same shape, got \(2, 3\) and "
            r"\(2, 4\)\.",
        ),
        (
            lambda: kl_unchecked(torch.ones(2, 3, dtype=torch.float8_e4m3fn), torch.ones(2, 3)),
            TypeError,
            r"`reference_logits` has dtype torch\.float8_e4m3fn: float8 is not supported",
        ),
        (
            lambda: kl_unchecked(torch.ones(2, 3), torch.ones(2, 3), mask=torch.ones(2).long()),
            TypeError,
            r"`mask` must be a bool or floating \(row weights\) tensor, got dtype torch\.int64\.",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
