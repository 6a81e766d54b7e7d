"""Shared test helpers: seeded inputs, float64 references, the saved-tensor probe and the blocked
eager path's threshold and spy.

``benchmarks/_timing.py`` imports :func:`saved_bytes_beyond_inputs` from here, so the suite and
the benchmarks measure what is saved for backward with one probe.
"""

import sys

import torch

from sae_losses import _rowops


def randn(*shape, dtype=torch.float32, seed=0):
    """Seeded normal values, drawn in float64 and rounded to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def reduce_reference(rows: torch.Tensor, reduce: str) -> torch.Tensor:
    return {"none": rows, "mean": rows.mean(0), "sum": rows.sum(0)}[reduce]


def masked_reduce(rows, reduce, mask=None):
    """The float64 reference of a row term's mask and reduce: ``w * rows`` (exactly 0 where
    w = 0), its sum, or its sum over the sum of weights."""
    w = torch.ones(rows.shape[0], dtype=torch.float64) if mask is None else mask.double()
    view = w.reshape((-1,) + (1,) * (rows.ndim - 1))
    weighted = torch.where(view != 0, rows * view, 0)
    if reduce == "none":
        return weighted
    return weighted.sum(0) if reduce == "sum" else weighted.sum(0) / w.sum()


def l2_reference(decoded, source, reduce):
    """Mean over features of the squared error, in float64, then ``reduce`` over the batch."""
    return reduce_reference((decoded.double() - source.double()).pow(2).mean(-1), reduce)


def l1_reference(learned, reduce):
    """Sum over features of the absolute values, in float64, then ``reduce`` over the batch."""
    return reduce_reference(learned.double().abs().sum(-1), reduce)


def gradients(result, inputs):
    """The gradients of ``result.sum()`` for every input: zeros where none flows, and for the
    inputs that cannot have one (a bool input, or one that does not ask for a gradient)."""
    wanted = [t for t in inputs if t.requires_grad]
    found = [None] * len(wanted)
    if result.requires_grad and wanted:
        found = list(torch.autograd.grad(result.sum(), wanted, allow_unused=True))
    found.reverse()
    grads = [found.pop() if t.requires_grad else None for t in inputs]
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]


# --- what autograd saves for backward -------------------------------------------------------------


class SavedTensors:
    """Records every tensor autograd saves for backward inside ``with SavedTensors() as saved:``.

    The tensors are kept as they are (no copy), so the graph built inside still runs backward.
    """

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors.append(tensor)
        return tensor

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.__exit__(*exc_info)

    def beyond(self, inputs, min_numel=0) -> list[torch.Tensor]:
        """The saved tensors of at least ``min_numel`` elements that are not (views of the start
        of) one of ``inputs``."""
        pointers = {t.data_ptr() for t in inputs}
        return [t for t in self.tensors if t.numel() >= min_numel and t.data_ptr() not in pointers]

    def bytes_beyond(self, inputs) -> int:
        """Bytes saved for backward, not counting tensors that are the inputs."""
        return sum(t.numel() * t.element_size() for t in self.beyond(inputs))


def saved_bytes_beyond_inputs(run, inputs) -> int:
    """Bytes that autograd saves for backward while ``run()`` runs, beyond the ``inputs``."""
    with SavedTensors() as saved:
        run()
    return saved.bytes_beyond(inputs)


# --- the blocked eager path -----------------------------------------------------------------------


def one_call_elements() -> int:
    """The most elements the eager path computes in one call; above it, it computes in row
    blocks of ``BLOCK_ELEMENTS``. Read when called, so it follows a monkeypatched constant."""
    return _rowops.ONE_CALL_BLOCKS * _rowops.BLOCK_ELEMENTS


def blocked_rows(row_elements: int) -> int:
    """The fewest rows of ``row_elements`` each over the one-call threshold: the smallest batch
    that takes the blocked eager path."""
    return one_call_elements() // row_elements + 1


class RowBlocksSpy:
    """Wraps ``_rowops.row_blocks`` and records, for each eager call, the input's type and how
    many row slices it was computed in (more than 1: the blocked path ran)."""

    def __init__(self) -> None:
        self.calls: list[tuple[type, int]] = []
        self._original = _rowops.row_blocks

    def __call__(self, x, elements=None):
        blocks = self._original(x, elements)
        self.calls.append((type(x), len(blocks)))
        return blocks

    def blocked(self) -> int:
        """How many eager calls took the blocked path."""
        return sum(n > 1 for _, n in self.calls)

    @classmethod
    def install(cls, monkeypatch=None) -> "RowBlocksSpy":
        """Put the spy in ``_rowops`` and in every ``sae_losses`` module that imported
        ``row_blocks`` by name; through ``monkeypatch`` (undone after the test) when given."""
        spy = cls()
        for name, module in list(sys.modules.items()):
            if (
                name.startswith("sae_losses")
                and getattr(module, "row_blocks", None) is spy._original
            ):
                if monkeypatch is None:
                    module.row_blocks = spy
                else:
                    monkeypatch.setattr(module, "row_blocks", spy)
        return spy


# --- checks shared by an eager term and its fused twin --------------------------------------------


def check_fp16_backward_in_float32(l2):
    """decoded - source = 80000 overflows float16 (max 65504); the gradient 2 * 80000 / F = 20000
    (upstream 1: reduce="sum") does not, so it must come back finite and exact."""
    decoded = torch.full((2, 8), 40000.0, dtype=torch.float16, requires_grad=True)
    source = torch.full((2, 8), -40000.0, dtype=torch.float16, requires_grad=True)
    loss = l2(decoded, source, reduce="sum")
    assert loss.dtype == torch.float32
    assert loss.item() == 2 * 80000.0**2
    loss.backward()
    assert decoded.grad.dtype == source.grad.dtype == torch.float16
    assert torch.equal(decoded.grad, torch.full((2, 8), 20000.0, dtype=torch.float16))
    assert torch.equal(source.grad, torch.full((2, 8), -20000.0, dtype=torch.float16))


LONG_FEATURES = 1 << 20


def relative_error(found, expected):
    return ((found.double() - expected) / expected).abs().max().item()


def check_long_feature_axis(l2, l1, monkeypatch):
    """Rows of 2^20 float32 features, each over the 2^19-element block, enough of them for the
    blocked path. A sequential float32 sum drifts here; a cascade sum (or a float64 one) stays
    within 1e-6 of the float64 value."""
    rows = blocked_rows(LONG_FEATURES)
    decoded, source = randn(rows, LONG_FEATURES, seed=60), randn(rows, LONG_FEATURES, seed=61)
    expected_l2 = (decoded.double() - source.double()).square().mean(-1)
    expected_l1 = decoded.double().abs().sum(-1)
    # The inputs discriminate: vector_norm's float32 sums are far more than 1e-6 off.
    norm_l2 = torch.linalg.vector_norm(decoded - source, dim=-1) ** 2 / LONG_FEATURES
    norm_l1 = torch.linalg.vector_norm(decoded, ord=1, dim=-1)
    assert relative_error(norm_l2, expected_l2) > 5e-6
    assert relative_error(norm_l1, expected_l1) > 5e-6
    spy = RowBlocksSpy.install(monkeypatch)
    assert relative_error(l2(decoded, source, reduce="none"), expected_l2) < 1e-6
    assert relative_error(l1(decoded, reduce="none"), expected_l1) < 1e-6
    return spy
