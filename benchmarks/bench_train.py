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
a destroyed engine reachable in DeepSpeed (:func:`release_zero3_references`) and stops if an
engine is still alive; ``allocated_before_gib`` in the results shows what a configuration started
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
recompute counted; with ``--documents`` S^2 is the sum of the documents' squared lengths), peak memory per GPU (max over ranks), the share of the step spent in
all-to-all (CUDA events around every ``torch.distributed.all_to_all_single``; includes waiting
for the peer), the gradient all-reduce time, and the attention kernel (ulysses' own choice, and
the CUDA attention kernels a profiled extra step ran), and ``first_grad_norms``: the norms of a few
parameters' gradients after the first backward, equal across modes that compute the same thing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEV = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu": a gloo dry run of the script logic (tiny model)
# the stock HF backends (modes without SP, and ALST's core attention) -> ulysses' kernel label for the same kernel
SAME_KERNEL = {"sdpa": "sdpa", "flash_attention_2": "flash_attn/fa2", "flash_attention_3": "flash_attn/fa3",
               "flash_attention_4": "flash_attn/fa4"}
STOCK = tuple(SAME_KERNEL)
FORMULA = ("model TFLOP/s/GPU = (6*N_matmul*S + 6*L*S^2*H*D) / P / step_time / 1e12 (causal attention; recompute "
           "not counted; packed documents: S^2 = sum of their squared lengths)")

SHAPES = {
    # Llama-3.2-1B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    # Llama-3.1-8B (does not fit an 80 GB GPU without ZeRO-3: 8B params x 8 bytes of bf16 state)
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    # Qwen2.5-7B (28 query heads, 4 KV heads, q/k/v bias): P = 8 pads the heads to 32
    "qwen7b": dict(arch="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
                   rms_norm_eps=1e-6),
    # for a quick check of the script (tiny-qwen: 6 heads, padded at P = 4)
    "tiny-qwen": dict(arch="qwen2", hidden_size=192, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=4096, tie_word_embeddings=False, rope_theta=1000000.0,
                      rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=688, vocab_size=4096, tie_word_embeddings=False),
}


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if rank0():
        print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# timing of the collectives
# ------------------------------------------------------------------------------------------------


class CommTimer:
    """CUDA events around every ``torch.distributed.all_to_all_single`` (ulysses and DeepSpeed both
    call it through the module attribute). Elapsed = enqueue of the collective to the point where
    the compute stream may continue: the transfer plus any wait for the peer ranks."""

    def __init__(self):
        self.pairs: list = []
        self.enabled = False
        self.calls = 0
        self._orig = None

    def install(self):
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

    def start(self):
        self.pairs, self.calls, self.enabled = [], 0, True

    def stop_ms(self) -> float:
        self.enabled = False
        if DEV != "cuda":
            return 0.0
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs)


TIMER = CommTimer()


class _Ev:
    """CUDA event pair, or a no-op on CPU."""

    def __init__(self):
        self.ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if DEV == "cuda" else None
        self.recorded = False

    def start(self):
        if self.ev:
            self.ev[0].record()

    def stop(self):
        if self.ev:
            self.ev[1].record()
            self.recorded = True

    def ms(self) -> float:
        """0 when nothing was timed (under ZeRO-3 the engine reduces the gradients inside its step)."""
        return self.ev[0].elapsed_time(self.ev[1]) if self.recorded else 0.0


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# model, data, loss
# ------------------------------------------------------------------------------------------------


def make_config(shape: str, seq: int):
    from transformers import LlamaConfig, Qwen2Config

    spec = {"rms_norm_eps": 1e-5, **SHAPES[shape]}
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("arch", "llama")]
    theta = spec.pop("rope_theta", 500000.0)
    cfg = config_class(**spec, max_position_embeddings=max(seq, 8192), use_cache=False)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


