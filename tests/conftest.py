import copy
import os

import pytest

from tests.tiny_models import save_tiny


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, split the cores between the workers: torch's default (every core in
    every worker) oversubscribes them, and its OpenMP threads thrash. Subprocesses the tests
    start inherit the count through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny matmuls on shared cores spin OpenMP threads
    (two threads ran ~30x slower here). Modules take it with `usefixtures`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _perplexity_cache(tmp_path, monkeypatch):
    """Each test its own empty dense-perplexity cache: none writes into the user's, and no
    test's figure leaks into another. Only this cache moves: the built-in models' dequantized
    copies (SECATEUR_CACHE) stay shared, as rebuilding them per test would take minutes."""
    monkeypatch.setenv("SECATEUR_PERPLEXITY_CACHE", str(tmp_path / "perplexity-cache"))


@pytest.fixture(scope="session")
def smollm2():
    """The bundled real model, loaded once per session; tests that change it take a copy."""
    from secateur.formats.loader import load

    return load("smollm2-135m")


@pytest.fixture
def smollm2_copy(smollm2):
    from secateur.models import adapter_for
    from secateur.models.loading import Loaded

    model = copy.deepcopy(smollm2.model)
    return Loaded(model, smollm2.tokenizer, adapter_for(model), smollm2.name, smollm2.path)


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory: a saved tiny random model of a family, with a byte-level tokenizer."""

    def make(family: str = "llama", seed: int = 0):
        return save_tiny(family, tmp_path / f"tiny-{family}-{seed}", seed)

    return make
