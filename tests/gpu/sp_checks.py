"""GPU checks of ulysses_attn, run as a script (not collected by pytest; see test_gpu.py).

    python tests/gpu/sp_checks.py kernels sinks --out DIR                   # one GPU
    torchrun --nproc_per_node 2 tests/gpu/sp_checks.py comm models memory --out DIR # NCCL, P = world

* ``kernels``: every inner kernel of ``ulysses_attn.available_kernels("cuda")`` against the exact
  ``reference`` kernel in float64, bf16 (and fp32 where the kernel takes it), forward and backward,
  for dense, GQA, head_dim 128, packed (position_ids restart), left-padded and sliding-window
  inputs, each where the kernel supports it.
* ``sinks``: attention sinks through every kernel that takes them (``reference``; FA4) against the
  float64 reference, gradients of q, k, v and the sinks included; and the FA4 op's log-sum-exp
  gradient.
* ``comm``: NCCL all-to-all round trip of ``gather_seq_scatter_heads`` / ``gather_heads_scatter_seq``
  (bitwise), their backward (the adjoint), ``all_gather_seq`` and ``all_reduce_sum``.
* ``models``: Llama- and Qwen2-architecture models (hidden 256, 4 layers, 8 heads / 2 KV heads,
  seq 4096; Qwen2 also with sliding-window layers), plain and packed, SP (``ulysses_flash``, every
  kernel that can run the case) against the same model in one process (HF ``sdpa``): bf16 loss
  rel. diff <= 1e-3 and gradient cosine >= 0.9995; fp32 (``reference``/``sdpa`` kernels vs. SDPA math)
  loss, logits and gradients rel. err <= 1e-5.
* ``memory``: the long-sequence memory options (``MemoryOptions.long_sequence()``: chunked loss,
  tiled MLP, checkpoint offload to pinned host memory on a side stream) under SP with small chunks
  (several loss and MLP chunks per shard, every checkpointed layer input offloaded), against the
  plain single-process model: same tolerances as ``models``; also records the bytes offloaded.
  Llama also with ``selective_checkpointing`` (attention outputs kept through the recompute: each
  layer's recompute must skip its kernel, FA4's included), and with those outputs offloaded too
  (``offload_attention_outputs``).

Every case is recorded (``DIR/<check>-rank<r>.json``) and failures are collected rather than
raised, so one run reports everything; the exit code is 1 when any case failed.
``SP_CHECKS_KERNELS=flash_attn,sdpa`` checks only those kernels (``auto`` and the references still
run). ``SP_CHECKS_DEVICE=cpu`` runs the same code on CPU/gloo (slow; a dry run of the script itself).
``SP_CHECKS_BACKEND=gloo`` keeps CUDA but communicates through gloo, so that several ranks can share
one GPU (rank r uses GPU r mod the GPU count): the kernels and models at P = 2/4 on a one-GPU
machine. NCCL refuses two ranks on one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import ulysses_attn
from ulysses_attn import comm, kernels
from ulysses_attn.kernels import Layout, attend, layout_from_positions
from ulysses_attn.selective_checkpoint import replayed_attention_outputs

DEVICE_TYPE = os.environ.get("SP_CHECKS_DEVICE", "cuda")
BACKEND = os.environ.get("SP_CHECKS_BACKEND", "nccl" if DEVICE_TYPE == "cuda" else "gloo")
FAILURES: list[str] = []
RECORDS: list[dict] = []


def log(msg: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        print(msg, flush=True)


def record(check: str, case: str, ok: bool, **metrics) -> None:
    RECORDS.append({"check": check, "case": case, "ok": bool(ok), **metrics})
    if not ok:
        FAILURES.append(f"{check}/{case}: {metrics}")
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
    log(f"[{'PASS' if ok else 'FAIL'}] {check}/{case}: {shown}")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return v


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-30)).item()


def device() -> torch.device:
    if DEVICE_TYPE == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def selected(names: list[str]) -> list[str]:
    """The kernels to check: all available, or those named in ``SP_CHECKS_KERNELS`` (comma-separated)."""
    only = os.environ.get("SP_CHECKS_KERNELS")
    return [n for n in names if n in only.split(",")] if only else names


def exact_fp32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# ------------------------------------------------------------------------------------------------
# kernels (one process)
# ------------------------------------------------------------------------------------------------


def _packed_positions(B: int, S: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randint(1, S, (5,), generator=gen).tolist())
        lens = [b - a for a, b in zip([0, *cuts], [*cuts, S]) if b > a]
        rows.append(torch.cat([torch.arange(n) for n in lens]))
    return torch.stack(rows)


def kernel_cases():
    """(name, B, S, H, Hkv, D, layout kind, window); SP_CHECKS_SCALE=n divides the lengths (CPU dry run)."""
    n = int(os.environ.get("SP_CHECKS_SCALE", "1"))
    yield "dense_gqa", 2, 2048 // n, 8, 2, 64, "dense", None
    yield "dense_mha_d128", 1, 4096 // n, 4, 4, 128, "dense", None
    yield "dense_mqa_odd_len", 1, 1531 // n, 4, 1, 64, "dense", None
    yield "packed_gqa", 2, 2048 // n, 8, 2, 64, "packed", None
    yield "left_padded", 2, 1024 // n, 4, 2, 64, "left_padded", None
    yield "window", 1, 2048 // n, 8, 2, 64, "dense", 256 // n
    yield "packed_window", 2, 2048 // n, 8, 2, 64, "packed", 200 // n


def _make_layout(kind: str, B: int, S: int, dev, gen) -> Layout:
    if kind == "dense":
        return layout_from_positions(torch.arange(S, device=dev).expand(B, S), None)
    if kind == "packed":
        return layout_from_positions(_packed_positions(B, S, gen).to(dev), None)
    if kind == "left_padded":
        valid = torch.ones(B, S, dtype=torch.bool)
        for b in range(B):
            valid[b, : 37 * (b + 1)] = False
        pos = (valid.long().cumsum(1) - 1).clamp_min(0)
        return layout_from_positions(pos.to(dev), valid.to(dev))
    raise ValueError(kind)


def _run_kernel(name, q, k, v, do, layout, window):
    kernels.set_kernel(name)
    try:
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = attend(q, k, v, layout, causal=True, window=window)
        out.backward(do)
        return out.detach(), q.grad, k.grad, v.grad
    finally:
        kernels.set_kernel(None)


def check_kernels(args) -> None:
    dev = device()
    exact_fp32()
    names = ulysses_attn.available_kernels(dev)
    log(f"available kernels on {dev}: {names} (flash_attn = {kernels.flash_version(dev)})")
    record("kernels", "available", "reference" in names and (DEVICE_TYPE != "cuda" or "sdpa" in names), kernels=names)
    available = names
    names = selected(names)
    gen = torch.Generator().manual_seed(0)
    for case, B, S, H, Hkv, D, kind, window in kernel_cases():
        layout = _make_layout(kind, B, S, dev, gen)
        base = [torch.randn(B, S, h, D, generator=gen).to(dev) for h in (H, Hkv, Hkv)]
        do64 = torch.randn(B, S, H, D, generator=gen).to(dev).double()
        gold = _run_kernel("reference", *(t.double() for t in base), do64, layout, window)
        bf16_ref = _run_kernel("reference", *(t.bfloat16() for t in base), do64.bfloat16(), layout, window)
        ref_err = max(rel_err(a, b) for a, b in zip(bf16_ref, gold))
        for name in names:
            k = kernels.KERNELS[name]
            if not kernels._supports(k, window, None, 0.0, dev):
                log(f"[skip] kernels/{name}/{case}: not supported by the kernel")
                continue
            for dtype in (torch.bfloat16, torch.float32):
                if dtype == torch.float32 and name in ("flash_attn", "torch_varlen"):
                    continue  # flash kernels take fp16/bf16 only
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                label = f"{name}/{case}/{str(dtype).split('.')[-1]}"
                try:
                    got = _run_kernel(name, *(t.to(dtype) for t in base), do64.to(dtype), layout, window)
                    errs = {n: rel_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, gold)}
                    finite = all(bool(torch.isfinite(t).all()) for t in got)
                    record("kernels", label, finite and max(errs.values()) <= tol, **errs,
                           reference_bf16_err=ref_err, tol=tol)
                except Exception as e:  # noqa: BLE001 - report every kernel failure
                    record("kernels", label, False, error=f"{type(e).__name__}: {e}")
                    traceback.print_exc()
    # automatic choice: what each layout gets
    for kind, window in (("dense", None), ("packed", None), ("dense", 256)):
        layout = _make_layout(kind, 1, 1024, dev, gen)
        chosen = kernels.choose_kernel(dev, layout, window)
        record("kernels", f"auto/{kind}/window={window}", chosen in available, chosen=chosen)


def check_sinks(args) -> None:
    """Attention sinks (gpt-oss) through every kernel that takes them, and the FA4 op's lse
    gradient, against the float64 reference kernel: forward and backward (q, k, v, sinks)."""
    dev = device()
    gen = torch.Generator().manual_seed(1)
    with_sinks = [n for n in ulysses_attn.available_kernels(dev) if kernels.KERNELS[n].sinks(dev)]
    log(f"kernels with attention sinks on {dev}: {with_sinks}")
    record("sinks", "available", "reference" in with_sinks, kernels=with_sinks)
    names = selected(with_sinks)
    for case, B, S, H, Hkv, D, kind, window in kernel_cases():
        layout = _make_layout(kind, B, S, dev, gen)
        base = [torch.randn(B, S, h, D, generator=gen).to(dev) for h in (H, Hkv, Hkv)]
        sinks = (torch.randn(H, generator=gen) * 2).to(dev)
        do = torch.randn(B, S, H, D, generator=gen).to(dev)

        def run(name, dtype):
            kernels.set_kernel(name)
            try:
                q, k, v = (t.to(dtype).requires_grad_(True) for t in base)
                s = sinks.to(dtype).requires_grad_(True)
                out = attend(q, k, v, layout, causal=True, window=window, sinks=s)
                out.backward(do.to(dtype))
                return out.detach(), q.grad, k.grad, v.grad, s.grad
            finally:
                kernels.set_kernel(None)

        gold = run("reference", torch.float64)
        for name in names:
            if not kernels._supports(kernels.KERNELS[name], window, None, 0.0, dev, True):
                continue
            label = f"{name}/{case}/bfloat16"
            try:
                got = run(name, torch.bfloat16)
                errs = {n: rel_err(a, b) for n, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), got, gold)}
                record("sinks", label, max(errs.values()) <= 2e-2, **errs)
            except Exception as e:  # noqa: BLE001 - report every failure
                record("sinks", label, False, error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
    if kernels.flash_version(dev) == "fa4" and kernels.flash4_supported():  # the op's lse and its gradient
        q, k, v = (torch.randn(2, 1024, h, 128, generator=gen).to(dev) for h in (8, 2, 2))
        w_out, w_lse = torch.randn(2, 1024, 8, 128, generator=gen).to(dev), torch.randn(2, 8, 1024, generator=gen)

        def lse_loss(q, k, v, fa4: bool):
            if fa4:
                out, lse = torch.ops.ulysses_attn.flash_attn4(q, k, v, None, None, 128**-0.5, True, None, None, 0.0)
            else:
                s_ = (q.transpose(1, 2) @ k.repeat_interleave(4, 2).permute(0, 2, 3, 1)) * 128**-0.5
                s_ = s_.masked_fill(~torch.ones(1024, 1024, dtype=torch.bool, device=dev).tril(), float("-inf"))
                lse = s_.logsumexp(-1)
                out = (s_.softmax(-1) @ v.repeat_interleave(4, 2).transpose(1, 2)).transpose(1, 2)
            return (out.float() * w_out).sum() + (lse.float() * w_lse.to(dev)).sum()

        grads = {}
        for label, dtype, fa4 in (("fa4", torch.bfloat16, True), ("gold", torch.float64, False)):
            ts = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
            lse_loss(*ts, fa4).backward()
            grads[label] = [t.grad for t in ts]
        errs = {n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), grads["fa4"], grads["gold"])}
        record("sinks", "fa4_op/lse_gradient/bfloat16", max(errs.values()) <= 2e-2, **errs)


# ------------------------------------------------------------------------------------------------
# communication (torchrun)
# ------------------------------------------------------------------------------------------------


def check_comm(args) -> None:
    sp = ulysses_attn.get_sequence_parallel()
    P, r, group = sp.size, sp.rank, sp.group
    dev = device()
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, S, D in ((2, 8, 64, 16), (1, 4 * P, 1000, 128), (1, 32, 8192, 128)):
            label = f"a2a/{str(dtype).split('.')[-1]}/B{B}H{H}S{S}D{D}"
            try:
                g = torch.Generator(device="cpu").manual_seed(1000 + r)
                # a non-contiguous input, as the attention gets it ([B, S, H, D] viewed as [B, H, S, D])
                x = torch.randn(B, S, H, D, generator=g).to(dev, dtype).transpose(1, 2).requires_grad_(True)
                y = comm.gather_seq_scatter_heads(x, group)
                full = comm.all_gather_seq(x.detach(), group, dim=2)  # [B, H, S*P, D]
                expect = full[:, r * H // P : (r + 1) * H // P]
                fwd_ok = y.shape == (B, H // P, S * P, D) and torch.equal(y, expect)
                z = comm.gather_heads_scatter_seq(y, group)
                round_ok = torch.equal(z, x.detach())
                gy = torch.randn(y.shape, generator=g).to(dev, dtype)
                y.backward(gy)
                adj_ok = torch.equal(x.grad, comm.gather_heads_scatter_seq(gy, group))
                # <y, gy> summed over ranks == <x, x.grad> summed over ranks
                lhs = (y.detach().double() * gy.double()).sum()
                rhs = (x.detach().double() * x.grad.double()).sum()
                both = torch.stack([lhs, rhs])
                dist.all_reduce(both, group=group)
                dot_ok = math.isclose(both[0].item(), both[1].item(), rel_tol=1e-9, abs_tol=1e-6)
                record("comm", label, fwd_ok and round_ok and adj_ok and dot_ok,
                       forward=fwd_ok, round_trip=round_ok, backward=adj_ok, adjoint_dot=dot_ok)
            except Exception as e:  # noqa: BLE001
                record("comm", label, False, error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
    # all_reduce_sum: forward sum, backward sums the upstream gradients of all ranks
    try:
        x = torch.full((3,), float(r + 1), device=dev, requires_grad=True)
        s = comm.all_reduce_sum(x, group)
        (s * (r + 1)).sum().backward()
        want_s = P * (P + 1) / 2
        ok = torch.allclose(s.detach(), torch.full_like(s, want_s)) and torch.allclose(x.grad, torch.full_like(x, want_s))
        record("comm", "all_reduce_sum", ok, value=s[0].item(), grad=x.grad[0].item(), expect=want_s)
    except Exception as e:  # noqa: BLE001
        record("comm", "all_reduce_sum", False, error=f"{type(e).__name__}: {e}")
    # informative bandwidth of the all-to-all at a real layer size (Llama-8B q at 32K tokens, P ranks)
    if DEVICE_TYPE == "cuda":
        x = torch.randn(1, 32, 32768 // P, 128, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            comm.gather_seq_scatter_heads(x, group)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 10
        for _ in range(n):
            comm.gather_seq_scatter_heads(x, group)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / n
        nbytes = x.numel() * x.element_size()
        record("comm", "a2a_bandwidth_info", True, msg_MB=nbytes / 1e6, ms=dt * 1e3,
               algbw_GBps=nbytes / dt / 1e9, busbw_GBps=nbytes * (P - 1) / P / dt / 1e9)


# ------------------------------------------------------------------------------------------------
# models (torchrun)
# ------------------------------------------------------------------------------------------------

VOCAB = 2048
SEQ = int(os.environ.get("SP_CHECKS_SEQ", "4096"))


def model_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2 * SEQ,
                  initializer_range=0.05)
    if name == "llama":
        return LlamaConfig(**common)
    if name == "qwen2":  # q/k/v bias
        return Qwen2Config(**common)
    if name == "qwen2_swa":  # layers 2 and 3 use a sliding window shorter than the sequence
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=SEQ // 5, max_window_layers=2)
    if name == "qwen2_5heads":  # 5 query heads, 1 KV head: padded to 6 heads at P = 2, 8 at P = 4
        return Qwen2Config(**{**common, "num_attention_heads": 5, "num_key_value_heads": 1}, head_dim=32)
    raise ValueError(name)


def build(name: str, attn: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(name), attn_implementation=attn, dtype=torch.float32)
    return model.to(device=device(), dtype=dtype)


def make_batch(kind: str):
    g = torch.Generator().manual_seed(7)
    S = SEQ - 3  # not a multiple of P: shard_batch pads
    ids = torch.randint(1, VOCAB, (1, S), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
    if kind == "packed":
        lens = [S // 3, 17, S // 2]
        lens.append(S - sum(lens))
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lens])[None]
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0)[:-1].tolist()])
        batch["labels"][0, starts] = -100  # DataCollatorWithFlattening masks each document's first token
    return {k: v.to(device()) if torch.is_tensor(v) else v for k, v in batch.items()}


def _sp_run(model, batch):
    sp = ulysses_attn.get_sequence_parallel()
    shard = ulysses_attn.shard_batch(batch)
    out = model(**shard)
    out.loss.backward()
    seq = batch["input_ids"].shape[1]
    logits = comm.all_gather_seq(out.logits.detach().float(), sp.group)[:, :seq]
    return out.loss.item(), logits, _mean_grads(model)


def _mean_grads(model) -> dict:
    """Each parameter's gradient averaged over all ranks: what DDP's mean hands the optimizer."""
    grads = {}
    for n, p in model.named_parameters():
        gr = p.grad.detach().float().clone()
        dist.all_reduce(gr)
        grads[n] = gr / dist.get_world_size()
    return grads


@contextlib.contextmanager
def _case(check: str, label: str):
    """One case: an exception is recorded as its failure, so one run reports every case."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        record(check, label, False, error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        kernels.set_kernel(None)
        if DEVICE_TYPE == "cuda":
            torch.cuda.empty_cache()


