"""Test-suite set-up: the full jaxtyping + beartype runtime check on the whole package.

It is installed here, before pytest imports ``sae_losses``, so every annotated signature is
checked on every call the suite makes. The check cannot run inside ``torch.compile(fullgraph=True)``
(its wrapper is not traceable), so tests marked ``compile`` run in a second pass with
``--no-typecheck``; ``make test`` runs both passes.
"""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-typecheck",
        action="store_true",
        help="do not install the jaxtyping + beartype import hook (for the compile tests)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--no-typecheck"):
        from jaxtyping import install_import_hook

        install_import_hook("sae_losses", "beartype.beartype")


# Scripts that tests/test_typing.py checks with mypy: neither tests nor doctests, and bad_usage.py
# raises when imported. (Paths here are relative to this file, whatever the working directory.)
collect_ignore = ["tests/typing"]

# Doctests that call torch.compile: they run with the compile tests, in the pass without the hook.
COMPILING_DOCTEST_MODULES = ("sae_losses._fused",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.name.startswith(COMPILING_DOCTEST_MODULES):
            item.add_marker(pytest.mark.compile)
