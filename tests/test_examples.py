"""The demo, the evaluation example and the benchmark script run, and say what they should."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.compile  # each of them calls torch.compile


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_demo_trains_syncs_and_plots(tmp_path):
    run(
        "examples/demo.py",
        "--steps",
        "120",
        "--epochs",
        "3",
        "--batch-size",
        "128",
        "--out-dir",
        str(tmp_path),
    )
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    for name in ("eager", "compiled", "ddp"):
        total = summary[name]["history"]["total"]
        assert total[-1] < total[0], (name, total)
    ddp = summary["ddp"]
    assert ddp["eval_rows"] == 4 * 128
    for metric in ("l2", "l1", "total"):
        synced, single = ddp["synced_eval"][metric], ddp["one_process_eval"][metric]
        assert synced == pytest.approx(single, rel=1e-12, abs=0)
    for name in ("eager", "compiled", "ddp"):  # the held-out quality columns of the table
        result = summary[name]
        assert 0 < result["fvu"] < 1, name
        assert 0 < result["l0"] < 128, name  # 128 latents by default
        assert 0 <= result["dead_fraction"] <= 1, name
        assert (result["dead_fraction"] * 128).is_integer(), name
    plot = Path(summary["plot"])
    assert plot.stat().st_size > 10_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_options():
    result = subprocess.run(
        [sys.executable, "examples/demo.py", "--steps", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--steps: must be a positive integer, got 0" in result.stderr


def test_eval_loop_gives_the_same_metrics_on_one_and_two_processes():
    one = run("examples/eval_loop.py").strip()
    two = (
        run(
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "examples/eval_loop.py",
        )
        .strip()
        .splitlines()[-1]
    )
    assert one.startswith("world_size=1 rows=118 ")
    assert two == one.replace("world_size=1", "world_size=2")


def test_benchmark_smoke_run_prints_every_figure():
    output = run("benchmarks/bench.py", "--quick")
    for heading in (
        "L2 forward",
        "L1 forward",
        "L2 forward + backward",
        "L1 forward + backward",
        "Per-call overhead on 8x16",
        "Streaming mean",
        "Bytes saved for backward",
        "Goals",
    ):
        assert f"### {heading}" in output
    assert "| bytes saved beyond the inputs (eager, fused) | 0, 0 |" in output


def test_family_and_eval_benchmark_smoke_runs_print_every_table():
    family = run("benchmarks/bench_family.py", "--quick")
    for heading in ("Masked calls", "Sparsity terms", "Size sweep, L2", "Size sweep, L1"):
        assert f"### {heading}" in family
    assert "masked / unmasked" in family
    evaluation = run("benchmarks/bench_eval.py", "--quick")
    assert "### FVU on (64, 48)" in evaluation
    # The precision row at offset 3000: our two FVU columns at rounding level.
    row = next(line for line in evaluation.splitlines() if line.startswith("| 3000 |"))
    streamed, _, _, gathered, _ = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
    assert streamed < 1e-12
    assert gathered < 1e-12


@pytest.fixture(scope="module")
def evaluate_example():
    """examples/evaluate.py as a module; it puts examples/ on sys.path to import the demo."""
    path, modules, threads = list(sys.path), set(sys.modules), torch.get_num_threads()
    torch.set_num_threads(1)  # as the example's main() does; tiny matmuls gain nothing from more
    spec = importlib.util.spec_from_file_location(
        "examples_evaluate", ROOT / "examples" / "evaluate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = path
    torch.set_num_threads(threads)
    for name in set(sys.modules) - modules:
        if name in ("demo", "examples_evaluate"):
            del sys.modules[name]


EVALUATE_OPTIONS = ("--steps", "300", "--rows", "3000", "--chunk", "256")


def test_evaluate_gives_the_same_metrics_on_one_and_two_processes(tmp_path):
    one = run("examples/evaluate.py", *EVALUATE_OPTIONS, "--out-dir", str(tmp_path / "one"))
    two = run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "examples/evaluate.py",
        *EVALUATE_OPTIONS,
        "--out-dir",
        str(tmp_path / "two"),
    )
    one_lines, two_lines = one.strip().splitlines(), two.strip().splitlines()
    assert one_lines[0].startswith("world_size=1 rows per rank=[3000] ")
    # Uneven shards: chunks of 256, 153, 256, 36, ..., 196 dealt out in turn.
    assert two_lines[0].startswith("world_size=2 rows per rank=[2244, 756] ")
    assert one_lines[-1].startswith("Feature-density histogram: ")
    labels = [line[:34].rstrip() for line in one_lines[1:-1]]
    assert labels[0] == "held-out rows"
    assert {"FVU", "dead fraction", "relative reconstruction bias"} <= set(labels)
    assert len(labels) == 11
    # The printed metric lines (10 significant digits) are identical...
    assert one_lines[1:-1] == two_lines[1:-1]
    # ...and the full-precision numbers agree to 1e-12, the firing frequencies exactly.
    result = json.loads((tmp_path / "one" / "evaluate_metrics.json").read_text())
    result_two = json.loads((tmp_path / "two" / "evaluate_metrics.json").read_text())
    assert result.keys() == result_two.keys()
    assert result["density"] == result_two["density"]
    for key in result.keys() - {"density"}:
        assert result_two[key] == pytest.approx(result[key], rel=1e-12, abs=0), key
    for directory in ("one", "two"):
        png = (tmp_path / directory / "feature_density.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(png) > 10_000
    # Sane values for a trained toy SAE.
    assert result["rows"] == 3000
    assert 0 < result["fvu"] < 0.5
    assert result["explained_variance"] == pytest.approx(1 - result["fvu"], abs=1e-15)
    assert result["mse_saelens"] == pytest.approx(32 * result["mse"], rel=1e-15)
    assert 0 <= result["dead_fraction"] <= 1
    assert result["dead_latents"] == sum(f == 0 for f in result["density"])
    assert result["dead_fraction"] == result["dead_latents"] / 128
    assert 0 < result["l0"] < 128
    assert 0.5 < result["cosine_similarity"] <= 1
    assert 0.5 < result["relative_reconstruction_bias"] < 1.5


def test_evaluate_metrics_match_float64_references(evaluate_example):
    args = evaluate_example.parse_args(["--steps", "40", "--rows", "700", "--chunk", "128"])
    data = evaluate_example.ToySuperposition(args)
    sae = evaluate_example.trained_sae(args, data)
    metrics = evaluate_example.evaluate(sae, data, args)
    result = evaluate_example.summarise(metrics, args.d_model)
    sizes = evaluate_example.chunk_sizes(700, 128)
    assert sizes == [128, 76, 128, 18, 128, 76, 128, 18]
    offset = evaluate_example.HELD_OUT_OFFSET
    with torch.no_grad():
        source = torch.cat([data.batch(offset + i, n) for i, n in enumerate(sizes)])
        learned, decoded = sae(source)
    x, z, x_hat = source.double(), learned.double(), decoded.double()
    error = (x_hat - x).square()
    dot = (x_hat * x).sum(-1)
    nonzero = x.norm(dim=-1) > 0
    cosine = dot[nonzero] / (x_hat.norm(dim=-1) * x.norm(dim=-1))[nonzero]
    density = (z > 0).double().mean(0)
    expected = {
        "mse": error.mean(-1).mean(),
        "mse_saelens": error.sum(-1).mean(),
        # Two passes: the mean of all rows first, then squared deviations about it.
        "fvu": error.sum() / (x - x.mean(0)).square().sum(),
        "l0": (z != 0).sum(-1).double().mean(),
        "l1": z.abs().sum(-1).mean(),
        "relative_reconstruction_bias": x_hat.square().sum(-1).mean() / dot.mean(),
        "cosine_similarity": cosine.mean(),
        "dead_fraction": (density == 0).double().mean(),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value.item(), rel=1e-6, abs=0), key
    assert result["rows"] == 700
    assert result["cosine_rows"] == int(nonzero.sum()) < 700  # the toy has all-zero rows
    assert result["density"] == density.tolist()  # counts over rows: exact


def test_evaluate_shards_cover_every_row_once_with_an_empty_rank(evaluate_example):
    # 300 rows in chunks of 256 and 44: on 3 ranks the third has no rows at all.
    args = evaluate_example.parse_args(["--steps", "5", "--rows", "300", "--chunk", "256"])
    data = evaluate_example.ToySuperposition(args)
    sae = evaluate_example.trained_sae(args, data)
    whole = evaluate_example.evaluate(sae, data, args)
    shards = [evaluate_example.evaluate(sae, data, args, rank=r, world_size=3) for r in range(3)]
    assert [shard["mse"].count.item() for shard in shards] == [256, 44, 0]
    merged = {key: shards[0][key].merge(shards[1][key]).merge(shards[2][key]) for key in whole}
    one, three = (evaluate_example.summarise(m, args.d_model) for m in (whole, merged))
    assert one["density"] == three["density"]
    for key in one.keys() - {"density"}:
        assert three[key] == pytest.approx(one[key], rel=1e-12, abs=0), key


def test_evaluate_rejects_bad_options(evaluate_example, capsys):
    for argv, message in (
        (["--rows", "0"], "--rows: must be a positive integer, got 0"),
        (["--rows", "1"], "--rows must be at least 2 for a variance, got 1"),
        (["--d-model", "64"], "needs --d-model < --n-features"),
        (["--checkpoint", "/nonexistent/sae.pt"], "is not a file"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_example.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