def _within_tolerance(m: dict, dtype: torch.dtype) -> bool:
    """bf16: loss rel. diff <= 1e-3, gradient cosine >= 0.9995 (each parameter >= 0.999): about
    19x, 3x and 2x looser than the worst of ~300 bf16 cases recorded on H200 (5.3e-5, 0.99983,
    0.99955), tighter than the issue's 1e-2 / 0.999, so that a regression shows; fp32: loss,
    logits (where compared) and gradients rel. err <= 1e-5 (each parameter <= 1e-4)."""
    if dtype == torch.bfloat16:
        ok = m["loss_rel"] <= 1e-3 and m["grad_cos"] >= 0.9995 and m["min_param_cos"] >= 0.999
    else:
        ok = m["loss_rel"] <= 1e-5 and m.get("logits_rel", 0.0) <= 1e-5 and m["grad_rel"] <= 1e-5 \
            and m["max_param_rel"] <= 1e-4
    return ok and all(math.isfinite(v) for v in m.values() if isinstance(v, float))


def _compare(ref_loss, ref_logits, ref_grads, sp_loss, sp_logits, sp_grads):
    flat_r = torch.cat([g.flatten().double() for g in ref_grads.values()])
    flat_s = torch.cat([sp_grads[n].flatten().double() for n in ref_grads])
    per_cos = {n: cosine(sp_grads[n], g) for n, g in ref_grads.items()}
    per_rel = {n: rel_err(sp_grads[n], g) for n, g in ref_grads.items()}
    worst_cos = min(per_cos, key=per_cos.get)
    worst_rel = max(per_rel, key=per_rel.get)
    return {
        "loss_sp": sp_loss,
        "loss_ref": ref_loss,
        "loss_rel": abs(sp_loss - ref_loss) / abs(ref_loss),
        "logits_rel": rel_err(sp_logits, ref_logits),
        "grad_cos": cosine(flat_s, flat_r),
        "grad_rel": rel_err(flat_s, flat_r),
        "min_param_cos": per_cos[worst_cos],
        "min_param_cos_name": worst_cos,
        "max_param_rel": per_rel[worst_rel],
        "max_param_rel_name": worst_rel,
    }


