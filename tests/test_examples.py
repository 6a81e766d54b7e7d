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


def test_versions_benchmark_times_both_versions_of_every_shared_term():
    output = run("benchmarks/bench_versions.py", "--quick", "--before", "HEAD")
    assert output.count("| term | before / floor | after / floor | after / before |") == 3
    for term in (
        "l0_norm",
        "jumprelu_l0",
        "fraction_of_variance_unexplained",
        "StreamingFVU.update",
    ):
        assert f"| {term} | " in output


@pytest.fixture(scope="module")
def evaluate_example():
    """examples/evaluate.py as a module; it puts examples/ on sys.path to import its helpers."""
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
        if name in ("demo", "tiny_lm", "examples_evaluate"):
            del sys.modules[name]


EVALUATE_OPTIONS = ("--lm-steps", "200", "--sae-steps", "300", "--sequences", "100")


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
    assert one_lines[0].startswith("world_size=1 sequences per rank=[100] ")
    # Uneven shards: chunks of 32, 19, 32, 4, 13 dealt out in turn.
    assert two_lines[0].startswith("world_size=2 sequences per rank=[77, 23] ")
    assert one_lines[-1].startswith("Feature-density histogram: ")
    labels = [line[:36].rstrip() for line in one_lines[1:-1]]
    assert labels[0] == "held-out tokens (BOS left out)"
    assert {"FVU", "CE loss score", "KL divergence score", "cosine similarity"} <= set(labels)
    assert len(labels) == 22
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
    # Sane values for a trained LM and SAE: the model uses its context (clean CE well below the
    # ablated CE), and the SAE keeps most of it.
    assert result["tokens"] == 100 * 23
    assert result["scored_predictions"] == 100 * 22
    assert result["ce_clean"] < result["ce_spliced"] < result["ce_ablated"]
    assert result["ce_ablated"] - result["ce_clean"] > 1.0
    assert 0.5 < result["ce_loss_score"] < 1
    assert 0.5 < result["kl_div_score"] < 1
    assert 0 < result["fvu"] < 0.5
    assert result["explained_variance"] == pytest.approx(1 - result["fvu"], abs=1e-15)
    assert result["mse_saelens"] == pytest.approx(32 * result["mse"], rel=1e-15)
    assert result["dead_latents"] == sum(f == 0 for f in result["density"])
    assert result["frac_alive"] == 1 - result["dead_latents"] / 128
    assert 0 < result["l0"] < 128
    assert 0.5 < result["cosine_similarity"] <= 1


def test_evaluate_metrics_match_float64_references(evaluate_example):
    args = evaluate_example.parse_args(
        ["--lm-steps", "20", "--sae-steps", "20", "--sequences", "40", "--chunk", "16"]
    )
    language, model, sae = evaluate_example.trained_models(args)
    metrics = evaluate_example.evaluate(language, model, sae, args)
    result = evaluate_example.summarise(metrics, args.d_model)
    sizes = evaluate_example.chunk_sizes(40, 16)
    assert sizes == [16, 9, 15]
    offset = evaluate_example.HELD_OUT_OFFSET
    tokens = torch.cat([language.batch(offset + i, n, args.length) for i, n in enumerate(sizes)])
    with torch.no_grad():
        source, learned, decoded, logits, targets = evaluate_example.three_runs(model, sae, tokens)
    x, z, x_hat = source.double(), learned.double(), decoded.double()
    clean, spliced, ablated = (t.double() for t in logits)
    error = (x_hat - x).square()
    dot = (x_hat * x).sum(-1)
    nonzero = x.norm(dim=-1) > 0

    def ce(lg):
        return (torch.logsumexp(lg, -1) - lg.gather(-1, targets[:, None])[:, 0]).mean()

    def kl(lg):
        p = torch.log_softmax(clean, -1)
        return (p.exp() * (p - torch.log_softmax(lg, -1))).sum(-1).mean()

    expected = {
        "mse": error.mean(-1).mean(),
        "mse_saelens": error.sum(-1).mean(),
        "fvu": error.sum() / (x - x.mean(0)).square().sum(),
        "l0": (z != 0).sum(-1).double().mean(),
        "l1": z.abs().sum(-1).mean(),
        "relative_reconstruction_bias": x_hat.square().sum(-1).mean() / dot.mean(),
        "cosine_similarity": (dot / (x_hat.norm(dim=-1) * x.norm(dim=-1)))[nonzero].mean(),
        "l2_norm_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1))[nonzero].mean(),
        "ce_clean": ce(clean),
        "ce_spliced": ce(spliced),
        "ce_ablated": ce(ablated),
        "ce_loss_score": (ce(ablated) - ce(spliced)) / (ce(ablated) - ce(clean)),
        "kl_spliced": kl(spliced),
        "kl_ablated": kl(ablated),
        "kl_div_score": (kl(ablated) - kl(spliced)) / kl(ablated),
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-7), key
    assert result["tokens"] == 40 * (args.length - 1)
    assert result["density"] == (z != 0).double().mean(0).tolist()  # counts over rows: exact


def test_evaluate_shards_cover_every_sequence_once_with_an_empty_rank(evaluate_example):
    # 40 sequences in chunks of 32 and 8: on 3 ranks the third has no tokens at all.
    args = evaluate_example.parse_args(
        ["--lm-steps", "5", "--sae-steps", "5", "--sequences", "40", "--chunk", "32"]
    )
    language, model, sae = evaluate_example.trained_models(args)
    whole = evaluate_example.evaluate(language, model, sae, args)
    shards = [
        evaluate_example.evaluate(language, model, sae, args, rank=r, world_size=3)
        for r in range(3)
    ]
    assert [shard["mse"].count.item() for shard in shards] == [32 * 23, 8 * 23, 0]
    merged = {key: shards[0][key].merge(shards[1][key]).merge(shards[2][key]) for key in whole}
    one, three = (evaluate_example.summarise(m, args.d_model) for m in (whole, merged))
    assert one["density"] == three["density"]
    for key in one.keys() - {"density"}:
        assert three[key] == pytest.approx(one[key], rel=1e-12, abs=0), key


def test_evaluate_rejects_bad_options(evaluate_example, capsys):
    for argv, message in (
        (["--sequences", "0"], "--sequences: must be a positive integer, got 0"),
        (["--length", "3"], "--length must be at least 4"),
        (["--vocab", "2"], "--vocab must be at least 3"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_example.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
