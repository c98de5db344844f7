"""Training throughput of sequence parallelism on real model shapes (random init, no downloads).

    torchrun --nproc_per_node 2 benchmarks/bench_train.py --model 1b --seq 16384,32768 \
        --modes sdpa,ulysses,alst --sp 2 --steps 3 --json benchmarks/results/run.json

Modes (each trains the same model, bf16, gradient checkpointing, AdamW, the same loss):

* ``ulysses``: ``attn_implementation="ulysses_flash"`` (this package), SP group of ``--sp`` ranks;
  ``ulysses+selective`` also keeps the attention outputs through the recompute, on the GPU
  (``MemoryOptions.selective_checkpointing``, ``offload_attention_outputs=False``);
  ``ulysses+selective+offload`` offloads them with the checkpoints (the package's default for
  selective checkpointing with ``--long-sequence``);
* ``alst``: DeepSpeed ALST attention (``UlyssesSPAttentionHF.register_with_transformers`` over
  ``--alst-attn``, default ``sdpa``; a note after the table says when ulysses ran another kernel),
  the same SP groups (ranks ``[g*P, (g+1)*P)``); only its attention component, not the DeepSpeed
  engine;
* ``sdpa``: no sequence parallelism; every GPU trains its own full-length sample (P = 1);
  ``flash_attention_2``/``_3``/``_4``: the same with that stock HF backend (to compare with
  ``ulysses@flash_attn`` over the same FlashAttention at P = 1).

Without ``--zero 3``, parameters, gradients and AdamW states are replicated on every GPU in bf16
(torch AdamW keeps its states in the parameter dtype) and gradients are averaged over all ranks
with one all-reduce per parameter after the backward (plain data parallelism). ``--zero 3`` runs
every mode in a DeepSpeed ZeRO-3 engine over the whole world (bf16, fp32 master weights and AdamW
states; the model is built whole on the GPU, then partitioned by ``deepspeed.initialize``, with an
``HfDeepSpeedConfig`` alive so that ``is_deepspeed_zero3_enabled()`` holds as under the HF Trainer;
ALST gets its ``mpu`` as DeepSpeed documents). Between configurations the script drops what keeps
a destroyed engine reachable in DeepSpeed (:func:`lib.zero3.release_zero3_references`) and stops
if an engine is still alive; ``allocated_before_gib`` in the results shows what a configuration started
with.

``--long-sequence`` turns on each implementation's own memory savings for long sequences:
ulysses: ``ulysses_attn.configure_memory(model, MemoryOptions.long_sequence())`` (chunked loss
through the model's forward, tiled MLP, checkpoint offload to pinned host memory); alst:
DeepSpeed's ``TiledMLP`` patched into every MLP forward as its docstring shows, its
``TiledFusedLogitsLoss`` for the loss (shards of about 1 GiB of fp32 logits, as ArcticTraining
sizes them; the loss is scaled inside it, because it computes lm_head's gradient in its forward for
an upstream gradient of 1) and ``CheckpointHiddenStatesOffload`` around forward and backward; sdpa: ours without
the chunked loss (its per-sample loss stays the script's tiled loss). The loss is a
token-weighted cross-entropy over the full sequence, computed in checkpointed chunks of
``--loss-chunk`` tokens (the logits are never materialised for the whole shard) and summed over
the SP group with ``ulysses_attn.sp_sum`` for both SP modes; ``--loss hf`` uses the model's own
forward with ``model.loss_function = ulysses_attn.causal_lm_loss`` instead (full logits).

Reported per configuration: step time (median of the timed steps, slowest rank), tokens/s per GPU,
model TFLOP/s per GPU = (6*N_matmul*S + 6*L*S^2*H*D) / P / step_time (causal attention, no
recompute counted; with ``--documents`` S^2 is the sum of the documents' squared lengths), peak
memory per GPU (max over ranks), the share of the step spent in all-to-all (CUDA events around
every ``torch.distributed.all_to_all_single``; includes waiting for the peer), the gradient
all-reduce time, and the attention kernel (ulysses' own choice, and the CUDA attention kernels a
profiled extra step ran), and ``first_grad_norms``: the norms of a few parameters' gradients after
the first backward, equal across modes that compute the same thing.

This file is the command line; the benchmark itself is in ``benchmarks/lib/`` (see its ``__init__``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from lib.common import DEV, SAME_KERNEL, STOCK, log
from lib.measure import TIMER, cap_gpu_memory
from lib.report import env_info, log_summary
from lib.shapes import SHAPES
from lib.train import run_all


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seq", default="16384", help="comma-separated global sequence lengths")
    ap.add_argument("--sp", type=int, default=0, help="SP size (default: world size)")
    ap.add_argument("--modes", default="sdpa,ulysses,alst",
                    help="comma-separated: sdpa or flash_attention_2/3/4 (stock backend, no SP), ulysses, "
                         "ulysses@<kernel> (forced inner kernel), ulysses+selective[+offload], alst")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loss", choices=["tiled", "hf"], default="tiled")
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--zero", type=int, choices=[0, 3], default=0, help="3: every mode in a DeepSpeed ZeRO-3 engine")
    ap.add_argument("--long-sequence", action="store_true",
                    help="each implementation's memory savings (see the module docstring)")
    ap.add_argument("--kernel", default=None, help="force the ulysses inner kernel (ulysses_attn.set_kernel)")
    ap.add_argument("--alst-attn", default="sdpa", choices=sorted(SAME_KERNEL),
                    help="ALST's core attention (with --kernel flash_attn: flash_attention_4 where FA4 is installed)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile-top", type=int, default=0,
                    help="also record the N longest CUDA kernels of the profiled step (ms, calls)")
    ap.add_argument("--memory-history", action="store_true",
                    help="record the allocator during the timed steps; report what is alive at the peak, by block size")
    ap.add_argument("--min-gpu-gib", type=float, default=0, help="skip every configuration on smaller GPUs")
    ap.add_argument("--gpu-memory-gib", type=float, default=0,
                    help="act as a GPU with this much memory (e.g. 79.6 for an 80 GB H100): the allocator gets "
                         "this less what the process already holds outside it; larger configurations fail with OOM")
    ap.add_argument("--documents", type=int, default=1,
                    help="pack this many equal documents into each sequence (position_ids restart; ulysses modes only)")
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    return ap


def init_distributed() -> None:
    """NCCL on this rank's GPU (``LOCAL_RANK``), or gloo for the CPU dry run."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if DEV == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=600),
                                device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")