def _reference(name, batch, dtype):
    ref = build(name, "sdpa", dtype)
    ctx = torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]) if dtype == torch.float32 else _null()
    with ctx:
        out = ref(**batch)
        out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in ref.named_parameters()}
    loss, logits = out.loss.item(), out.logits.detach().float()
    del ref, out
    return loss, logits, grads


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def check_models(args) -> None:
    P = ulysses_attn.get_sequence_parallel().size
    dev = device()
    names = selected(ulysses_attn.available_kernels(dev))
    for name in ("llama", "qwen2", "qwen2_swa", "qwen2_5heads"):
        for kind in ("plain", "packed"):
            batch = make_batch(kind)
            window = model_config(name).sliding_window if name == "qwen2_swa" else None
            for dtype in (torch.bfloat16, torch.float32):
                dname = str(dtype).split(".")[-1]
                try:
                    ref = _reference(name, batch, dtype)
                except Exception as e:  # noqa: BLE001
                    record("models", f"{name}/{kind}/{dname}/reference", False, error=f"{type(e).__name__}: {e}")
                    traceback.print_exc()
                    continue
                if dtype == torch.bfloat16:
                    todo = [None, *names]  # auto, then each kernel (reference last)
                else:
                    todo = [n for n in ("reference", "sdpa") if n in names]
                for kname in todo:
                    if kname is not None:
                        k = kernels.KERNELS[kname]
                        if not kernels._supports(k, window, None, 0.0, dev):
                            continue
                        if dtype == torch.float32 and kname in ("flash_attn", "torch_varlen"):
                            continue
                    label = f"{name}/{kind}/{dname}/P{P}/{kname or 'auto'}"
                    kernels.set_kernel(kname)
                    kernels.reset_used_kernels()
                    with _case("models", label):
                        model = build(name, "ulysses_flash", dtype)
                        model.loss_function = ulysses_attn.causal_lm_loss
                        m = _compare(*ref, *_sp_run(model, batch))
                        used = sorted(kernels.used_kernels())
                        del model
                        record("models", label, _within_tolerance(m, dtype), kernels_used=used, **m)


