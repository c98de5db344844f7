"""TEST-ONLY: let accelerate keep FSDP on a CPU-only machine (gloo), so the FSDP tests can run in CI.

Not part of the package, never imported by it. ``tests/test_fsdp.py`` puts this folder on
``PYTHONPATH`` of the processes it launches and sets ``ULYSSES_TEST_FSDP_ON_CPU=1``; Python imports
``sitecustomize`` at start-up in each of them, before the training script runs.

Why: on a machine without GPUs the Trainer needs ``use_cpu=True`` to run distributed, and accelerate
then sets ``DistributedType.MULTI_CPU`` and ``AcceleratorState.__init__`` never reaches its FSDP
branch (only the ``MULTI_GPU``-like types are switched to ``FSDP``): the FSDP plugin is dropped
without a word and the run trains DDP. Without ``use_cpu`` the Trainer refuses FSDP ("Using fsdp
only works in distributed training"). PyTorch's FSDP2 (``fully_shard``) itself runs on CPU with
gloo. The shim does, after the original ``AcceleratorState.__init__``, what that FSDP branch would
have done: it is the smallest change that keeps FSDP (accelerate 1.16).
"""

from __future__ import annotations

import os

if os.environ.get("ULYSSES_TEST_FSDP_ON_CPU") == "1":
    import functools

    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _original_init = AcceleratorState.__init__

    @functools.wraps(_original_init)
    def _init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = _init_keeping_fsdp
