"""GPU check of transparent mode (ulysses_attn/transparent.py) in bf16, run as a script (not
collected by pytest; see test_gpu.py::test_transparent_bf16_ranks_sharing_one_gpu).

    SP_CHECKS_BACKEND=gloo torchrun --nproc_per_node 2 tests/gpu/transparent_checks.py --out DIR  # 2 ranks, 1 GPU
    torchrun --nproc_per_node 2 tests/gpu/transparent_checks.py --out DIR                         # NCCL, 2 GPUs

A Llama-shaped model built from a config (hidden 512, 4 layers, 8 heads / 2 KV heads, vocab 32000,
no download) is made transparent (``ulysses_attn.enable`` then ``ulysses_attn.make_transparent``)
and gets the whole padded batch on every rank (3 rows right-padded to S = 2045, not a multiple of
P). Losses computed outside the package from ``outputs.logits`` (label-smoothed cross-entropy, and
cross-entropy plus a z-loss, both upcast to fp32), and the model's own loss (``labels=``), are
compared with the same model without SP (HF ``sdpa``, one process):

* bf16, the automatic kernel (padded batches: ``torch_varlen``) and ``sdpa``: loss rel. diff
  <= 1e-3, gradient cosine >= 0.9995 (each parameter >= 0.999), the tolerances of sp_checks.py's
  bf16 model checks; every rank holds the same loss; the decoder layers saw ceil(S/P) tokens.
* fp32 (``sdpa`` kernel, the reference on SDPA's math backend): loss, logits (valid tokens) and
  gradients rel. err <= 1e-5 (each parameter <= 1e-4).
* for scale, ``bf16_vs_fp32`` records how far the bf16 model without SP is from the fp32 one (no
  SP anywhere): what bf16 itself costs, to set the SP differences against.

Gradients are each parameter's gradient averaged over the ranks (what DDP's mean hands the
optimizer). Records go to ``DIR/transparent-P<P>-rank<r>.json``; one JSON summary line is printed
at the end; exit code 1 when a case failed. ``SP_CHECKS_DEVICE=cpu`` is the CPU dry run (tiny
sizes: ``TRANSPARENT_CHECKS_TINY=1`` is implied).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sp_checks  # noqa: E402  (the shared helpers: device, records, comparisons, tolerances)
from sp_checks import (  # noqa: E402
    BACKEND,
    DEVICE_TYPE,
    FAILURES,
    RECORDS,
    device,
    exact_fp32,
    log,
    record,
)

import ulysses_attn  # noqa: E402
from ulysses_attn import kernels  # noqa: E402
from ulysses_attn.models import decoder_layers  # noqa: E402

TINY = DEVICE_TYPE == "cpu" or os.environ.get("TRANSPARENT_CHECKS_TINY") == "1"
VOCAB = 1000 if TINY else 32000
SEQ = 61 if TINY else 2045  # not a multiple of P: the transparent forward pads inside
LENGTHS = (SEQ, (3 * SEQ) // 4, (2 * SEQ) // 5)  # right padding
SMOOTHING = 0.1
Z_WEIGHT = 1e-4


def config():
    from transformers import LlamaConfig

    hidden = 64 if TINY else 512
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=(hidden * 11) // 4,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                       max_position_embeddings=2 * SEQ, initializer_range=0.05, tie_word_embeddings=False)


def build(attn: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the same fp32 weights for every model; bf16 ones are their rounding
    model = AutoModelForCausalLM.from_config(config(), attn_implementation=attn, dtype=torch.float32)
    return model.to(device=device(), dtype=dtype)


def make_batch() -> dict:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), SEQ), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device()), "attention_mask": mask.to(device()), "labels": labels.to(device())}


# the losses a script computes from outputs.logits (the package knows nothing of them)


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           label_smoothing=SMOOTHING)


def ce_plus_zloss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = logits[:, :-1].flatten(0, 1).float()
    y = labels[:, 1:].flatten()
    valid = y != -100
    z = torch.logsumexp(x[valid], dim=-1)
    return F.cross_entropy(x, y, ignore_index=-100) + Z_WEIGHT * (z**2).mean()


LOSSES = {"smoothed_ce": smoothed_ce, "ce_plus_zloss": ce_plus_zloss, "model_loss": None}


def run_loss(model, batch: dict, loss_name: str):
    """(loss, logits of the valid tokens, {param: grad}) of one forward/backward on the whole batch."""
    fn = LOSSES[loss_name]
    if fn is None:  # the model's own loss (labels=)
        out = model(**batch, use_cache=False)
        loss = out.loss
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss = fn(out.logits, batch["labels"])
    loss.backward()
    keep = batch["attention_mask"].bool()
    logits = out.logits.detach()[keep].float()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), logits, grads


def reference(batch: dict, loss_name: str, dtype: torch.dtype):
    model = build("sdpa", dtype)
    math_only = torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH])
    if dtype == torch.float32:
        with math_only:
            result = run_loss(model, batch, loss_name)
    else:
        result = run_loss(model, batch, loss_name)
    del model
    return result


def mean_over_ranks(grads: dict) -> dict:
    world = dist.get_world_size()
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    return grads


def compare(ref, got) -> dict:
    m = sp_checks._compare(*ref, *got)
    for k in ("loss_sp", "loss_ref", "loss_rel", "logits_rel", "grad_cos", "grad_rel"):
        m[k] = float(m[k])
    return m


def check_transparent(sp) -> None:
    P = sp.size
    exact_fp32()  # fp32: no TF32 anywhere (bf16 is unaffected)
    batch = make_batch()
    names = ulysses_attn.available_kernels(device())
    for loss_name in LOSSES:
        refs = {}
        for dtype in (torch.float32, torch.bfloat16):
            try:
                refs[dtype] = reference(batch, loss_name, dtype)
            except Exception as e:  # noqa: BLE001
                record("transparent", f"{loss_name}/{dtype}/reference", False, error=f"{type(e).__name__}: {e}")
                traceback.print_exc()
        if len(refs) < 2:
            continue
        # scale: bf16 without SP against fp32 without SP (no SP on either side)
        scale = compare(refs[torch.float32], refs[torch.bfloat16])
        record("transparent", f"{loss_name}/bf16_vs_fp32/no_sp", True,
               loss_rel=scale["loss_rel"], grad_cos=scale["grad_cos"], grad_rel=scale["grad_rel"],
               min_param_cos=scale["min_param_cos"], logits_rel=scale["logits_rel"])
        cases = [(torch.bfloat16, None), *[(torch.bfloat16, k) for k in ("sdpa",) if k in names],
                 (torch.float32, "sdpa" if "sdpa" in names else "reference")]
        for dtype, kname in cases:
            dname = str(dtype).split(".")[-1]
            label = f"{loss_name}/{dname}/P{P}/{kname or 'auto'}"
            kernels.set_kernel(kname)
            kernels.reset_used_kernels()
            with sp_checks._case("transparent", label):
                model = build("ulysses_flash", dtype)
                ulysses_attn.make_transparent(model, sp)
                seen: list[int] = []
                for layer in decoder_layers(model):
                    layer.register_forward_pre_hook(
                        lambda mod, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                        with_kwargs=True)
                loss, logits, grads = run_loss(model, batch, loss_name)
                del model
                losses = [None] * P
                dist.all_gather_object(losses, loss, group=sp.group)
                m = compare(refs[dtype], (loss, logits, mean_over_ranks(grads)))
                m["same_loss_on_every_rank"] = len(set(losses)) == 1
                m["layer_tokens"] = max(seen)
                m["kernels_used"] = sorted(kernels.used_kernels())
                m["ref_bf16_vs_fp32_loss_rel"] = scale["loss_rel"]
                m["ref_bf16_vs_fp32_grad_cos"] = scale["grad_cos"]
                sharded = m["layer_tokens"] <= -(-SEQ // P)
                ok = sp_checks._within_tolerance(m, dtype)  # bf16: logits_rel is recorded, not checked
                record("transparent", label, ok and sharded and m["same_loss_on_every_rank"], **m)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for the JSON records")
    args = ap.parse_args()
    if "WORLD_SIZE" not in os.environ:
        print("transparent_checks needs torchrun (WORLD_SIZE unset)", file=sys.stderr)
        return 2
    if DEVICE_TYPE == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available", file=sys.stderr)
            return 2
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(BACKEND, timeout=datetime.timedelta(seconds=300),
                            device_id=device() if BACKEND == "nccl" else None)
    sp = ulysses_attn.enable(sp_size=dist.get_world_size(), select_backend=False)  # the reference keeps sdpa
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if DEVICE_TYPE == "cuda" else "cpu",
            "backend": BACKEND, "world": dist.get_world_size(), "seq": SEQ, "lengths": LENGTHS, "vocab": VOCAB,
            "hidden": config().hidden_size, "git_commit": os.environ.get("BENCH_GIT_COMMIT", "unknown")}
    log(f"transparent_checks {info}")
    t0 = time.time()
    check_transparent(sp)
    rank = dist.get_rank()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"transparent-P{info['world']}-rank{rank}.json"), "w") as f:
            json.dump({"info": info, "records": RECORDS, "failures": FAILURES}, f, indent=1, default=str)
    bad = torch.tensor([len(FAILURES)], device=device())
    dist.all_reduce(bad)
    elapsed = time.time() - t0
    log(f"transparent_checks: {len(RECORDS)} cases, {int(bad.item())} failures (all ranks), {elapsed:.1f}s")
    sp_cases = [r for r in RECORDS if "bf16_vs_fp32" not in r["case"] and "error" not in r]
    summary = {
        "info": info, "cases": len(RECORDS), "failures": int(bad.item()),
        "bf16_worst_loss_rel": max((r["loss_rel"] for r in sp_cases if "/bfloat16/" in r["case"]), default=None),
        "bf16_worst_grad_cos": min((r["grad_cos"] for r in sp_cases if "/bfloat16/" in r["case"]), default=None),
        "bf16_worst_param_cos": min((r["min_param_cos"] for r in sp_cases if "/bfloat16/" in r["case"]),
                                    default=None),
        "fp32_worst_loss_rel": max((r["loss_rel"] for r in sp_cases if "/float32/" in r["case"]), default=None),
        "fp32_worst_grad_rel": max((r["grad_rel"] for r in sp_cases if "/float32/" in r["case"]), default=None),
        "no_sp_bf16_vs_fp32_loss_rel": [r["loss_rel"] for r in RECORDS if "bf16_vs_fp32" in r["case"]],
        "no_sp_bf16_vs_fp32_grad_cos": [r["grad_cos"] for r in RECORDS if "bf16_vs_fp32" in r["case"]],
    }
    log(json.dumps(summary, default=str))
    for fail in FAILURES:
        print(f"rank {rank} FAILED {fail}", flush=True)
    ulysses_attn.disable()
    dist.destroy_process_group()
    return 1 if int(bad.item()) else 0


if __name__ == "__main__":
    sys.exit(main())