def select_modes(ap: argparse.ArgumentParser, args) -> list[str]:
    """The ``--modes`` to run, checked; DeepSpeed initialised where ALST or ZeRO-3 needs it (ALST
    dropped where it is unavailable); ALST last, as it replaces the global "sdpa" attention."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m.split("@")[0].split("+")[0] not in (*STOCK, "ulysses", "alst"):
            ap.error(f"unknown mode {m!r}")
        if args.documents > 1 and not m.startswith("ulysses"):
            ap.error(f"--documents: {m!r} would not attend within documents the same way; use ulysses modes")
    if "alst" in modes or args.zero:
        try:
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if DEV == "cuda" else "gloo")
        except Exception as e:  # noqa: BLE001
            if args.zero:
                raise
            log(f"DeepSpeed ALST unavailable ({type(e).__name__}: {e}); skipping mode alst")
            modes.remove("alst")
    modes.sort(key=lambda m: {"ulysses": 1, "alst": 2}.get(m.split("@")[0].split("+")[0], 0))
    return modes


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    init_distributed()
    if args.gpu_memory_gib and DEV == "cuda":
        cap_gpu_memory(args.gpu_memory_gib)
    import ulysses_attn

    sp = ulysses_attn.init_sequence_parallel(args.sp or dist.get_world_size())
    TIMER.install()
    modes = select_modes(ap, args)
    seqs = [int(s) for s in args.seq.split(",")]
    info = env_info(args)
    log(json.dumps(info, indent=1))
    results = run_all(modes, seqs, args, sp, info)
    log_summary(info, results, args)
    ulysses_attn.destroy_sequence_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
