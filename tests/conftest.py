import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def baselines(tmp_path_factory):
    """Runs of examples/sft_trainer.py without sequence parallelism, cached by name for the session."""
    from example_runs import run_example

    cache = {}

    def get(name, nproc=1, extra=()):
        if name not in cache:
            cache[name] = run_example(tmp_path_factory.mktemp(name), nproc=nproc, extra=extra)
        return cache[name]

    return get


@pytest.fixture(autouse=True)
def _isolated_ulysses_state():
    """Every test starts and ends as ``import ulysses_attn`` left the process: ``disable()`` undoes
    every patch made since (Trainer, accelerate, TRL, models), destroys the SP groups and resets the
    runtime state (forced kernel, layout cache, warnings said, kernels used)."""
    import ulysses_attn

    ulysses_attn.disable()
    yield
    ulysses_attn.disable()