def check_memory(args) -> None:
    exact_fp32()
    P = ulysses_attn.get_sequence_parallel().size
    # selective: keep the attention outputs; offload_kept: and send them to the host with the checkpoints
    for name, selective, offload_kept in (("llama", False, False), ("qwen2", False, False), ("llama", True, False),
                                          ("llama", True, True)):
        batch = make_batch("plain")
        for dtype in (torch.bfloat16, torch.float32):
            dname = str(dtype).split(".")[-1]
            label = f"{name}/{dname}/P{P}/long_sequence" + "+selective" * selective + "+offload" * offload_kept
            kernels.set_kernel("sdpa" if dtype == torch.float32 else None)
            kernels.reset_used_kernels()
            with _case("memory", label):
                ref_loss, ref_logits, ref_grads = _reference(name, batch, dtype)
                model = build(name, "ulysses_flash", dtype)
                model.loss_function = ulysses_attn.causal_lm_loss
                model.train()
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                ulysses_attn.configure_memory(model, ulysses_attn.MemoryOptions.long_sequence(
                    loss_chunk_tokens=SEQ // (4 * P), mlp_chunk_tokens=SEQ // (4 * P), offload_min_bytes=0,
                    selective_checkpointing=selective, offload_attention_outputs=offload_kept))
                replayed = replayed_attention_outputs()
                out = model(**ulysses_attn.shard_batch(batch))
                out.loss.backward()
                replayed = replayed_attention_outputs() - replayed
                grads = _mean_grads(model)
                m = _compare(ref_loss, ref_logits, ref_grads, out.loss.item(), ref_logits, grads)
                m.pop("logits_rel")  # the chunked loss returns no logits
                m["offloaded_mib"] = model._ulysses_offloader.offloaded_bytes / 2**20
                m["logits_returned"] = out.logits is not None
                m["attention_replayed"] = replayed  # selective: each layer's recompute skipped its kernel
                m["kernels_used"] = sorted(kernels.used_kernels())
                layers = model.config.num_hidden_layers
                del model, out
                # fp32 runs SDPA's math backend (exact_fp32), which decomposes into matmuls: nothing to keep
                kept = replayed >= selective * layers or dtype == torch.float32
                ok = _within_tolerance(m, dtype) and not m["logits_returned"] and kept
                record("memory", label, ok and (DEVICE_TYPE != "cuda" or m["offloaded_mib"] > 0), **m)


# ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checks", nargs="+", choices=["kernels", "sinks", "comm", "models", "memory"])
    ap.add_argument("--out", default=None, help="folder for the JSON records")
    args = ap.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if DEVICE_TYPE == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available", file=sys.stderr)
            return 2
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if distributed:
        dist.init_process_group(BACKEND, timeout=datetime.timedelta(seconds=300),
                                device_id=device() if BACKEND == "nccl" else None)
        ulysses_attn.init_sequence_parallel(dist.get_world_size())
    elif any(c not in ("kernels", "sinks") for c in args.checks):
        print("comm/models need torchrun (WORLD_SIZE unset)", file=sys.stderr)
        return 2
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if DEVICE_TYPE == "cuda" else "cpu",
            "backend": BACKEND if distributed else None,
            "world": dist.get_world_size() if distributed else 1}
    import transformers

    info["transformers"] = transformers.__version__
    log(f"sp_checks {args.checks} {info}")
    t0 = time.time()
    for c in args.checks:
        checks = {"kernels": check_kernels, "sinks": check_sinks, "comm": check_comm, "models": check_models}
        {**checks, "memory": check_memory}[c](args)
    rank = dist.get_rank() if distributed else 0
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{'-'.join(args.checks)}-P{info['world']}-rank{rank}.json"), "w") as f:
            json.dump({"info": info, "records": RECORDS, "failures": FAILURES}, f, indent=1, default=str)
    # every rank must pass
    bad = torch.tensor([len(FAILURES)], device=device() if distributed else "cpu")
    if distributed:
        dist.all_reduce(bad)
    log(f"sp_checks {args.checks}: {len(RECORDS)} cases, {int(bad.item())} failures (all ranks), {time.time() - t0:.1f}s")
    for f in FAILURES:
        print(f"rank {rank} FAILED {f}", flush=True)
    if distributed:
        ulysses_attn.destroy_sequence_parallel()
        dist.destroy_process_group()
    return 1 if int(bad.item()) else 0


if __name__ == "__main__":
    sys.exit(main())
