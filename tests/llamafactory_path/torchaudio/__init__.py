"""Test-only stand-in for torchaudio (docs/llamafactory.md, "CPU test set-up").

LLaMA-Factory 0.9.5 imports torchaudio at the top of ``llamafactory/data/mm_plugin.py`` but uses it
only to load audio. The package index's torchaudio builds need CUDA libraries, which the CPU test
machine lacks, so the LLaMA-Factory tests put this folder on PYTHONPATH instead. Audio stays
unsupported in those runs: any use raises.
"""


def __getattr__(name: str):
    raise ImportError(f"torchaudio.{name}: the test stub of torchaudio has no audio support (tests/llamafactory_stubs)")
