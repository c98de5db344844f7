"""What a run reports: the environment, the JSON file, the table and the closing notes."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import torch
import torch.distributed as dist

from .common import DEV, SAME_KERNEL, log
from .shapes import FORMULA


def git_commit() -> str:
    """``BENCH_GIT_COMMIT``, else the checkout's HEAD, else ``unknown``."""
    commit = os.environ.get("BENCH_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        except Exception:  # noqa: BLE001
            commit = "unknown"
    return commit


def setup_line(args) -> str:
    """One sentence on what every configuration shares (``info["setup"]``)."""
    world = dist.get_world_size()
    return (
        (f"DeepSpeed ZeRO-3 over all {world} ranks (bf16, fp32 master weights and AdamW states), "
         "gradient checkpointing (non-reentrant)" if args.zero == 3 else
         f"bf16 params/grads/AdamW states, gradient checkpointing (non-reentrant), no ZeRO: gradients averaged "
         f"over all {world} ranks by all-reduce")
        + ("; --long-sequence: each implementation's tiled MLP, chunked loss and checkpoint offload"
           if args.long_sequence else "")
        + f"; loss={args.loss}"
        + (f" (checkpointed chunks of {args.loss_chunk} tokens)" if args.loss == "tiled" else "")
        + f"; batch 1 sample per SP group; {args.warmup} warm-up + {args.steps} timed steps (median)"
    )


def env_info(args) -> dict:
    import transformers

    info = {
        "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)",
        "gpu_count": torch.cuda.device_count(),
        "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if DEV == "cuda" else 0,
        "gpu_memory_cap_gib": args.gpu_memory_gib or None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001
        info["deepspeed"] = f"unavailable ({type(e).__name__})"
    info["git_commit"] = git_commit()
    info["setup"] = setup_line(args)
    info["formula"] = FORMULA
    info["command"] = " ".join(sys.argv)
    return info


def write_json(path: str, info: dict, results: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"info": info, "results": results}, f, indent=1)


def _short(name: str) -> str:
    low = name.lower()
    if "cudnn" in low or "sdpa_sm90" in low or "fort_native" in low:
        return "cuDNN"
    if "flash" in low:
        return "flash"
    if "fmha" in low or "efficient" in low or "cutlassf" in low:
        return "mem-efficient"
    return name[:30]


def _row(r: dict) -> tuple:
    if "error" in r:
        return (r["mode"], r["seq"], r.get("P", ""), "-", "-", "-", "-", "-", r["error"][:60])
    kern = ",".join(r["ulysses_kernel"]) if r["ulysses_kernel"] else ""
    if r.get("attention_kernels"):
        kern = (kern + " " if kern else "") + "[" + _short(r["attention_kernels"][0]) + "]"
    return (r["mode"], r["seq"], r["P"], f"{r['step_ms']:.0f}", f"{r['tokens_per_s_per_gpu']:.0f}",
            f"{r['model_tflops_per_gpu']:.0f}", f"{r['peak_mem_gib']:.1f}", f"{100 * r['a2a_share']:.1f}", kern)


def table(results: list[dict]) -> str:
    head = ("mode", "seq", "P", "step ms", "tok/s/GPU", "TFLOP/s/GPU", "peak GiB", "a2a %", "kernel")
    rows = [_row(r) for r in results]
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(n) for x, n in zip(head, w))]
    lines += ["  ".join(str(x).ljust(n) for x, n in zip(row, w)) for row in rows]
    return "\n".join(lines)


def log_summary(info: dict, results: list[dict], args) -> None:
    """The formula, the setup, the environment, the table; a note when ulysses and ALST ran
    different inner kernels."""
    log("\n" + FORMULA)
    log(info["setup"])
    log(f"{info['gpu']} x{dist.get_world_size()}, torch {info['torch']}, transformers {info['transformers']}, "
        f"deepspeed {info['deepspeed']}, commit {info['git_commit'][:10]}")
    log(table(results))
    ours = {k for r in results if r.get("mode", "").startswith("ulysses") for k in r.get("ulysses_kernel", [])}
    alst_ran = any(r.get("mode") == "alst" and "error" not in r for r in results)
    if ours and alst_ran and ours != {SAME_KERNEL[args.alst_attn]}:
        log(f"note: ulysses ran {sorted(ours)}, ALST {args.alst_attn}: not the same inner kernel "
            f"(--kernel / --alst-attn pick them)")