def n_matmul(model) -> int:
    """Weights of the matrix products a token goes through (projections, MLP, lm_head), counting a
    tied lm_head once as a matmul; the embedding lookup is not a matmul. ZeRO-3 partitions keep
    the full size in ``ds_numel``."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            total += getattr(mod.weight, "ds_numel", mod.weight.numel())
    return total


def zero3_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8,
                              "stage3_param_persistence_threshold": 1e6},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_model(shape: str, seq: int, attn: str):
    from transformers import AutoModelForCausalLM

    cfg = make_config(shape, seq)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def document_lengths(seq: int, documents: int) -> list[int]:
    """``--documents``: equal documents packed into the sequence (the last one takes the remainder)."""
    return [seq // documents] * (documents - 1) + [seq - (documents - 1) * (seq // documents)]


def make_batch(vocab: int, seq: int, seed: int, documents: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g).to(DEV)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if documents > 1:  # packed: positions restart at every document
        batch["position_ids"] = torch.cat([torch.arange(n) for n in document_lengths(seq, documents)])[None].to(DEV)
    return batch


def _chunk_ce(h, lm_head, labels):
    logits = lm_head(h).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def tiled_loss_sum(hidden, lm_head, shift_labels, chunk: int):
    """Sum of the token cross-entropies, in checkpointed chunks (no full logits); the head is
    called as a module so that ZeRO-3 gathers its weight."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[1], chunk):
        total = total + checkpoint(_chunk_ce, hidden[:, i : i + chunk], lm_head, shift_labels[:, i : i + chunk],
                                   use_reentrant=False)
    return total


def offloaded_bytes(model, offload) -> int:
    """Bytes of checkpointed activations the last step moved to host memory (ours or ALST's)."""
    ours = getattr(model, "_ulysses_offloader", None)
    if ours is not None and ours.offloaded_bytes:
        return ours.offloaded_bytes
    stats = getattr(offload, "stats", None)
    return stats.offloaded_bytes if stats is not None else 0


