"""One configuration (a mode at a sequence length): build, prepare, measure, summarise; then all
of them, each failure a result and every engine released before the next."""

from __future__ import annotations

import gc
import json
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import zero3
from .common import DEV, STOCK, log, rank0
from .measure import Measurement, allocated_gib, measure, offloaded_bytes
from .report import write_json
from .runners import Runner, make_runner, parse_mode
from .shapes import attention_flops, build_model, make_batch, model_flops, n_matmul
from .step import Step


@dataclass
class Configuration:
    label: str  # the mode as given, e.g. "ulysses+selective"
    seq: int
    leftover: float  # GiB allocated before it was built (should be ~0: see --zero)
    n_matmul: int
    step: Step


def build(runner: Runner, seq: int, variant: str, args, sp, state: dict):
    """The model with the system's attention and memory features (whole on the device; under
    ZeRO-3 partitioned later by :func:`~.zero3.initialize`)."""
    model = build_model(args.model, seq, runner.attn)
    if args.zero == 3:
        zero3.mark_zero3(model)
    runner.add_memory_features(model, args, variant)
    runner.attach(model, args, sp, state)
    return model


def rank_batch(runner: Runner, vocab: int, seq: int, args, sp) -> dict:
    """The same sample within an SP group, different samples across groups (and across ranks
    without SP); this rank's shard of it."""
    rank = dist.get_rank()
    sample_seed = 1234 + (rank if runner.P == 1 else rank // runner.P)
    return runner.shard(make_batch(vocab, seq, sample_seed, args.documents), sp)


def prepare(label: str, seq: int, args, sp, state: dict) -> Configuration:
    """Model, optimizer (or ZeRO-3 engine, left in ``state["engine"]`` for the caller to destroy,
    also when the configuration fails), the system's offload context and this rank's batch."""
    leftover = allocated_gib()
    name, forced, variant = parse_mode(label)
    runner = make_runner(name, sp, args)
    runner.set_kernel(forced, args)
    model = build(runner, seq, variant, args, sp, state)
    n = n_matmul(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=DEV == "cuda")
    engine = None
    if args.zero == 3:
        engine, opt = zero3.initialize(model, opt, runner.mpu(state))
        state["engine"] = engine
    offload = runner.offload(args)
    batch = rank_batch(runner, model.config.vocab_size, seq, args, sp)
    step = Step(runner, model, opt, engine, offload, batch, args, dist.get_world_size())
    return Configuration(label, seq, leftover, n, step)


def describe(conf: Configuration, args, world: int) -> dict:
    s = conf.step
    return {
        "mode": conf.label,
        "model": args.model,
        "zero": args.zero,
        "long_sequence": args.long_sequence,
        "offloaded_gib": round(offloaded_bytes(s.model, s.offload) / 2**30, 2),
        "allocated_before_gib": round(conf.leftover, 2),
        "seq": conf.seq,
        "documents": args.documents,
        "P": s.runner.P,
        "world": world,
        "dp": world // s.runner.P,
    }


def speed(conf: Configuration, m: Measurement, flops: int, world: int) -> dict:
    tmax, tmean = m.across_ranks(world)
    step_ms, P = tmax[0].item(), conf.step.runner.P
    return {
        "step_ms": round(step_ms, 2),
        "step_ms_all": [round(x, 2) for x in m.times],
        "tokens_per_s_per_gpu": round(conf.seq / P / (step_ms / 1e3), 1),
        "model_tflops_per_gpu": round(flops / P / (step_ms / 1e3) / 1e12, 1),
        "peak_mem_gib": round(tmax[1].item(), 2),
        "peak_reserved_gib": round(tmax[2].item(), 2),
        "a2a_ms": round(tmean[3].item(), 2),
        "a2a_share": round(tmean[3].item() / step_ms, 4),
        "a2a_calls_per_step": m.calls,
        "grad_allreduce_ms": round(tmean[4].item(), 2),
    }


def computation(conf: Configuration, m: Measurement, flops: int, args) -> dict:
    s = conf.step
    return {
        "loss_path": s.runner.loss_path(s.model, args),
        "loss_first_last": [round(s.losses[0].item(), 4), round(s.losses[-1].item(), 4)],
        "first_grad_norms": {k: float(f"{v:.6g}") for k, v in s.first_grads.items()},
        "N_matmul": conf.n_matmul,
        "attn_flop_share": round(attention_flops(s.model.config, [conf.seq]) / flops, 3),
        "ulysses_kernel": s.runner.used_kernels(),
        "attention_replayed_per_step": m.replayed,  # selective checkpointing: kernel calls the recompute skipped
        **plan_result(s.model),
    }


def plan_result(model) -> dict:
    """``+auto``: the memory plan of the last step and its predicted peak (``memory_plan``)."""
    checker = getattr(model, "_ulysses_plan_checker", None)
    plan = getattr(checker, "last", None)
    if plan is None:
        return {}
    return {"memory_plan": plan.choice.describe(model.config.num_hidden_layers),
            "plan_predicted_peak_gib": round(plan.predicted_peak_bytes / 2**30, 2),
            "plan_budget_gib": None if plan.budget_bytes is None else round(plan.budget_bytes / 2**30, 2)}


def summarise(conf: Configuration, m: Measurement, args) -> dict:
    """The result of a configuration (every rank takes part in the reductions)."""
    world = dist.get_world_size()
    flops = model_flops(conf.step.model.config, conf.n_matmul, conf.seq, args.documents)
    return {**describe(conf, args, world), **speed(conf, m, flops, world), **computation(conf, m, flops, args),
            **m.profile, **m.memory}


def run_config(label: str, seq: int, args, sp, state: dict) -> dict:
    conf = prepare(label, seq, args, sp, state)
    result = summarise(conf, measure(conf.step, args), args)
    conf = None  # free before the next configuration
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return result


def run_guarded(label: str, seq: int, args, sp, state: dict) -> dict:
    """:func:`run_config`, a failure as an ``error`` result; the engine released; all ranks agree
    that it failed (they hit the same shapes)."""
    try:
        r = run_config(label, seq, args, sp, state)
    except torch.OutOfMemoryError as e:
        r = {"mode": label, "seq": seq, "error": "OOM: " + str(e).split("\n")[0][:200]}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r = {"mode": label, "seq": seq, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    zero3.release(args.zero, state)
    if DEV == "cuda":
        torch.cuda.empty_cache()
    failed = torch.tensor([1.0 if "error" in r else 0.0], device=DEV)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() and "error" not in r:
        r = {"mode": label, "seq": seq, "error": "failed on another rank"}
    return r


def gpu_too_small(min_gib: float) -> bool:
    """``--min-gpu-gib``: skip every configuration on smaller GPUs."""
    return bool(min_gib) and DEV == "cuda" and torch.cuda.get_device_properties(0).total_memory / 2**30 < min_gib


def run_all(modes: list[str], seqs: list[int], args, sp, info: dict) -> list[dict]:
    """Every mode at every length, in one process; the JSON rewritten after each (rank 0)."""
    results: list[dict] = []
    state: dict = {}  # ALST's mpu (registered once per process), the engine to destroy
    for label in modes:
        for seq in seqs:
            log(f"--- {label} seq={seq} P={1 if label in STOCK else sp.size} ---")
            if gpu_too_small(args.min_gpu_gib):
                results.append({"mode": label, "seq": seq, "error": f"skipped: GPU has < {args.min_gpu_gib} GiB"})
                log(json.dumps(results[-1]))
                continue
            results.append(run_guarded(label, seq, args, sp, state))
            log(json.dumps(results[-1]))
            if rank0() and args.json:
                write_json(args.json, info, results)
    return results
