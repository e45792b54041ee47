import os

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=40, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest (and without oversubscription) on one intra-op thread;
    the caller's setting is restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The figures of tests/test_ops_fuzz.py (reliability.md, "Tests that prove it"):
    properties x examples run, and counterexamples (failed properties)."""
    figures = getattr(config, "_recmeta_fuzz_figures", None)
    if figures:  # (only when the fuzz ran)
        failed = [r for r in terminalreporter.stats.get("failed", []) if "test_ops_fuzz" in r.nodeid]
        per = ", ".join(f"{k} {v}" for k, v in sorted(figures.items()))
        terminalreporter.write_sep("-", "op fuzz figures")
        terminalreporter.write_line(
            f"op fuzz: {len(figures)} properties x examples run: {sum(figures.values())} ({per}); "
            f"counterexamples: {len(failed)}")
