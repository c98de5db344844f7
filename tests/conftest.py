import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def baselines(tmp_path_factory):
    """Runs of examples/sft_trainer.py without sequence parallelism, cached by name for the session."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from demo import run_example

    cache = {}

    def get(name, nproc=1, extra=()):
        if name not in cache:
            cache[name] = run_example(tmp_path_factory.mktemp(name), nproc=nproc, extra=extra)
        return cache[name]

    return get


@pytest.fixture(autouse=True)
def _clean_sequence_parallel_state():
    """Every test starts and ends without an SP group or a forced kernel."""
    import ulysses_attn

    ulysses_attn.destroy_sequence_parallel()
    ulysses_attn.set_kernel(None)
    yield
    ulysses_attn.destroy_sequence_parallel()
    ulysses_attn.set_kernel(None)
