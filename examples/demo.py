"""Demo: the same HF Trainer run with and without Ulysses sequence parallelism.

    python examples/demo.py            # P = 2 (CPU: gloo; GPU: nccl when 2 GPUs are visible)
    python examples/demo.py --sp 4

Trains the bundled tiny Llama (built from a config) on the bundled corpus with
examples/sft_trainer.py -- once in one process with plain `sdpa` attention, once on P processes
through `torchrun -m ulysses_attn.launch --sp-size P` with `ulysses_flash` -- and compares the
logged losses, gradient norms, eval losses and final weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "sft_trainer.py")


def run_example(out_dir, nproc=1, sp=None, launcher="torchrun", extra=(), deepspeed_config=None, timeout=900,
                launch_flags=(), env=None):
    """Run examples/sft_trainer.py; return (result.json contents, final weights). Raises with the
    tail of the logs on failure.

    ``sp``: None (no SP), an int (``--sp-size``) or ``"config"`` (size from the DeepSpeed config).
    ``deepspeed_config``: a DeepSpeed JSON, launched through ``accelerate launch --use_deepspeed``.
    ``launch_flags``: more ``ulysses_attn.launch`` options (e.g. ``--long-sequence``); ``env``: extra
    environment variables.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    script = [SCRIPT, "--output_dir", str(out_dir), *extra]
    if sp is not None:
        size = [] if sp == "config" else ["--sp-size", str(sp)]
        script = ["-m", "ulysses_attn.launch", *size, *launch_flags, *script, "--attn", "ulysses_flash"]
    if deepspeed_config is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
               f"--deepspeed_config_file={deepspeed_config}", f"--num_processes={nproc}", "--num_machines=1",
               "--mixed_precision=no", "--dynamo_backend=no", *script]
    elif nproc == 1 and sp is None:
        cmd = [sys.executable, *script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    else:  # accelerate; --multi_gpu selects its torch.distributed launcher (CPU included)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", *script]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(os.path.join(out_dir, "result.json")) as f:
        result = json.load(f)
    return result, torch.load(os.path.join(out_dir, "weights.pt"))


def compare(sp_run, ref_run) -> dict:
    """Largest relative differences between two runs' logged values and final weights."""
    (sp_res, sp_w), (ref_res, ref_w) = sp_run, ref_run
    logged = {}
    for a, b in zip(sp_res["log_history"], ref_res["log_history"]):
        for key in ("loss", "grad_norm", "eval_loss", "train_loss"):
            if key in b:
                logged[key] = max(logged.get(key, 0.0), abs(a[key] - b[key]) / abs(b[key]))
    weights = max(((sp_w[k] - v).norm() / v.norm()).item() for k, v in ref_w.items())
    return {"logged": logged, "weights": weights, "steps": len(ref_res["log_history"]),
            "same_length": len(sp_res["log_history"]) == len(ref_res["log_history"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, default=2, help="sequence-parallel size (= number of processes)")
    p.add_argument("--max_length", type=int, default=512)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.sp else "cpu"
    tol = 1e-5 if device == "cpu" else 1e-3
    # fewer GPUs than processes: both runs on the CPU (the training script would otherwise take the GPU)
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
    extra = ["--max_length", str(args.max_length), "--eval"]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[1/2] training without sequence parallelism (1 process, sdpa) on {device} ...", flush=True)
        ref = run_example(os.path.join(tmp, "plain"), extra=extra, env=env)
        print(f"[2/2] training with Ulysses SP = {args.sp} ({args.sp} processes, ulysses_flash) ...", flush=True)
        sp = run_example(os.path.join(tmp, "sp"), nproc=args.sp, sp=args.sp, extra=extra, env=env)
    diff = compare(sp, ref)
    print("\n step | loss (no SP) | loss (SP) | grad_norm (no SP) | grad_norm (SP)")
    for a, b in zip(ref[0]["log_history"], sp[0]["log_history"]):
        if "loss" in a:
            print(f" {a['step']:>4} | {a['loss']:.7f}    | {b['loss']:.7f} | {a['grad_norm']:.7f}         | {b['grad_norm']:.7f}")
    for a, b in zip(ref[0]["log_history"], sp[0]["log_history"]):
        if "eval_loss" in a:
            print(f" eval at step {a['step']}: {a['eval_loss']:.7f} (no SP) vs {b['eval_loss']:.7f} (SP)")
    longest, longest_sp = ref[0]["longest_sequence_seen"], sp[0]["longest_sequence_seen"]
    print(f"\n longest sequence a decoder layer saw: {longest} tokens without SP, {longest_sp} with SP = {args.sp}")
    print(" max relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in diff["logged"].items())
          + f", final weights {diff['weights']:.1e}")
    same = diff["same_length"] and max(diff["logged"].values()) <= tol and diff["weights"] <= 5 * tol
    sharded = longest_sp <= math.ceil(longest / args.sp)
    print(f"\nSP result equals the non-SP result (tolerance {tol:g}): {same}; sequences were sharded: {sharded}")
    sys.exit(0 if same and sharded else 1)


if __name__ == "__main__":
    main()
