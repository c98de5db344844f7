"""Peak memory per rank of transparent mode (whole logits on every rank) against the sharded path
(the package's default for a causal-LM loss: S/P tokens per rank, chunked loss), one training step.

    BENCH_BACKEND=gloo torchrun --nproc_per_node 2 benchmarks/bench_transparent.py --seq 4096,8192,16384
    torchrun --nproc_per_node 1 benchmarks/bench_transparent.py --seq 16384,32768   # P = 1

(``BENCH_BACKEND=gloo``: the two ranks share one GPU; NCCL refuses that.)

The model is the Llama-3.2-1B shape (``lib/shapes.py``: hidden 2048, 16 layers, 32 heads / 8 KV
heads, vocab 128256, tied embeddings), random init, bf16, gradient checkpointing (non-reentrant),
``attn_implementation="ulysses_flash"``; one sample of S tokens per SP group. Modes:

* ``sharded``: ``configure_memory(model, MemoryOptions())`` (the chunked loss, which the Trainer
  uses under SP for a plain causal-LM loss), the batch cut by ``shard_batch`` (S/P tokens and
  ``shift_labels`` per rank), ``model(**shard).loss``: no logits are built beyond one loss chunk
  (about 1 GiB of fp32 logits);
* ``transparent_smoothed``: ``make_transparent(model, sp)``, every rank gets the whole batch,
  ``model(input_ids=...)`` returns the full ``[1, S, vocab]`` bf16 logits and the script computes a
  label-smoothed cross-entropy (0.1) from ``outputs.logits.float()`` (a loss the package does
  not know);
* ``transparent_model_loss``: the same with ``labels=``: the model's own loss from the full
  logits (transformers' ``ForCausalLMLoss`` upcasts them to fp32 too).

At P = 1 ``make_transparent`` is a no-op (the model's own forward) and ``sharded`` is the chunked
loss without SP: the difference is then the cost of the full logits alone.

A step is forward + backward (no optimizer: its state is the same in every mode). Each mode
builds its model once, runs one warm-up step at the first length, then for every length resets the
peak counter with the gradients freed and records ``torch.cuda.max_memory_allocated`` per rank
(``peak_gib``: max over ranks), what was allocated before the step (``before_gib``: weights and
what persists) and the step time (informative only: with two ranks sharing one GPU over gloo it is
not a throughput figure). ``logits_bf16_gib`` = S x vocab x 2 bytes and ``logits_fp32_gib`` =
S x vocab x 4 bytes are the formula's terms; ``extra_over_sharded_gib`` is the mode's peak less the
sharded one at the same S, and ``extra_in_bf16_logits`` the same in units of the bf16 logits.

Writes ``--json`` (default ``benchmarks/results/transparent_memory_<card>.json``); a second
invocation with another world size adds its run to the same file (``runs``, one per world size).
``BENCH_DEVICE=cpu`` with ``--shape tiny`` is the dry run of the script's logic.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lib.common import DEV, log
from lib.report import git_commit
from lib.shapes import SHAPES, build_model

import ulysses_attn

MODES = ("sharded", "transparent_smoothed", "transparent_model_loss")
GIB = 2**30


def batch_for(seq: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, vocab, (1, seq), generator=g).to(DEV)
    return {"input_ids": ids, "labels": ids.clone()}


def loss_of(mode: str, model, batch: dict, sp) -> torch.Tensor:
    if mode == "sharded":
        out = model(**ulysses_attn.shard_batch(batch, sp))
        assert out.logits is None, "the chunked loss returns no logits"
        return out.loss
    if mode == "transparent_model_loss":
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"]).logits  # [1, S, vocab], bf16, the whole sequence
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           label_smoothing=0.1)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def step(mode: str, model, batch: dict, sp) -> dict:
    model.zero_grad(set_to_none=True)
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    before = torch.cuda.memory_allocated() if DEV == "cuda" else 0
    t0 = time.perf_counter()
    loss = loss_of(mode, model, batch, sp)
    loss.backward()
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else 0
    reserved = torch.cuda.max_memory_reserved() if DEV == "cuda" else 0
    value = loss.item()
    del loss
    model.zero_grad(set_to_none=True)
    return {"loss": value, "before_gib": before / GIB, "peak_gib": peak / GIB, "reserved_gib": reserved / GIB,
            "step_s": elapsed}


def prepare(mode: str, args, sp, seq: int):
    model = build_model(args.shape, max(seq, 8192), "ulysses_flash")
    if mode == "sharded":
        ulysses_attn.configure_memory(model, ulysses_attn.MemoryOptions())  # chunked loss
    else:
        ulysses_attn.make_transparent(model, sp)
    return model


def gather(row: dict) -> list[dict]:
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def card_name() -> str:
    if DEV != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((c for c in ("h100", "h200", "a100", "b200") if c in name), name.split()[-1])


def env_info(args, sp) -> dict:
    import transformers

    return {
        "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)",
        "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if DEV == "cuda" else 0,
        "gpu_count": torch.cuda.device_count() if DEV == "cuda" else 0,
        "world": dist.get_world_size(), "sp": sp.size, "backend": dist.get_backend(),
        "ranks_per_gpu": dist.get_world_size() // max(1, torch.cuda.device_count()) if DEV == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "git_commit": git_commit(), "working_tree_diff_sha1": os.environ.get("BENCH_DIFF_SHA1"),
        "shape": args.shape, "vocab": SHAPES[args.shape]["vocab_size"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "command": " ".join(sys.argv),
    }


def write(path: str, info: dict, results: list[dict]) -> None:
    data = {"runs": []}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["runs"] = [r for r in data.get("runs", []) if r["info"]["world"] != info["world"]]
    data["runs"].append({"info": info, "results": results})
    data["runs"].sort(key=lambda r: -r["info"]["world"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def table(results: list[dict], P: int) -> str:
    lines = [f"P = {P}: peak torch.cuda.max_memory_allocated per rank (max over ranks), GiB",
             "| S | mode | peak GiB | before GiB | extra over sharded GiB | in bf16 logits | "
             "bf16 logits GiB | fp32 logits GiB | step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['seq']} | {r['mode']} | {r['error']} | | | | | | |")
            continue
        extra = r.get("extra_over_sharded_gib")
        extra_s = "" if extra is None else f"{extra:.2f}"
        ratio_s = "" if extra is None else f"{r['extra_in_bf16_logits']:.2f}"
        lines.append(f"| {r['seq']} | {r['mode']} | {r['peak_gib']:.2f} | {r['before_gib']:.2f} | {extra_s} | "
                     f"{ratio_s} | "
                     f"{r['logits_bf16_gib']:.2f} | {r['logits_fp32_gib']:.2f} | {r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seq", default="4096,8192", help="comma-separated sequence lengths, ascending")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = os.environ.get("BENCH_BACKEND", "nccl" if DEV == "cuda" else "gloo")
    if DEV == "cuda":
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600),
                            device_id=torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None)
    sp = ulysses_attn.enable(sp_size=dist.get_world_size(), select_backend=False)
    info = env_info(args, sp)
    path = args.json or f"benchmarks/results/transparent_memory_{card_name()}.json"
    log(json.dumps(info))
    seqs = [int(s) for s in args.seq.split(",")]
    vocab = SHAPES[args.shape]["vocab_size"]
    results: list[dict] = []
    sharded_peak: dict[int, float] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}")
        model = prepare(mode, args, sp, max(seqs))
        step(mode, model, batch_for(seqs[0], vocab), sp)  # warm-up: kernels, workspaces, graphs
        for seq in seqs:
            row = {"mode": mode, "seq": seq, "P": sp.size,
                   "logits_bf16_gib": seq * vocab * 2 / GIB, "logits_fp32_gib": seq * vocab * 4 / GIB}
            try:
                per_rank = gather(step(mode, model, batch_for(seq, vocab), sp))
            except torch.OutOfMemoryError as e:
                row["error"] = f"OOM: {str(e).splitlines()[0][:160]}"
                results.append(row)
                log(f"{mode} S={seq}: {row['error']}")
                if dist.get_rank() == 0:
                    write(path, info, results)
                if dist.get_world_size() == 1:  # the longer lengths would not fit either: next mode
                    model.zero_grad(set_to_none=True)
                    break
                sys.stdout.flush()
                os._exit(3)  # the other ranks wait in a collective: stop (torchrun ends them)
            row.update({k: max(r[k] for r in per_rank) for k in ("peak_gib", "before_gib", "reserved_gib", "step_s")})
            row["peak_gib_per_rank"] = [r["peak_gib"] for r in per_rank]
            row["loss"] = per_rank[0]["loss"]
            if mode == "sharded":
                sharded_peak[seq] = row["peak_gib"]
            elif seq in sharded_peak:
                row["extra_over_sharded_gib"] = row["peak_gib"] - sharded_peak[seq]
                row["extra_in_bf16_logits"] = row["extra_over_sharded_gib"] / row["logits_bf16_gib"]
            results.append(row)
            log(json.dumps(row))
            if dist.get_rank() == 0:
                write(path, info, results)
        del model
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    log(table(results, sp.size))
    log(f"wrote {path}")
    ulysses_attn.disable()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
