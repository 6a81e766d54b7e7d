"""Static types: a typed user script passes mypy --strict, and two wrong calls are rejected.

mypy runs with the project's ``[tool.mypy]`` configuration (strict) and its default cache, which
``make test``'s typecheck step has just filled, so each run here takes about a second (about 15 s
with a cold cache). The scripts live in ``tests/typing/``, which pytest does not collect.
"""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD = "tests/typing/good_usage.py"
BAD = "tests/typing/bad_usage.py"

# What mypy must say about each rejected line of bad_usage.py, keyed by a piece of that line.
REJECTED = {
    'reduce="avg"': (
        'Argument "reduce" to "l2_reconstruction" has incompatible type "Literal[\'avg\']"; '
        "expected \"Literal['none', 'mean', 'sum']\"  [arg-type]"
    ),
    "l1_absolute([1.0, 2.0])": (
        'Argument 1 to "l1_absolute" has incompatible type "list[float]"; '
        'expected "Tensor"  [arg-type]'
    ),
}


def mypy(script: str) -> subprocess.CompletedProcess[str]:
    """One mypy run on one script, with the configuration in pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-color-output", "--no-pretty", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_typed_training_step_and_eval_loop_pass_mypy_strict() -> None:
    result = mypy(GOOD)
    assert result.stdout == "Success: no issues found in 1 source file\n", result.stdout
    assert result.returncode == 0, result.stderr


def test_reduce_typo_and_list_argument_are_rejected() -> None:
    result = mypy(BAD)
    lines = (ROOT / BAD).read_text().splitlines()
    expected = []
    for needle, message in REJECTED.items():
        (number,) = [i for i, line in enumerate(lines, start=1) if needle in line]
        expected.append(f"{BAD}:{number}: error: {message}")
    assert result.stdout.splitlines() == [
        *expected,
        "Found 2 errors in 1 file (checked 1 source file)",
    ], result.stdout
    assert result.returncode == 1, result.stderr


def test_typed_usage_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The typed script is real code: it trains three steps and evaluates on one process."""
    runpy.run_path(str(ROOT / GOOD), run_name="__main__")
    printed = capsys.readouterr().out
    assert re.search(r"'l2': [0-9.e-]+, 'l1': [0-9.e-]+, 'l2 sum': [0-9.e-]+", printed), printed
