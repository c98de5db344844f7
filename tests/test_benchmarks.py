"""The benchmark script's CPU dry run (gloo, tiny model): every configuration runs, and within one
process later configurations start from the same model and loss as the first (no ZeRO-3 leftovers);
ours and ALST compute the same gradients; selective checkpointing's recomputes skip the attention
kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_zero3_dry_run_configurations_do_not_leak(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "BENCH_DEVICE": "cpu", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "benchmarks/bench_train.py", "--model", "tiny", "--zero", "3", "--long-sequence", "--seq", "128",
           "--modes", "ulysses,ulysses+selective,alst", "--steps", "1", "--warmup", "1", "--no-profile", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())["results"]
    modes = ("ulysses", "ulysses+selective", "alst")
    assert [(r["mode"], r["seq"]) for r in results] == [(m, 128) for m in modes]
    assert not [r for r in results if "error" in r]
    first = {(r["mode"], r["seq"]): r["loss_first_last"][0] for r in results}
    # the same initial weights and data for all: no model built under zero.Init
    assert first[("ulysses", 128)] == pytest.approx(first[("alst", 128)], rel=1e-5)
    assert first[("ulysses+selective", 128)] == pytest.approx(first[("alst", 128)], rel=1e-5)
    # the same gradients in every mode, lm_head included: ALST's TiledFusedLogitsLoss gets the loss
    # scaled inside (dividing after it left lm_head's gradient count / P = 64-128x too large)
    for r in results:
        ref = next(x for x in results if x["mode"] == "ulysses" and x["seq"] == r["seq"])["first_grad_norms"]
        assert set(r["first_grad_norms"]) == {"lm_head", "embed_tokens", "layer0.q_proj", "layer0.down_proj",
                                              "last.up_proj"}
        for name, norm in r["first_grad_norms"].items():
            assert norm == pytest.approx(ref[name], rel=2e-3), (r["mode"], r["seq"], name)
    # selective checkpointing under ZeRO-3: each of the 2 layers' recompute skipped its attention kernel
    assert [r["attention_replayed_per_step"] for r in results] == [0, 2, 0]
    assert all(r["P"] == 2 and r["zero"] == 3 for r in results)


def test_packed_documents_dry_run(tmp_path):
    # bench_train --documents: ours with the automatic kernel (sdpa, one call per document on CPU)
    # trains exactly like the reference kernel; bench_packed times every kernel on packed layouts
    out = tmp_path / "docs.json"
    env = {**os.environ, "BENCH_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}

    def train(*options):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "benchmarks/bench_train.py", "--model", "tiny", "--seq", "256", "--steps", "1", "--warmup", "1",
               "--no-profile", "--json", str(out), *options]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads(out.read_text())["results"]

    auto, ref = train("--documents", "4", "--modes", "ulysses,ulysses@reference")
    assert auto["ulysses_kernel"] == ["sdpa"] and ref["ulysses_kernel"] == ["reference"]
    assert auto["documents"] == 4 and auto["P"] == 2
    assert auto["loss_first_last"] == pytest.approx(ref["loss_first_last"], rel=1e-3)
    for name, norm in auto["first_grad_norms"].items():
        assert norm == pytest.approx(ref["first_grad_norms"][name], rel=2e-2), name
    # the same batch without documents is a different computation: the test would see a lost packing
    (dense,) = train("--modes", "ulysses")
    assert dense["documents"] == 1 and dense["first_grad_norms"]["layer0.q_proj"] != pytest.approx(
        auto["first_grad_norms"]["layer0.q_proj"], rel=2e-2)

    out = tmp_path / "packed.json"
    cmd = [sys.executable, "benchmarks/bench_packed.py", "--tokens", "256", "--documents", "1,4", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "16", "--kernels", "sdpa,reference", "--iters", "1", "--warmup", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["documents"], r["kernel"]) for r in rows] == [(1, "sdpa"), (1, "reference"), (4, "sdpa"), (4, "reference")]
    assert all(r["auto"] == "sdpa" and r["ms_fresh"] > 0 and r["ms_same"] > 0 for r in rows)
