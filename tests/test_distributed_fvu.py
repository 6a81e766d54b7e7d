"""StreamingFVU and feature density across real gloo process groups: exact, and one collective.

Every rank streams its shard of one synthetic evaluation set (uneven shards, one empty rank) into
a tree of accumulators, then calls all_reduce. The results must equal one process streaming all
rows, and a float64 two-pass reference, and be bit-identical on every rank.
"""

import contextlib
import itertools

import pytest
import torch
import torch.distributed as dist

from sae_losses import StreamingFVU, StreamingMean, all_reduce, l2_reconstruction
from spawn import init_gloo, run_ranks, save_result

ROWS, SHAPE, OFFSET, CHUNK = 120_000, (4, 64), 1e4, 3_000
D_SAE, DEAD, RARE = 96, range(88, 96), range(80, 88)
LAST_ROW_ONLY = 79  # a latent that fires on the very last row only
# Uneven shards, (start, stop) per rank; the 3-rank split has an empty rank.
SHARDS = {2: [(0, 41_234), (41_234, ROWS)], 3: [(0, 70_001), (70_001, 70_001), (70_001, ROWS)]}


def loadings():
    """``c`` of shape (4, 64): 8 features per component near 1 (0.9 to 1.1), the rest 0."""
    generator = torch.Generator().manual_seed(99)
    c = torch.zeros(SHAPE, dtype=torch.float64)
    for component in range(SHAPE[0]):
        features = torch.randperm(SHAPE[1], generator=generator)[:8]
        c[component, features] = 0.9 + 0.2 * torch.rand(8, generator=generator, dtype=c.dtype)
    return c


def dataset_rows(start, stop):
    """``(decoded, source, learned)`` for rows ``[start, stop)``, in pieces at chunk borders.

    Float32 ``source = 1e4 * c + N(0, 1)``, ``decoded = source + N(0, 0.1^2)``, and latent
    activations ``learned = relu(N(0, 1) - bias)`` whose last latents never fire, whose rare
    ones fire about once in 10^5 rows, and one that fires on row ROWS - 1 only. Each chunk of
    CHUNK rows is drawn from its own seed, so any rank draws only its own rows.
    """
    base = (OFFSET * loadings()).float()
    bias = torch.zeros(D_SAE)
    bias[RARE] = 4.3
    bias[DEAD] = torch.inf
    bias[LAST_ROW_ONLY] = torch.inf
    for first in range(start - start % CHUNK, stop, CHUNK):
        generator = torch.Generator().manual_seed(7_000 + first // CHUNK)
        source = base + torch.randn(CHUNK, *SHAPE, generator=generator)
        decoded = source + 0.1 * torch.randn(CHUNK, *SHAPE, generator=generator)
        learned = torch.relu(torch.randn(CHUNK, D_SAE, generator=generator) - bias)
        if first + CHUNK >= ROWS:
            learned[ROWS - 1 - first, LAST_ROW_ONLY] = 1.0
        keep = slice(max(start, first) - first, min(stop, first + CHUNK) - first)
        yield decoded[keep], source[keep], learned[keep]


def stream(start, stop):
    """The evaluation tree one rank keeps over rows ``[start, stop)``."""
    tree = {
        "fvu": StreamingFVU.empty(SHAPE),
        "l2": StreamingMean.empty((SHAPE[0],)),
        "density": StreamingMean.empty((D_SAE,)),
    }
    for decoded, source, learned in dataset_rows(start, stop):
        tree = {
            "fvu": tree["fvu"].update(decoded, source),
            "l2": tree["l2"].update(l2_reconstruction(decoded, source, reduce="none")),
            # The feature-density recipe: each latent's firing frequency.
            "density": tree["density"].update(learned > 0),
        }
    return tree


def count_collectives(tree):
    """all_reduce ``tree`` under the profiler; the number of gloo collectives it issued."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        reduced = all_reduce(tree)
    return reduced, sum(event.name.startswith("gloo:") for event in prof.events())


def worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)  # up to 3 processes share the machine's cores
    init_gloo(rank, world_size, port)
    try:
        local = stream(*SHARDS[world_size][rank])
        synced = all_reduce(local)

        # 1 StreamingFVU over (4, 768) and 8 StreamingMeans: one collective.
        generator = torch.Generator().manual_seed(rank)
        rows = 3 + rank  # a different number of rows on every rank
        source = torch.randn(rows, 4, 768, generator=generator)
        big = {
            "fvu": StreamingFVU.empty((4, 768)).update(source + 0.5, source),
            "means": [StreamingMean.empty((4,)).update(source[:, :, i]) for i in range(8)],
        }
        big_synced, collectives = count_collectives(big)
        save_result(
            out_dir,
            rank,
            {
                "fvu": synced["fvu"].state_dict(),
                "fvu_compute": synced["fvu"].compute(),
                "l2": synced["l2"].compute(),
                "l2_count": synced["l2"].count,
                "density": synced["density"].compute(),
                "density_count": synced["density"].count,
                "local_density": local["density"].total,
                "collectives": torch.tensor(collectives),
                "big_counts": torch.stack(
                    [big_synced["fvu"].count, *(m.count for m in big_synced["means"])]
                ),
            },
        )
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def one_thread():
    """Many small ops on a shared, loaded machine: one thread avoids OpenMP's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """One process over every row, and float64 two-pass references."""
    with one_thread():
        return compute_reference()


def compute_reference():
    one_process = stream(0, ROWS)
    total = torch.zeros(SHAPE, dtype=torch.float64)
    fired = torch.zeros(D_SAE, dtype=torch.float64)
    error = torch.zeros(SHAPE[0], dtype=torch.float64)
    l2 = torch.zeros(SHAPE[0], dtype=torch.float64)  # the float32 rows, summed in float64
    for decoded, source, learned in dataset_rows(0, ROWS):
        total += source.double().sum(0)
        fired += (learned > 0).double().sum(0)
        squared = (decoded.double() - source.double()).square()
        error += squared.sum((0, -1))
        l2 += l2_reconstruction(decoded, source, reduce="none").sum(0, dtype=torch.float64)
    mean = total / ROWS
    m2 = torch.zeros(SHAPE, dtype=torch.float64)
    for _, source, _ in dataset_rows(0, ROWS):
        m2 += (source.double() - mean).square().sum(0)
    return {
        "one_process": one_process,
        "fvu": error / m2.sum(-1),
        "l2": l2 / ROWS,
        "fired": fired,
    }


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    world_size = request.param
    return world_size, run_ranks(worker, world_size, tmp_path_factory.mktemp(f"fvu{world_size}"))


def test_shards_are_uneven_and_cover_every_row():
    for world_size, shards in SHARDS.items():
        assert len(shards) == world_size
        assert shards[0][0] == 0
        assert shards[-1][1] == ROWS
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shards))
        assert len({stop - start for start, stop in shards}) == world_size
    assert any(start == stop for start, stop in SHARDS[3])


