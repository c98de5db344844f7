"""Where the time and the memory go: the CUDA kernels of a profiled step, the allocations alive at the peak."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch

from .common import DEV, log, rank0, sync


def classify_kernel(name: str) -> str:
    """attention, all_to_all, other_comm, gemm, memcpy or other."""
    low = name.lower()
    if "nccl" in low:
        return "all_to_all" if "alltoall" in low or "sendrecv" in low else "other_comm"
    if "memcpy" in low or "memset" in low:
        return "memcpy"
    if any(s in low for s in ("flash", "fmha", "sdpa", "attention", "attn", "cudnn")) and "gemm" not in low:
        return "attention"
    if any(s in low for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90_")):
        return "gemm"
    return "other"


def profile_kernels(run_step: Callable[[], object], top: int = 0) -> dict:
    """Run one step under torch.profiler on rank 0; classify the CUDA kernels by time (and list the
    ``top`` longest kernels, with their call counts, to compare two modes kernel by kernel)."""
    from torch.profiler import ProfilerActivity, profile

    if not rank0() or DEV != "cuda":
        run_step()
        return {}
    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_step()
        sync()
    wall_ms = (time.perf_counter() - t0) * 1e3
    cats = {"attention": 0.0, "all_to_all": 0.0, "other_comm": 0.0, "gemm": 0.0, "memcpy": 0.0, "other": 0.0}
    attn_names: dict[str, float] = {}
    kernels_by_time = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if not t or getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
            continue
        name = ev.key
        cat = classify_kernel(name)
        if cat == "attention":
            attn_names[name[:120]] = attn_names.get(name[:120], 0.0) + t
        cats[cat] += t
        kernels_by_time.append((t, ev.count, cat, name[:100]))
    compute = sum(v for k, v in cats.items() if k != "memcpy") or 1.0
    top_attn = sorted(attn_names.items(), key=lambda kv: -kv[1])[:4]
    result = {
        # shares of the kernel time on the compute side (copies run on a side stream, listed apart)
        "kernel_time_share": {k: round(v / compute, 4) for k, v in cats.items()},
        "attention_kernels": [n for n, _ in top_attn],
    }
    if top:
        result["profiled_step_ms"] = round(wall_ms, 1)
        result["kernel_ms"] = {k: round(v / 1e3, 1) for k, v in cats.items()}
        result["top_kernels"] = [[round(t / 1e3, 1), n, cat, name]
                                 for t, n, cat, name in sorted(kernels_by_time, reverse=True)[:top]]
    return result


def start_memory_history() -> int | None:
    """``--memory-history`` (CUDA, rank 0): record the allocator from here; the bytes allocated before."""
    if DEV != "cuda" or not rank0():
        return None
    baseline = torch.cuda.memory_allocated()
    # without stacks: recording Python stacks broke cross_entropy in the backward (torch 2.11, ZeRO-3)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)
    return baseline


def stop_memory_history(baseline: int | None) -> dict:
    """Stop the recording :func:`start_memory_history` started; ``{"memory_at_peak": ...}`` (logged)."""
    if baseline is None:
        return {}
    trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)
    memory = {"memory_at_peak": live_at_peak(trace, baseline)}
    del trace
    log(json.dumps(memory, indent=1))
    return memory


def live_at_peak(trace: list[dict], baseline: int, top: int = 25) -> dict:
    """Replay a CUDA allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``,
    recorded without stacks) and group the allocations alive at its peak by block size.
    ``baseline``: bytes allocated before."""
    live, total, peak, peak_at = {}, baseline, baseline, -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])
        if total > peak:
            peak, peak_at = total, i
    live = {}
    for ev in trace[: peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    groups: dict[str, list] = {}
    for size in live.values():
        g = groups.setdefault(f"{size / 2**20:.1f} MiB blocks", [0, 0])
        g[0] += size
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"peak_gib": round(peak / 2**30, 2), "baseline_gib": round(baseline / 2**30, 2),
            "live_at_peak": [[round(b / 2**30, 3), n, k] for k, (b, n) in rows]}
