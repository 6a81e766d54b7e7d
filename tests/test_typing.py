"""Static types: a typed user script passes mypy --strict, and wrong calls are rejected.

mypy's exit code is the verdict, not its message text, so no mypy version is pinned.
``tests/typing/good_usage.py`` pins result types with ``assert_type``; each wrong call in
``tests/typing/bad_usage.py`` carries ``# type: ignore[code]``, and ``warn_unused_ignores`` in
``[tool.mypy]`` makes an ignore that no longer fires an error. So both scripts must pass.

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
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_wrong_call_is_rejected_with_its_error_code() -> None:
    # Every `# type: ignore[code]` must be used: warn_unused_ignores fails the run otherwise.
    ignores = re.findall(r"# type: ignore\[[a-z-]+\]", (ROOT / BAD).read_text())
    assert len(ignores) >= 2, ignores
    result = mypy(BAD)
    assert result.returncode == 0, result.stdout + result.stderr


def test_typed_usage_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The typed script is real code: it trains three steps and evaluates on one process."""
    runpy.run_path(str(ROOT / GOOD), run_name="__main__")
    printed = capsys.readouterr().out
    assert re.search(r"'l2': [0-9.e-]+, 'l1': [0-9.e-]+, 'l2 sum': [0-9.e-]+", printed), printed