def alst_tile_mlps(model) -> None:
    """DeepSpeed's TiledMLP in every decoder MLP, as its docstring patches LlamaMLP.forward
    (ceil(seqlen / hidden) shards; the ranks' lengths are equal here, so the MAX all-reduce the
    docstring adds to agree on the count is left out)."""
    import types

    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def mlp_forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled_mlp_forward(self, x):
        shards = max(1, -(-x.shape[-2] // x.shape[-1]))
        params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
        return TiledMLP.apply(mlp_forward, self, x, shards, params)

    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(tiled_mlp_forward, layer.mlp)


def alst_loss_sum(hidden, lm_head, shift_labels, scale=1.0):
    """``scale`` times the sum of the token cross-entropies, through DeepSpeed's TiledFusedLogitsLoss.
    Its lm_head gradient is right only where the gradient arriving at its output is 1."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    def loss_fn(head, x, y):
        logits = head(x).float()
        return scale * F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100,
                                       reduction="sum")

    from ulysses_attn.loss import default_loss_chunk_tokens

    # about 1 GiB of fp32 logits per shard, as ArcticTraining sizes them (and as our chunked loss does)
    vocab = getattr(lm_head.weight, "ds_shape", lm_head.weight.shape)[0]
    shards = max(1, -(-hidden.shape[1] // default_loss_chunk_tokens(vocab)))
    return TiledFusedLogitsLoss.apply(loss_fn, lm_head, hidden, shift_labels, None, shards, [lm_head.weight], "sum")


# ------------------------------------------------------------------------------------------------
# one configuration
# ------------------------------------------------------------------------------------------------


class Mode:
    def __init__(self, name: str, sp_size: int, group):
        self.name, self.P, self.group = name, sp_size, group


def loss_for(mode: Mode, model, batch, args):
    import ulysses_attn
    from ulysses_attn.comm import all_reduce_sum

    if args.loss == "hf":
        if mode.P == 1:  # this rank's own sample: the plain (non-SP) loss
            no_sp = ulysses_attn.SequenceParallel(1, 0, None, 1, 0, None, (0,))
            model.loss_function = functools.partial(ulysses_attn.causal_lm_loss, sp=no_sp)
        else:
            model.loss_function = ulysses_attn.causal_lm_loss
        return model(**batch).loss
    if args.long_sequence and mode.name == "ulysses":  # the user path: chunked loss inside the forward
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     shift_labels=batch["shift_labels"]).loss
    out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    count = (batch["shift_labels"] != -100).sum().float()
    if mode.P > 1:
        dist.all_reduce(count, group=mode.group)
    if args.long_sequence and mode.name == "alst":
        # TiledFusedLogitsLoss computes lm_head's gradient in its forward, for an upstream gradient
        # of 1; dividing by the tokens after it (ArcticTraining's recipe) leaves that gradient
        # count / P times too large. Scaled inside, the gradient reaching it is exactly 1.
        local = alst_loss_sum(out.last_hidden_state, model.lm_head, batch["shift_labels"], scale=mode.P / count)
        return all_reduce_sum(local, mode.group) / mode.P if mode.P > 1 else local
    local = tiled_loss_sum(out.last_hidden_state, model.lm_head, batch["shift_labels"], args.loss_chunk)
    if mode.P > 1:
        local = all_reduce_sum(local, mode.group)
    return local / count


def shard(mode: Mode, full, sp):
    import ulysses_attn

    if mode.P == 1:
        return ulysses_attn.shard_batch(full, sp=ulysses_attn.SequenceParallel(1, 0, None, 1, 0, None, (0,)))
    return ulysses_attn.shard_batch(full, sp=sp)


def sync_grads(model, world: int) -> None:
    if world == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def grad_norms(model, engine) -> dict[str, float]:
    """Norms of a few parameters' gradients (whole, also under ZeRO-3): the same in every mode when
    they compute the same thing. Called after the first backward, on every rank; nothing the size
    of a gradient is allocated (no gather, no fp32 copy), so it cannot push a run near the memory
    limit over it."""
    inner = model.model
    params = {"lm_head": model.lm_head.weight, "embed_tokens": inner.embed_tokens.weight,
              "layer0.q_proj": inner.layers[0].self_attn.q_proj.weight,
              "layer0.down_proj": inner.layers[0].mlp.down_proj.weight,
              "last.up_proj": inner.layers[-1].mlp.up_proj.weight}
    if engine is None:
        return {k: float(torch.linalg.vector_norm(p.grad, dtype=torch.float32)) for k, p in params.items()}
    from deepspeed.utils import safe_get_local_grad

    # each rank holds a partition of every gradient: sum the squares over the world
    squares = torch.stack([torch.linalg.vector_norm(safe_get_local_grad(p), dtype=torch.float32) ** 2
                           for p in params.values()])
    dist.all_reduce(squares)
    return {k: float(v) for k, v in zip(params, squares.sqrt().tolist())}


def release_zero3_references() -> None:
    """Drop what keeps a destroyed ZeRO-3 engine (and its states) reachable in DeepSpeed 0.19.8:
    ``parameter_offload.FWD_MODULE_STACK`` keeps the top module (pushed at setup, never popped) and
    the class-level ``lru_cache`` of ``PartitionedParameterCoordinator.__params_to_release`` keeps
    the coordinators and modules. On one H200 each configuration of a process otherwise started
    with the previous one's 18.4 GiB (1B shape) still allocated."""
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    parameter_offload.FWD_MODULE_STACK.clear()
    fn = getattr(partitioned_param_coordinator.PartitionedParameterCoordinator,
                 "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(fn, "__closure__", None) or ():  # behind DeepSpeed's instrument_w_nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


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


def profile_kernels(run_step, top: int = 0) -> dict:
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
        low = name.lower()
        if "nccl" in low:
            cat = "all_to_all" if "alltoall" in low or "sendrecv" in low else "other_comm"
        elif "memcpy" in low or "memset" in low:
            cat = "memcpy"
        elif any(s in low for s in ("flash", "fmha", "sdpa", "attention", "attn", "cudnn")) and "gemm" not in low:
            cat = "attention"
            attn_names[name[:120]] = attn_names.get(name[:120], 0.0) + t
        elif any(s in low for s in ("gemm", "nvjet", "cutlass", "xmma", "sm90_")):
            cat = "gemm"
        else:
            cat = "other"
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


def describe_loss_path(mode_name: str, model, args) -> str:
    """Which loss ran: ours fuses the head and the cross-entropy for a plain head, else chunks."""
    if args.long_sequence and mode_name == "alst":
        return "alst TiledFusedLogitsLoss"
    if args.long_sequence and mode_name == "ulysses":
        from ulysses_attn.loss import _plain_linear

        return "fused" if _plain_linear(model.get_output_embeddings()) else "checkpointed chunks"
    return args.loss


def run_config(mode_name: str, seq: int, args, sp, state: dict) -> dict:
    import ulysses_attn
    from ulysses_attn import kernels
    from ulysses_attn.selective_checkpoint import replayed_attention_outputs

    world, rank = dist.get_world_size(), dist.get_rank()
    leftover = torch.cuda.memory_allocated() / 2**30 if DEV == "cuda" else 0.0  # should be ~0: see --zero
    label = mode_name
    mode_name, _, variant = mode_name.partition("+")  # "ulysses+selective": keep attention outputs
    if variant not in ("", "selective", "selective+offload") or (variant and not mode_name.startswith("ulysses")):
        raise ValueError(f"unknown variant in {label!r} (ulysses+selective, ulysses+selective+offload)")
    mode_name, _, forced = mode_name.partition("@")  # "ulysses@torch_varlen": force the inner kernel
    if forced:
        if mode_name != "ulysses":
            raise ValueError(f"only ulysses takes a forced kernel, got {label!r}")
        ulysses_attn.set_kernel(forced)
    elif args.kernel and mode_name == "ulysses":
        ulysses_attn.set_kernel(args.kernel)
    else:
        ulysses_attn.set_kernel(None)
    if mode_name in STOCK:
        mode = Mode(mode_name, 1, None)
        attn = mode_name
    elif mode_name == "ulysses":
        mode = Mode("ulysses", sp.size, sp.group)
        attn = "ulysses_flash"
    elif mode_name == "alst":
        attn = args.alst_attn
        mode = Mode("alst", sp.size, None)
    else:
        raise ValueError(mode_name)
    zero3 = args.zero == 3
    model = build_model(args.model, seq, attn)
    if zero3:  # built whole on the GPU (fast random init), partitioned by deepspeed.initialize below
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        model._hf_ds_config = HfDeepSpeedConfig(zero3_config())  # is_deepspeed_zero3_enabled() while alive
    if args.long_sequence and mode_name == "alst":
        alst_tile_mlps(model)
    elif args.long_sequence or variant:
        options = (ulysses_attn.MemoryOptions.long_sequence(chunked_loss=mode_name == "ulysses") if args.long_sequence
                   else ulysses_attn.MemoryOptions(chunked_loss=False))
        options.selective_checkpointing = variant.startswith("selective")
        options.offload_attention_outputs = variant == "selective+offload"
        ulysses_attn.configure_memory(model, options)
    if mode_name == "alst" and sp.size > 1:  # at P = 1 ALST registers nothing: sdpa + its memory features
        if "mpu" not in state:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

            state["mpu"] = UlyssesSPAttentionHF.register_with_transformers(
                model_name_or_path=model, core_attn_implementation=args.alst_attn, sequence_parallel_size=sp.size,
                micro_batch_size=1, seq_length_is_variable=True)
        mode.group = state["mpu"].get_sequence_parallel_group()
        assert dist.get_process_group_ranks(mode.group) == list(sp.ranks), "ALST and ulysses SP groups differ"
    cfg = model.config
    N = n_matmul(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=DEV == "cuda")
    engine = None
    if zero3:
        import deepspeed

        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=zero3_config(),
                                                 mpu=state.get("mpu") if mode_name == "alst" else None)
        state["engine"] = engine  # destroyed by the caller, also when this configuration fails
    offload = contextlib.nullcontext()
    if args.long_sequence and mode_name == "alst":
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )

        offload = get_checkpoint_hidden_states_offloading_ctx_manager(min_offload_bytes=2**20)
    # same sample within an SP group, different samples across groups (and across ranks without SP)
    sample_seed = 1234 + (rank if mode.P == 1 else rank // mode.P)
    full = make_batch(cfg.vocab_size, seq, sample_seed, args.documents)
    batch = shard(mode, full, sp)
    losses, first_grads = [], {}

    def step():
        ev = _Ev()
        with offload:  # ALST's offload context spans forward and backward
            loss = loss_for(mode, model, batch, args)
            if engine is not None:
                engine.backward(loss)
            else:
                loss.backward()
        if engine is not None:
            if not first_grads:
                first_grads.update(grad_norms(model, engine))
            engine.step()
        else:
            ev.start()
            sync_grads(model, world)
            ev.stop()
            if not first_grads:
                first_grads.update(grad_norms(model, None))
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        return ev

    kernels._logged.clear()
    for _ in range(args.warmup):
        step()
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, a2a, gsync, calls = [], [], [], 0
    replayed = replayed_attention_outputs()
    if args.memory_history and DEV == "cuda" and rank0():
        baseline = torch.cuda.memory_allocated()
        # without stacks: recording Python stacks broke cross_entropy in the backward (torch 2.11, ZeRO-3)
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)
    for _ in range(args.steps):
        dist.barrier()
        sync()
        TIMER.start()
        t0 = time.perf_counter()
        ev = step()
        sync()
        t1 = time.perf_counter()
        a2a.append(TIMER.stop_ms())
        calls = TIMER.calls
        gsync.append(ev.ms())
        times.append((t1 - t0) * 1e3)
    replayed = (replayed_attention_outputs() - replayed) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    memory = {}
    if args.memory_history and DEV == "cuda" and rank0():
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        memory = {"memory_at_peak": live_at_peak(trace, baseline)}
        del trace
        log(json.dumps(memory, indent=1))
    reserved = torch.cuda.max_memory_reserved() / 2**30 if DEV == "cuda" else 0.0
    prof = profile_kernels(step, args.profile_top) if args.profile else {}
    used = sorted({n for n, _ in kernels._logged}) if mode_name == "ulysses" else []
    loss_path = describe_loss_path(mode_name, model, args)

    # slowest rank decides the step; memory: the largest rank
    t = torch.tensor([statistics.median(times), max(peak, 0), reserved, statistics.median(a2a), statistics.median(gsync)],
                     device=DEV, dtype=torch.float64)
    tmax = t.clone()
    dist.all_reduce(tmax, op=dist.ReduceOp.MAX)
    tmean = t.clone()
    dist.all_reduce(tmean, op=dist.ReduceOp.SUM)
    tmean /= world
    step_ms = tmax[0].item()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    flops = 6 * N * seq + 6 * L * sum(n * n for n in document_lengths(seq, args.documents)) * H * D
    result = {
        "mode": label,
        "model": args.model,
        "zero": args.zero,
        "long_sequence": args.long_sequence,
        "offloaded_gib": round(offloaded_bytes(model, offload) / 2**30, 2),
        "allocated_before_gib": round(leftover, 2),
        "seq": seq,
        "documents": args.documents,
        "P": mode.P,
        "world": world,
        "dp": world // mode.P,
        "step_ms": round(step_ms, 2),
        "step_ms_all": [round(x, 2) for x in times],
        "tokens_per_s_per_gpu": round(seq / mode.P / (step_ms / 1e3), 1),
        "model_tflops_per_gpu": round(flops / mode.P / (step_ms / 1e3) / 1e12, 1),
        "peak_mem_gib": round(tmax[1].item(), 2),
        "peak_reserved_gib": round(tmax[2].item(), 2),
        "a2a_ms": round(tmean[3].item(), 2),
        "a2a_share": round(tmean[3].item() / step_ms, 4),
        "a2a_calls_per_step": calls,
        "grad_allreduce_ms": round(tmean[4].item(), 2),
        "loss_path": loss_path,
        "loss_first_last": [round(losses[0].item(), 4), round(losses[-1].item(), 4)],
        "first_grad_norms": {k: float(f"{v:.6g}") for k, v in first_grads.items()},
        "N_matmul": N,
        "attn_flop_share": round(6 * L * seq * seq * H * D / flops, 3),
        "ulysses_kernel": used,
        "attention_replayed_per_step": replayed,  # selective checkpointing: kernel calls the recompute skipped
        **prof,
        **memory,
    }
    model = opt = batch = full = losses = engine = None  # free before the next configuration
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------


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
    commit = os.environ.get("BENCH_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        except Exception:  # noqa: BLE001
            commit = "unknown"
    info["git_commit"] = commit
    info["setup"] = (
        (f"DeepSpeed ZeRO-3 over all {dist.get_world_size()} ranks (bf16, fp32 master weights and AdamW states), "
         "gradient checkpointing (non-reentrant)" if args.zero == 3 else
         f"bf16 params/grads/AdamW states, gradient checkpointing (non-reentrant), no ZeRO: gradients averaged "
         f"over all {dist.get_world_size()} ranks by all-reduce")
        + ("; --long-sequence: each implementation's tiled MLP, chunked loss and checkpoint offload"
           if args.long_sequence else "")
        + f"; loss={args.loss}"
        + (f" (checkpointed chunks of {args.loss_chunk} tokens)" if args.loss == "tiled" else "")
        + f"; batch 1 sample per SP group; {args.warmup} warm-up + {args.steps} timed steps (median)"
    )
    info["formula"] = FORMULA
    info["command"] = " ".join(sys.argv)
    return info


def table(results: list[dict]) -> str:
    head = ("mode", "seq", "P", "step ms", "tok/s/GPU", "TFLOP/s/GPU", "peak GiB", "a2a %", "kernel")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["mode"], r["seq"], r.get("P", ""), "-", "-", "-", "-", "-", r["error"][:60]))
            continue
        kern = ",".join(r["ulysses_kernel"]) if r["ulysses_kernel"] else ""
        if r.get("attention_kernels"):
            kern = (kern + " " if kern else "") + "[" + _short(r["attention_kernels"][0]) + "]"
        rows.append((r["mode"], r["seq"], r["P"], f"{r['step_ms']:.0f}", f"{r['tokens_per_s_per_gpu']:.0f}",
                     f"{r['model_tflops_per_gpu']:.0f}", f"{r['peak_mem_gib']:.1f}", f"{100 * r['a2a_share']:.1f}",
                     kern))
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(n) for x, n in zip(head, w))]
    lines += ["  ".join(str(x).ljust(n) for x, n in zip(row, w)) for row in rows]
    return "\n".join(lines)


