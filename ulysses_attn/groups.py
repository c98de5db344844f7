"""Process topology: sequence-parallel (SP) groups and the matching data-parallel (DP) groups.

Ranks are laid out SP-major: SP group ``g`` holds the contiguous ranks ``[g*P, (g+1)*P)`` so that a
group stays inside a node under the usual launcher rank order; DP group ``s`` holds every rank whose
SP rank is ``s``. Gradients still reduce over the whole world (every rank of an SP group holds a
partial gradient of the same replicated parameters), data is sharded over the DP groups only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from .state import STATE

__all__ = [
    "SequenceParallel",
    "init_sequence_parallel",
    "get_sequence_parallel",
    "destroy_sequence_parallel",
]


@dataclass(frozen=True)
class SequenceParallel:
    """Handle returned by :func:`init_sequence_parallel`.

    ``size``/``rank``/``group`` describe this rank's SP group; ``dp_size``/``dp_rank``/``dp_group``
    the data-parallel group of ranks that hold the same SP rank in every SP group.
    """

    size: int
    rank: int
    group: dist.ProcessGroup | None = field(repr=False)
    dp_size: int
    dp_rank: int
    dp_group: dist.ProcessGroup | None = field(repr=False)
    ranks: tuple[int, ...] = ()

    @classmethod
    def single(cls) -> SequenceParallel:
        """The handle of a run without sequence parallelism (P = 1, no groups)."""
        return cls(1, 0, None, 1, 0, None, (0,))


def init_sequence_parallel(sp_size: int) -> SequenceParallel:
    """Create the SP and DP groups for ``sp_size`` and make them the process-wide default.

    Must be called by every rank, after ``torch.distributed`` is initialised (``torchrun``,
    ``accelerate launch``; :func:`ulysses_attn.enable` initialises it for you). ``sp_size=1`` is
    valid and means "no sequence parallelism".

    >>> sp = init_sequence_parallel(4)          # world 8 -> 2 SP groups of 4, DP size 2
    >>> sp.size, sp.rank, sp.dp_size, sp.dp_rank
    """
    if not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size must be a positive integer, got {sp_size!r}.")
    if not dist.is_available() or not dist.is_initialized():
        if sp_size == 1:
            STATE.sp = SequenceParallel.single()
            return STATE.sp
        raise RuntimeError(
            f"Sequence parallelism of size {sp_size} needs torch.distributed, which is not initialised. "
            "Launch with `torchrun --nproc_per_node N ...` or `accelerate launch --num_processes N ...` "
            "(or call torch.distributed.init_process_group first)."
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_size != 0:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"The sequence-parallel size ({sp_size}) must divide the world size ({world}). "
            f"Sizes that work with {world} processes: {divisors}."
        )
    current = STATE.sp
    if current is not None:
        if current.size == sp_size and current.dp_size * current.size == world:
            return current
        raise RuntimeError(
            f"Sequence parallelism is already initialised with size {current.size}; "
            f"call destroy_sequence_parallel() before re-initialising with size {sp_size}."
        )
    dp_size = world // sp_size
    sp_group = dp_group = None
    my_sp_ranks: tuple[int, ...] = ()
    # new_group is collective over the world: every rank creates every group, in the same order.
    for g in range(dp_size):
        ranks = tuple(range(g * sp_size, (g + 1) * sp_size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            sp_group, my_sp_ranks = group, ranks
    for s in range(sp_size):
        ranks = tuple(range(s, world, sp_size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            dp_group = group
    STATE.sp = SequenceParallel(
        size=sp_size,
        rank=rank % sp_size,
        group=sp_group,
        dp_size=dp_size,
        dp_rank=rank // sp_size,
        dp_group=dp_group,
        ranks=my_sp_ranks,
    )
    return STATE.sp


def get_sequence_parallel() -> SequenceParallel | None:
    """The handle made by :func:`init_sequence_parallel`, or ``None`` when not initialised."""
    return STATE.sp


def destroy_sequence_parallel() -> None:
    """Free the SP/DP process groups and forget them (every rank calls it; no collective runs)."""
    sp, STATE.sp = STATE.sp, None
    if sp is None or not (dist.is_available() and dist.is_initialized()):
        return
    for group in {id(g): g for g in (sp.group, sp.dp_group) if isinstance(g, dist.ProcessGroup)}.values():
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)
