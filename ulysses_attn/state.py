"""The one runtime state of the package: groups, options, applied patches, caches, warnings said.

:func:`ulysses_attn.enable` / :func:`~ulysses_attn.init_sequence_parallel` fill it;
:func:`ulysses_attn.disable` / :func:`~ulysses_attn.destroy_sequence_parallel` clear it. Every
module reads and writes its process-wide values here, so one :func:`reset` returns the process to
what ``import ulysses_attn`` left.
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from .groups import SequenceParallel

__all__ = ["Runtime", "STATE", "reset", "active_sp", "warn_once", "log_once", "announce_once"]

logger = logging.getLogger("ulysses_attn")


@dataclass
class Runtime:
    sp: SequenceParallel | None = None
    memory: Any = None  # MemoryOptions set by enable() for every Trainer (None: the defaults)
    forced_kernel: str | None = None
    preferred_kernel: str | None = None  # the kernel the script's attn_implementation asked for (select_backend)
    select_backend: bool = False  # enable(select_backend=True): models built under SP use ulysses_flash
    selected_from: set = field(default_factory=set)  # the attn_implementations select_backend replaced
    layouts: Any = None  # layout.LayoutCache, made on first use
    applied: list = field(default_factory=list)  # patches.Applied records, in application order
    said: set = field(default_factory=set)  # keys of warnings / log lines already given
    used_kernels: set = field(default_factory=set)  # kernel labels attend() ran
    replayed_attention_outputs: int = 0  # attention kernel calls that selective checkpointing skipped
    unsharded: int = 0  # depth of transparent.unsharded() blocks: attention runs as without SP
    capture: Any = None  # transparent.ShardedOutput of a sharded_hidden_states() block
    transparent: bool | None = None  # enable(transparent=...): None picks per Trainer (loss.loss_path)
    attention_calls: int = 0  # calls of the ulysses_flash function (guards: did a layer attend?)
    checked_models: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # guards passed a SP forward
    checking_models: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # guards watching a SP forward
    selected_models: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # given ulysses_flash by select_backend
    prepared_models: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # whose inputs the package shards
    logit_transforms: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # head.py's checks


STATE = Runtime()


def reset() -> None:
    """Forget everything but the applied patches (those are undone by :func:`patches.undo_all`)."""
    applied = STATE.applied
    STATE.__dict__.update(Runtime().__dict__)
    STATE.applied = applied


def active_sp() -> SequenceParallel | None:
    """The SP group the models of this process run under now: none inside
    :func:`ulysses_attn.transparent.unsharded` (generation, cached forwards)."""
    return None if STATE.unsharded else STATE.sp


def _rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def warn_once(key: object, message: str, *args: object) -> None:
    """``logger.warning`` once per ``key`` per process, on rank 0 only (the same on every rank)."""
    if key in STATE.said:
        return
    STATE.said.add(key)
    if _rank0():
        logger.warning(message, *args)


def log_once(key: object, message: str, *args: object) -> None:
    """``logger.info`` once per ``key`` (every rank: these lines describe the rank's own choice)."""
    if key not in STATE.said:
        STATE.said.add(key)
        logger.info(message, *args)


def announce_once(key: object, message: str) -> None:
    """Print ``message`` to stderr once per ``key``, on rank 0 only, whatever the logging level:
    what a run is about to do (the start line of a sequence-parallel Trainer)."""
    if key in STATE.said:
        return
    STATE.said.add(key)
    if _rank0():
        print(message, file=sys.stderr, flush=True)