def _short(name: str) -> str:
    low = name.lower()
    if "cudnn" in low or "sdpa_sm90" in low or "fort_native" in low:
        return "cuDNN"
    if "flash" in low:
        return "flash"
    if "fmha" in low or "efficient" in low or "cutlassf" in low:
        return "mem-efficient"
    return name[:30]


def main() -> int:
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
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if DEV == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=600),
                                device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    if args.gpu_memory_gib and DEV == "cuda":
        cap_gpu_memory(args.gpu_memory_gib)
    import ulysses_attn

    sp_size = args.sp or world
    sp = ulysses_attn.init_sequence_parallel(sp_size)
    TIMER.install()
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
    # ALST replaces the global "sdpa" attention for the whole process: run it last
    modes.sort(key=lambda m: {"ulysses": 1, "alst": 2}.get(m.split("@")[0].split("+")[0], 0))
    seqs = [int(s) for s in args.seq.split(",")]
    info = env_info(args)
    log(json.dumps(info, indent=1))
    results, state = [], {}
    for mode_name in modes:
        for seq in seqs:
            log(f"--- {mode_name} seq={seq} P={1 if mode_name in STOCK else sp_size} ---")
            if args.min_gpu_gib and DEV == "cuda" and torch.cuda.get_device_properties(0).total_memory / 2**30 < args.min_gpu_gib:
                results.append({"mode": mode_name, "seq": seq, "error": f"skipped: GPU has < {args.min_gpu_gib} GiB"})
                log(json.dumps(results[-1]))
                continue
            try:
                r = run_config(mode_name, seq, args, sp, state)
            except torch.OutOfMemoryError as e:
                r = {"mode": mode_name, "seq": seq, "error": "OOM: " + str(e).split("\n")[0][:200]}
            except Exception as e:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                r = {"mode": mode_name, "seq": seq, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            engine = state.pop("engine", None)
            if engine is not None:  # frees ZeRO-3's partitions and hooks
                engine.destroy()
            engine = None
            if args.zero == 3:  # else the next model would be built under zero.Init (other init values)
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
                release_zero3_references()
            gc.collect()
            if args.zero == 3 and any(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects()):
                raise RuntimeError("a destroyed DeepSpeed engine is still reachable (its states would count in the "
                                   "next configuration's peak): run one configuration per process")
            if DEV == "cuda":
                torch.cuda.empty_cache()
            # all ranks must agree that the configuration failed (they hit the same shapes)
            failed = torch.tensor([1.0 if "error" in r else 0.0], device=DEV)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() and "error" not in r:
                r = {"mode": mode_name, "seq": seq, "error": "failed on another rank"}
            results.append(r)
            log(json.dumps(r))
            if rank0() and args.json:
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump({"info": info, "results": results}, f, indent=1)
    log("\n" + FORMULA)
    log(info["setup"])
    log(f"{info['gpu']} x{world}, torch {info['torch']}, transformers {info['transformers']}, "
        f"deepspeed {info['deepspeed']}, commit {info['git_commit'][:10]}")
    log(table(results))
    ours = {k for r in results if r.get("mode", "").startswith("ulysses") for k in r.get("ulysses_kernel", [])}
    if ours and any(r.get("mode") == "alst" and "error" not in r for r in results) and ours != {SAME_KERNEL[args.alst_attn]}:
        log(f"note: ulysses ran {sorted(ours)}, ALST {args.alst_attn}: not the same inner kernel "
            f"(--kernel / --alst-attn pick them)")
    ulysses_attn.destroy_sequence_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
