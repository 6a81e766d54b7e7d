"""Settings for the real-peer suite (peer_tests/, run by `make test-peers`).

Each file here runs in its own peer's venv (.peer-venvs/<peer>/), with the repository's root
conftest.py, so sae_losses is imported under the jaxtyping + beartype runtime check as in
`make test`. The peers' own deprecation notices about their dependencies are silenced: they are
not this library's, and the installed versions are pinned.
"""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    for message in (
        # sae_lens/load_model.py imports transformer_lens.utils (TransformerLens 3.x).
        "The 'utils' module has been deprecated",
        # transformer_lens 3.x: the tiny model the SAELens evals run on is a HookedTransformer.
        "HookedTransformer is deprecated",
    ):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:DeprecationWarning")
