"""Timers (all-to-all, gradient all-reduce), the timed steps, peak and offloaded memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .common import DEV, log, sync
from .profiling import profile_kernels, start_memory_history, stop_memory_history


class CommTimer:
    """CUDA events around every ``torch.distributed.all_to_all_single`` (ulysses and DeepSpeed both
    call it through the module attribute). Elapsed = enqueue of the collective to the point where
    the compute stream may continue: the transfer plus any wait for the peer ranks."""

    def __init__(self) -> None:
        self.pairs: list = []
        self.enabled = False
        self.calls = 0
        self._orig: Callable | None = None

    def install(self) -> None:
        if self._orig is not None:
            return
        self._orig = orig = torch.distributed.all_to_all_single

        def all_to_all_single(*args, **kwargs):
            if not self.enabled or DEV != "cuda":
                return orig(*args, **kwargs)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = orig(*args, **kwargs)
            e.record()
            self.pairs.append((s, e))
            self.calls += 1
            return out

        torch.distributed.all_to_all_single = all_to_all_single

    def start(self) -> None:
        self.pairs, self.calls, self.enabled = [], 0, True

    def stop_ms(self) -> float:
        self.enabled = False
        if DEV != "cuda":
            return 0.0
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs)


TIMER = CommTimer()


class EventPair:
    """CUDA event pair, or a no-op on CPU."""

    def __init__(self) -> None:
        timed = DEV == "cuda"
        self.ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if timed else None
        self.recorded = False

    def start(self) -> None:
        if self.ev:
            self.ev[0].record()

    def stop(self) -> None:
        if self.ev:
            self.ev[1].record()
            self.recorded = True

    def ms(self) -> float:
        """0 when nothing was timed (under ZeRO-3 the engine reduces the gradients inside its step)."""
        return self.ev[0].elapsed_time(self.ev[1]) if self.recorded else 0.0


@dataclass
class Measurement:
    """This rank's measurements of one configuration (ms and GiB)."""

    times: list[float] = field(default_factory=list)  # step times
    a2a: list[float] = field(default_factory=list)  # all-to-all time per step
    gsync: list[float] = field(default_factory=list)  # gradient all-reduce time per step
    calls: int = 0  # all-to-all calls of the last step
    replayed: float = 0.0  # attention outputs per step that the recompute replayed (selective checkpointing)
    peak: float = 0.0
    reserved: float = 0.0
    memory: dict = field(default_factory=dict)  # --memory-history: what is alive at the peak
    profile: dict = field(default_factory=dict)  # the profiled step's kernels

    def across_ranks(self, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(max, mean) over the ranks of the medians (step, all-to-all, all-reduce) and the peaks:
        the slowest rank decides the step; memory: the largest rank."""
        t = torch.tensor([statistics.median(self.times), max(self.peak, 0), self.reserved,
                          statistics.median(self.a2a), statistics.median(self.gsync)], device=DEV, dtype=torch.float64)
        tmax = t.clone()
        dist.all_reduce(tmax, op=dist.ReduceOp.MAX)
        tmean = t.clone()
        dist.all_reduce(tmean, op=dist.ReduceOp.SUM)
        tmean /= world
        return tmax, tmean


def timed_steps(step: Callable[[], EventPair], steps: int, m: Measurement) -> None:
    """``steps`` steps, each started together on all ranks and timed to the end of its GPU work."""
    for _ in range(steps):
        dist.barrier()
        sync()
        TIMER.start()
        t0 = time.perf_counter()
        ev = step()
        sync()
        t1 = time.perf_counter()
        m.a2a.append(TIMER.stop_ms())
        m.calls = TIMER.calls
        m.gsync.append(ev.ms())
        m.times.append((t1 - t0) * 1e3)


def measure(step: Callable[[], EventPair], args) -> Measurement:
    """Warm-up steps, then the timed ones (peak memory from their start), then the profiled one."""
    from ulysses_attn import kernels
    from ulysses_attn.selective_checkpoint import replayed_attention_outputs

    kernels.reset_used_kernels()
    for _ in range(args.warmup):
        step()
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    m = Measurement()
    replayed = replayed_attention_outputs()
    baseline = start_memory_history() if args.memory_history else None
    timed_steps(step, args.steps, m)
    m.replayed = (replayed_attention_outputs() - replayed) / args.steps
    m.peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    m.memory = stop_memory_history(baseline)
    m.reserved = torch.cuda.max_memory_reserved() / 2**30 if DEV == "cuda" else 0.0
    m.profile = profile_kernels(step, args.profile_top) if args.profile else {}
    return m


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if DEV == "cuda" else 0.0


def offloaded_bytes(model, offload) -> int:
    """Bytes of checkpointed activations the last step moved to host memory (ours or ALST's)."""
    ours = getattr(model, "_ulysses_offloader", None)
    if ours is not None and ours.offloaded_bytes:
        return ours.offloaded_bytes
    stats = getattr(offload, "stats", None)
    return stats.offloaded_bytes if stats is not None else 0


def cap_gpu_memory(gib: float) -> None:
    """Limit the caching allocator so that it and what the process holds outside it (the CUDA
    context, NCCL) add up to ``gib``: a smaller GPU of the same kind, for "longest sequence that
    fits" runs on a larger one. Memory taken outside the allocator later (cuDNN/NCCL growth) is
    not counted, so the emulated GPU is slightly larger than ``gib``."""
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()
    allowed = gib * 2**30 - outside
    if allowed <= 0 or gib * 2**30 > total:
        raise SystemExit(f"--gpu-memory-gib {gib}: the GPU has {total / 2**30:.1f} GiB, {outside / 2**30:.1f} GiB "
                         "of it already outside the allocator")
    torch.cuda.set_per_process_memory_fraction(allowed / total)
    log(f"GPU memory capped at {gib} GiB: allocator limit {allowed / 2**30:.2f} GiB "
        f"(+{outside / 2**30:.2f} GiB outside it)")

