"""DeepSpeed ZeRO-2/3 + Ulysses through `accelerate launch --use_deepspeed` (CPU, gloo, real
DeepSpeed with DS_ACCELERATOR=cpu): the unchanged example script ends with the same logged
losses, grad norms (as logged, i.e. as used for clipping), eval losses and weights as the run
without SP; the SP size comes from the config's `sequence_parallel_size`; resume is exact."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("deepspeed")

from example_runs import EXAMPLES, compare, run_example  # noqa: E402

Z2 = os.path.join(EXAMPLES, "ds_z2_ulysses.json")
Z3 = os.path.join(EXAMPLES, "ds_z3_ulysses.json")
# fp32 on CPU. Losses and grad norms agree to float32 round-off (~1e-7); weights after AdamW
# steps to 5e-5 (Adam amplifies round-off for parameters with near-zero gradients).
RTOL, RTOL_WEIGHTS = 1e-5, 5e-5


def ds_config(tmp_path, base, **changes):
    config = json.load(open(base))
    zero = changes.pop("zero_optimization", {})
    config.update(changes)
    config["zero_optimization"].update(zero)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def assert_same(sp_run, ref_run, sp_size):
    diff = compare(sp_run, ref_run)
    assert diff["same_length"] and {"loss", "grad_norm", "eval_loss"} <= set(diff["logged"])
    assert max(diff["logged"].values()) < RTOL, diff
    assert diff["weights"] < RTOL_WEIGHTS, diff
    assert sp_run[0]["longest_sequence_seen"] * sp_size <= ref_run[0]["longest_sequence_seen"] + sp_size


def test_zero2_sp_size_from_config_equals_plain(tmp_path, baselines):
    sp_run = run_example(tmp_path / "sp", nproc=2, sp="config", deepspeed_config=Z2, extra=["--eval"])
    assert_same(sp_run, baselines("plain", extra=["--eval"]), 2)


def test_zero2_all_reduce_instead_of_reduce_scatter_equals_plain(tmp_path, baselines):
    # reduce_scatter off: ZeRO-2 averages the gradients by all-reduce, a separate path with its own
    # scaling (the mission notes saw ALST's gradient scale flip with this option)
    config = ds_config(tmp_path, Z2, zero_optimization={"reduce_scatter": False})
    sp_run = run_example(tmp_path / "sp", nproc=2, sp="config", deepspeed_config=config, extra=["--eval"])
    assert_same(sp_run, baselines("plain", extra=["--eval"]), 2)


def test_zero3_sp2_times_dp2_equals_ddp2(tmp_path, baselines):
    sp_run = run_example(tmp_path / "sp", nproc=4, sp="config", deepspeed_config=Z3, extra=["--eval"])
    assert sp_run[0]["world_size"] == 4
    assert_same(sp_run, baselines("ddp2", nproc=2, extra=["--eval"]), 2)


def test_zero3_lora_sp2_equals_plain(tmp_path, baselines):
    # a frozen, ZeRO-3-partitioned LM head: the chunked loss uses its gathered weight once per loss
    # (loss.py, _with_head_weights) instead of recomputing the logits in the backward
    lora = ["--eval", "--lora", "--max_grad_norm", "0.5"]  # the "lora" baseline of test_fsdp.py too
    sp_run = run_example(tmp_path / "sp", nproc=2, sp=2, deepspeed_config=Z3, extra=lora)
    assert_same(sp_run, baselines("lora", extra=lora), 2)


@pytest.mark.skipif(
    os.environ.get("ULYSSES_SLOW_TESTS") != "1",
    reason="JIT-builds DeepSpeed's cpu_adam op (minutes on 2 cores); run with ULYSSES_SLOW_TESTS=1",
)
def test_zero2_cpu_optimizer_offload(tmp_path, baselines):
    config = ds_config(tmp_path, Z2, zero_optimization={"offload_optimizer": {"device": "cpu"}})
    sp_run = run_example(tmp_path / "sp", nproc=2, sp=2, deepspeed_config=config, extra=["--eval"])
    assert_same(sp_run, baselines("plain", extra=["--eval"]), 2)


def test_deepspeed_configs_loaded_after_enable_drop_the_sp_key():
    """A DeepSpeed config loaded before any Trainer exists (TrainingArguments(deepspeed=...) ahead of
    from_pretrained, as LLaMA-Factory does) has sequence_parallel_size read, checked and removed as it
    loads; disable() restores both the loader and the key."""
    import ulysses_attn
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    original = HfDeepSpeedConfig.__init__
    config = json.load(open(Z3))
    assert config["sequence_parallel_size"] == 2
    ulysses_attn.enable(sp_size=1)
    with pytest.raises(ValueError, match="sequence_parallel_size=2 but sequence parallelism was initialised with size 1"):
        HfTrainerDeepSpeedConfig(config)
    loaded = HfTrainerDeepSpeedConfig({**config, "sequence_parallel_size": 1})
    assert "sequence_parallel_size" not in loaded.config and loaded.is_zero3()
    ulysses_attn.disable()
    assert HfDeepSpeedConfig.__init__ is original and loaded.config["sequence_parallel_size"] == 1
    assert HfTrainerDeepSpeedConfig(config).config["sequence_parallel_size"] == 2


def test_conflicting_sp_size_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="Conflicting sequence-parallel sizes"):
        run_example(tmp_path / "sp", nproc=2, sp=4, deepspeed_config=Z3)


def test_zero3_resume_equals_uninterrupted(tmp_path):
    extra = ["--save_steps", "2", "--max_steps", "4"]
    full = run_example(tmp_path / "full", nproc=2, sp="config", deepspeed_config=Z3, extra=extra)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run_example(resumed_dir, nproc=2, sp="config", deepspeed_config=Z3, extra=[*extra, "--resume"])
    after = lambda run: [(h["step"], h["loss"], h["grad_norm"]) for h in run[0]["log_history"] if "loss" in h and h["step"] > 2]
    assert len(after(full)) == 2
    for (s1, l1, g1), (s2, l2, g2) in zip(after(full), after(resumed), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=RTOL) and g1 == pytest.approx(g2, rel=RTOL)
    diff = compare(resumed, full)
    assert diff["weights"] < RTOL_WEIGHTS


LONG_SEQUENCE_ENV = {"ULYSSES_LOSS_CHUNK_TOKENS": "48", "ULYSSES_MLP_CHUNK_TOKENS": "40",
                     "ULYSSES_OFFLOAD_MIN_BYTES": "4096"}


def test_zero3_long_sequence_sp2_times_dp2_equals_ddp2(tmp_path, baselines):
    # chunked loss, tiled MLP (chunk counts agreed over the world: ZeRO-3 gathers per module call)
    env = LONG_SEQUENCE_ENV
    sp_run = run_example(tmp_path / "sp", nproc=4, sp="config", deepspeed_config=Z3,
                         extra=["--eval", "--record_head_rows"], launch_flags=["--long-sequence"], env=env)
    assert_same(sp_run, baselines("ddp2", nproc=2, extra=["--eval"]), 2)
    assert sp_run[0]["activation_checkpointing"] and 0 < sp_run[0]["lm_head_rows_max"] <= 48
    assert sp_run[0]["mlp_rows_max"] <= 2 * 40
    assert sp_run[0]["zero3_leaf_modules"] == 2  # each tiled MLP is gathered whole, once per call


def test_zero3_selective_checkpointing_sp2_equals_plain(tmp_path, baselines):
    """ZeRO-3 gathers parameters inside the checkpointed layers, differently in the recompute than in
    the forward (which PyTorch's own selective checkpointing rejects); keeping only the attention
    outputs must still give the plain run's losses, grad norms and weights, and the recomputes
    must really skip the attention kernels."""
    sp_run = run_example(tmp_path / "sp", nproc=2, sp="config", deepspeed_config=Z3, extra=["--eval"],
                         launch_flags=["--long-sequence", "--selective-checkpointing"], env=LONG_SEQUENCE_ENV)
    assert_same(sp_run, baselines("plain", extra=["--eval"]), 2)
    result = sp_run[0]
    assert result["activation_checkpointing"] and result["selective_checkpointing_layers"] == 2
    steps = max(h["step"] for h in result["log_history"] if "loss" in h)
    # every checkpointed layer's backward reuses its one attention output, in every training step
    assert result["attention_calls_not_recomputed"] >= steps * result["selective_checkpointing_layers"]