def test_dataset_rows_are_the_same_however_they_are_cut():
    whole = [torch.cat(parts) for parts in zip(*dataset_rows(2_990, 6_010), strict=True)]
    pieces = [dataset_rows(2_990, 3_000), dataset_rows(3_000, 4_321), dataset_rows(4_321, 6_010)]
    cut = [torch.cat(parts) for parts in zip(*(p for g in pieces for p in g), strict=True)]
    for a, b in zip(whole, cut, strict=True):
        assert a.shape[0] == 3_020
        assert torch.equal(a, b)


def test_one_process_meets_the_reference(reference):
    # The references agree with each other before the ranks are compared with them.
    one_process = reference["one_process"]["fvu"]
    assert one_process.count.item() == ROWS
    torch.testing.assert_close(one_process.compute(), reference["fvu"], rtol=1e-9, atol=0)


def test_every_rank_gets_the_exact_global_fvu(ranks, reference):
    _, results = ranks
    one_process = reference["one_process"]["fvu"]
    for result in results:
        fvu = StreamingFVU.from_state_dict(result["fvu"])
        assert fvu.count.item() == ROWS
        torch.testing.assert_close(fvu.compute(), one_process.compute(), rtol=1e-9, atol=0)
        torch.testing.assert_close(fvu.compute(), reference["fvu"], rtol=1e-9, atol=0)
        torch.testing.assert_close(fvu.mean, one_process.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(fvu.m2, one_process.m2, rtol=1e-9, atol=0)
        assert result["l2_count"].item() == ROWS
        torch.testing.assert_close(result["l2"], reference["l2"], rtol=1e-12, atol=0)
    # Every rank merged the same gathered states in the same order: bit-identical results.
    first = results[0]
    for result in results[1:]:
        for key in ("fvu_compute", "l2", "density"):
            assert torch.equal(result[key], first[key]), key
        for name, value in result["fvu"].items():
            assert torch.equal(value, first["fvu"][name]), name


def test_a_mixed_tree_is_reduced_with_one_collective(ranks):
    world_size, results = ranks
    expected_rows = sum(3 + rank for rank in range(world_size))
    for result in results:
        assert result["collectives"].item() == 1
        assert result["big_counts"].tolist() == [expected_rows] * 9


def test_feature_density_and_dead_latents(ranks, reference):
    world_size, results = ranks
    fired = reference["fired"]
    frequency = fired / ROWS
    # The data set has what the test needs: dead, rare and single-row latents.
    assert (fired[DEAD] == 0).all()
    assert fired[LAST_ROW_ONLY].item() == 1
    assert (fired[RARE] > 0).any()
    reference_dead = (fired == 0).sum().item()  # the never-firing latents, counted
    assert 0 < reference_dead < D_SAE
    for result in results:
        assert result["density_count"].item() == ROWS
        # Sums of 0/1 in float64 are exact, and so is one division by the same count.
        assert torch.equal(result["density"], frequency)
        dead_fraction = (result["density"] == 0).float().mean()
        assert dead_fraction.item() == pytest.approx(reference_dead / D_SAE, rel=1e-7)
        assert (result["density"] == 0).sum().item() == reference_dead
    # The latent that fires on the last row only looks dead on every other rank's shard.
    local = [result["local_density"][LAST_ROW_ONLY].item() for result in results]
    assert local[-1] == 1
    assert local[:-1] == [0] * (world_size - 1)
