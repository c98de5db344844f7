"""PyTorch FSDP (through accelerate and the HF Trainer) beside sequence parallelism.

FSDP needs no change of the package: FSDP shards every parameter over the whole world (HSDP: over
blocks of it, replicated across them) and averages the gradients over all ranks, which is exactly the
reduction the SP loss is scaled for, as under DDP and ZeRO (docs/fsdp.md). What lives here:

* :func:`fsdp_note`: what the start line says about FSDP, FSDP2 / FSDP1 when it is on, and that it
  was asked for but is not in use when accelerate trains without it (on a CPU-only machine
  ``use_cpu`` makes accelerate drop the FSDP plugin and train DDP without a word);
* :func:`refuse_double_checkpointing`: FSDP's own ``activation_checkpointing`` together with the
  package's (``--long-sequence``, ``--selective-checkpointing``) would recompute every layer twice;
* :func:`refuse_conflicting_parallelism`: an accelerate ``ParallelismConfig`` that splits sequences or
  heads as well (``sp_size``, ``cp_size``, ``tp_size`` > 1) is refused before the Trainer builds its
  accelerator, on every rank alike (the config is the same on every rank), so no collective can hang.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "fsdp_requested",
    "fsdp_version",
    "fsdp_note",
    "parallelism_config_of",
    "refuse_conflicting_parallelism",
    "refuse_double_checkpointing",
]

_TRUE = ("1", "true", "yes")


def fsdp_requested(training_args: Any) -> str | None:
    """Where FSDP was asked for: ``"TrainingArguments.fsdp"``, ``"ACCELERATE_USE_FSDP"`` (an accelerate
    config with ``distributed_type: FSDP`` / ``accelerate launch --use_fsdp``; accelerate also sets it
    for a plugin it was given), or ``None``."""
    if getattr(training_args, "fsdp", None):
        return "TrainingArguments.fsdp"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE:
        return "ACCELERATE_USE_FSDP"
    return None


def fsdp_version(accelerator: Any) -> int | None:
    """1 or 2 when the accelerator trains with FSDP (``DistributedType.FSDP`` and an FSDP plugin), else
    ``None``."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    if state.distributed_type != DistributedType.FSDP or plugin is None:
        return None
    return int(getattr(plugin, "fsdp_version", 1))


def fsdp_note(trainer: Any) -> str | None:
    """The start line's words on FSDP for this trainer, or ``None`` when FSDP was neither asked for nor on."""
    version = fsdp_version(trainer.accelerator)
    if version is not None:
        world = trainer.accelerator.num_processes
        replicas = _replicas(getattr(trainer.accelerator, "parallelism_config", None))
        if replicas > 1:  # HSDP: a 2-D mesh (dp_replicate, dp_shard)
            return f"FSDP{version} shards the parameters over {world // replicas} ranks, {replicas} replicas (HSDP)"
        return f"FSDP{version} shards the parameters over all {world} ranks"
    asked = fsdp_requested(trainer.args)
    if asked is None:
        return None
    from accelerate.utils import DistributedType

    kind = trainer.accelerator.distributed_type
    why = " (accelerate drops FSDP under use_cpu)" if kind == DistributedType.MULTI_CPU else ""
    return (
        f"FSDP was asked for ({asked}) but is NOT in use: accelerate trains with {kind}, each rank holds the model{why}"
    )


def _replicas(config: Any | None) -> int:
    """``dp_replicate_size`` of an accelerate ``ParallelismConfig`` (1 without one)."""
    return int(getattr(config, "dp_replicate_size", 1) or 1) if config is not None else 1


def parallelism_config_of(training_args: Any) -> Any | None:
    """The accelerate ``ParallelismConfig`` a Trainer with these arguments will use: the arguments'
    ``parallelism_config``, else the one ``ACCELERATE_USE_PARALLELISM_CONFIG`` makes accelerate build
    from the ``PARALLELISM_CONFIG_*`` variables (an accelerate config's ``parallelism_config``)."""
    config = getattr(training_args, "parallelism_config", None)
    if config is None and os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() in _TRUE:
        from accelerate.parallelism_config import ParallelismConfig

        config = ParallelismConfig()
    return config


_SPLITS = {
    "sp_size": "accelerate's own sequence parallelism (DeepSpeed ALST, sp_backend={backend})",
    "cp_size": "context parallelism (ring attention over the device mesh's 'cp' dimension)",
    "tp_size": "tensor parallelism (the device mesh's 'tp' dimension splits heads and weights)",
}


def refuse_conflicting_parallelism(config: Any | None, sp_size: int) -> None:
    """Raise when an accelerate ``ParallelismConfig`` splits sequences or heads besides ulysses_attn's
    sequence parallelism of size ``sp_size``: its device mesh would then group the ranks differently
    from the SP groups (consecutive ranks) and count a data-parallel size other than world / SP.
    A config that only shards or replicates data (``dp_shard_size``, ``dp_replicate_size``) is fine."""
    if config is None or sp_size <= 1:
        return
    split = {name: int(getattr(config, name, 1) or 1) for name in _SPLITS}
    split = {name: size for name, size in split.items() if size > 1}
    if not split:
        return
    backend = getattr(config, "sp_backend", None)
    what = "; ".join(f"{name}={size}: {_SPLITS[name].format(backend=backend)}" for name, size in split.items())
    raise ValueError(
        f"ulysses_attn: sequence parallelism of size {sp_size} (--sp-size / enable(sp_size) / ULYSSES_SP_SIZE) "
        f"conflicts with accelerate's ParallelismConfig ({what}). Both would split every sequence (or its heads) "
        "over the ranks, with different process groups. Use one: remove sp_size / cp_size / tp_size from the "
        "parallelism_config (TrainingArguments.parallelism_config or the accelerate config's parallelism_config; "
        "dp_shard_size / dp_replicate_size may stay) to train with ulysses_attn, or run without --sp-size to use "
        "accelerate's."
    )


def refuse_double_checkpointing(trainer: Any, package_checkpointing: bool) -> None:
    """Raise when FSDP's own activation checkpointing (``fsdp_config["activation_checkpointing"]`` /
    ``fsdp_activation_checkpointing``) is on together with the package's (``package_checkpointing``:
    ``MemoryOptions.activation_checkpointing``, from ``--long-sequence`` / ``--selective-checkpointing``):
    FSDP wraps each layer in a checkpoint of its own, so both would recompute it. The Trainer refuses
    the same pair when it comes from ``TrainingArguments``, but the package sets that argument after
    the Trainer's check."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not package_checkpointing or plugin is None or not getattr(plugin, "activation_checkpointing", False):
        return
    raise ValueError(
        "ulysses_attn: FSDP's activation checkpointing (fsdp_config activation_checkpointing / the accelerate "
        "config's fsdp_activation_checkpointing) and ulysses_attn's (--long-sequence / --selective-checkpointing / "
        "MemoryOptions(activation_checkpointing=True)) are both on: every decoder layer would be recomputed twice. "
        "Use one: set FSDP's activation_checkpointing to false (ulysses_attn's also offloads the checkpoints and "
        "can keep the attention outputs), or pass MemoryOptions(activation_checkpointing=False) to keep FSDP's."
    )
