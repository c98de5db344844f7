"""TEST-ONLY: let accelerate keep FSDP on a CPU-only machine (gloo), so the FSDP tests can run in CI.

Not part of the package, never imported by it. ``tests/test_fsdp.py`` puts this folder on
``PYTHONPATH`` of the processes it launches and sets ``ULYSSES_TEST_FSDP_ON_CPU=1``; Python imports
``sitecustomize`` at start-up in each of them, before the training script runs. Tests that start
their own worker processes call :func:`keep_fsdp_on_cpu` there.

Why: on a machine without GPUs the Trainer needs ``use_cpu=True`` to run distributed, and accelerate
then sets ``DistributedType.MULTI_CPU`` and ``AcceleratorState.__init__`` never reaches its FSDP
branch (only the ``MULTI_GPU``-like types are switched to ``FSDP``): the FSDP plugin is dropped
without a word and the run trains DDP. Without ``use_cpu`` the Trainer refuses FSDP ("Using fsdp
only works in distributed training"). PyTorch's FSDP2 (``fully_shard``) itself runs on CPU with
gloo. The shim does, after the original ``AcceleratorState.__init__``, what that FSDP branch would
have done: it is the smallest change that keeps FSDP (accelerate 1.16).
"""

from __future__ import annotations

import functools
import os


def keep_fsdp_on_cpu() -> None:
    """Make ``AcceleratorState`` keep a given FSDP plugin when accelerate chose ``MULTI_CPU``."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_keeps_fsdp_on_cpu", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._keeps_fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


if os.environ.get("ULYSSES_TEST_FSDP_ON_CPU") == "1":
    keep_fsdp_on_cpu()
