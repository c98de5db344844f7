"""PyTorch FSDP2 beside Ulysses SP through the HF Trainer (CPU, gloo, fp32): the unchanged example
script, launched with ``-m ulysses_attn.launch --sp-size 2`` and FSDP2 from ``TrainingArguments``
(``fsdp=True, fsdp_config=examples/fsdp/fsdp2.json``) or from an accelerate config
(``examples/fsdp/accelerate_fsdp2.yaml``, ``fsdp_version: 2``), ends with the logged losses, grad
norms (clipped at 1.0: the norms are above it), eval losses and final weights of the run without SP
(one process; DDP on 2 processes for SP 2 x DP 2). Every SP run also shows that its decoder layers
saw S/P tokens and that the model really was FSDP2 (``FSDPModule`` units, DTensor parameters, each
rank holding 1/world of the parameter elements), not DDP.

accelerate drops FSDP on a machine without GPUs (``use_cpu`` -> ``MULTI_CPU``, plugin ignored):
``tests/fsdp_cpu/sitecustomize.py`` is a test-only shim that keeps it, loaded through
``PYTHONPATH`` by the runs here that ask for it (:data:`FSDP_ON_CPU`). Without it the start line
must say that FSDP is not in use (:func:`test_fsdp_dropped_by_accelerate_is_said_on_the_start_line`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from distributed import run_distributed
from example_runs import EXAMPLES, ROOT, compare, run_example, tiny_model

import ulysses_attn
from ulysses_attn.integrations.fsdp import refuse_conflicting_parallelism

FSDP2_JSON = os.path.join(EXAMPLES, "fsdp", "fsdp2.json")
ACCELERATE_FSDP2 = os.path.join(EXAMPLES, "fsdp", "accelerate_fsdp2.yaml")
SHIM_DIR = os.path.join(ROOT, "tests", "fsdp_cpu")
FSDP_ON_CPU = {
    "ULYSSES_TEST_FSDP_ON_CPU": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (SHIM_DIR, os.environ.get("PYTHONPATH")) if p),
}
FSDP_ARGS = ["--fsdp", "--fsdp_config", FSDP2_JSON]
# LoRA gradients are smaller (norms 0.43-0.57 here): clip them at 0.5 so that clipping acts
LORA_ARGS = ["--lora", "--max_grad_norm", "0.5"]
MAX_LENGTH = 256  # the example's default
# fp32 on CPU, as tests/test_trainer.py and tests/test_deepspeed.py: logged values to 1e-5 (observed
# ~1e-7), weights after 4 AdamW steps to 5e-5 (Adam amplifies round-off of near-zero gradients)
RTOL, RTOL_WEIGHTS = 1e-5, 5e-5
LONG_SEQUENCE_ENV = {"ULYSSES_LOSS_CHUNK_TOKENS": "48", "ULYSSES_MLP_CHUNK_TOKENS": "40",
                     "ULYSSES_OFFLOAD_MIN_BYTES": "4096"}


def start_line(out_dir) -> str:
    """ulysses_attn's start line of a run (printed once, on rank 0, to stderr)."""
    with open(os.path.join(out_dir, "stderr.txt")) as f:
        lines = [line for line in f if line.startswith("ulysses_attn: sequence parallelism on for")]
    assert len(lines) == 1, lines
    return lines[0]


def assert_same_training(sp_run, ref_run, sp_size=2, clip=1.0) -> dict:
    """Same logged losses, grad norms, eval losses and final weights; the decoder layers saw S/P tokens."""
    diff = compare(sp_run, ref_run)
    assert diff["same_length"] and diff["steps"] >= 4
    assert {"loss", "grad_norm", "eval_loss", "train_loss"} <= set(diff["logged"]), diff
    assert max(diff["logged"].values()) < RTOL, diff
    assert diff["weights"] < RTOL_WEIGHTS, diff
    grad_norms = [h["grad_norm"] for h in ref_run[0]["log_history"] if "grad_norm" in h]
    assert max(grad_norms) > clip  # gradient clipping acted in at least one step
    longest, longest_sp = ref_run[0]["longest_sequence_seen"], sp_run[0]["longest_sequence_seen"]
    assert longest > math.ceil(MAX_LENGTH / 2)
    assert longest_sp <= math.ceil(longest / sp_size)
    print(f"max relative differences: {diff['logged']}, weights {diff['weights']:.2e}")
    return diff


def assert_fsdp2_sharded(result: dict, world: int, shard_ranks: int | None = None) -> None:
    """The trained model was FSDP2 over the whole world (or ``shard_ranks`` of it, HSDP): every
    parameter a DTensor, rank 0 holding 1/shard_ranks of the parameter elements."""
    shard_ranks = shard_ranks or world
    facts = result["parallelism"]
    assert facts["distributed_type"] == "DistributedType.FSDP" and facts["fsdp_version"] == 2, facts
    assert facts["fsdp_modules"] >= 3, facts  # the root and each decoder layer (TRANSFORMER_BASED_WRAP)
    assert facts["dtensor_parameters"] == facts["parameters"] > 0 and not facts["not_dtensor"], facts
    assert abs(facts["local_parameter_fraction"] - 1 / shard_ranks) < 0.05 / shard_ranks, facts
    assert result["world_size"] == world


@pytest.fixture(scope="module")
def lora_baselines(baselines):
    """The runs without SP the LoRA cases compare with (cached for the session by conftest)."""
    return {
        "plain": baselines("lora", extra=["--eval", *LORA_ARGS]),
        "ddp2": baselines("lora_ddp2", nproc=2, extra=["--eval", *LORA_ARGS]),
    }


def test_fsdp2_sp2_equals_plain_and_resumes_from_a_sharded_checkpoint(tmp_path, baselines):
    # SHARDED_STATE_DICT: each rank saves its own shards (torch.distributed.checkpoint, *.distcp) at
    # steps 2 and 4; new processes resume from step 2 and end as the uninterrupted run
    config = tmp_path / "fsdp2_sharded.json"
    config.write_text(json.dumps({**json.load(open(FSDP2_JSON)), "state_dict_type": "SHARDED_STATE_DICT"}))
    extra = ["--eval", "--fsdp", "--fsdp_config", str(config), "--save_steps", "2"]
    full = run_example(tmp_path / "full", nproc=2, sp=2, extra=extra, env=FSDP_ON_CPU)
    assert_same_training(full, baselines("plain", extra=["--eval"]))
    assert_fsdp2_sharded(full[0], 2)
    assert "FSDP2 shards the parameters over all 2 ranks" in start_line(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(checkpoint / "pytorch_model_fsdp_0"))  # per rank
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = run_example(tmp_path / "resumed", nproc=2, sp=2, extra=[*extra, "--resume"], env=FSDP_ON_CPU)
    assert full[0]["steps_run"] == 4 and resumed[0]["steps_run"] == 2  # it did resume, at step 3
    after = lambda run: [(h["step"], h["loss"], h["grad_norm"]) for h in run[0]["log_history"] if "loss" in h and h["step"] > 2]  # noqa: E501, E731
    assert len(after(full)) == 2
    for (s1, l1, g1), (s2, l2, g2) in zip(after(full), after(resumed), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=RTOL) and g1 == pytest.approx(g2, rel=RTOL)
    assert compare(resumed, full)["weights"] < RTOL_WEIGHTS


def test_fsdp2_sp2_lora_equals_plain(tmp_path, lora_baselines):
    sp_run = run_example(tmp_path, nproc=2, sp=2, extra=["--eval", *LORA_ARGS, *FSDP_ARGS], env=FSDP_ON_CPU)
    assert_same_training(sp_run, lora_baselines["plain"], clip=0.5)
    assert_fsdp2_sharded(sp_run[0], 2)
    assert any("lora_A" in k for k in sp_run[1])


def test_fsdp2_sp2_times_dp2_equals_ddp2_and_saves_a_model_that_loads_without_the_package(tmp_path, baselines):
    ref = baselines("ddp2", nproc=2, extra=["--eval"])
    sp_run = run_example(tmp_path, nproc=4, sp=2, extra=["--eval", "--save_model", *FSDP_ARGS], env=FSDP_ON_CPU)
    assert ref[0]["world_size"] == 2
    assert_same_training(sp_run, ref)
    assert_fsdp2_sharded(sp_run[0], 4)
    assert "SP size 2 x DP size 2 = world 4" in start_line(tmp_path)
    # trainer.save_model under FSDP2 (FULL_STATE_DICT): the saved model loads in a process that never
    # imports ulysses_attn, with the trained weights and no trace of ulysses_flash in its config
    saved, loaded = tmp_path / "final", tmp_path / "loaded.pt"
    assert "ulysses" not in (saved / "config.json").read_text()
    load = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(saved)!r}); assert 'ulysses_attn' not in sys.modules; "
            f"torch.save(m.state_dict(), {str(loaded)!r})")
    subprocess.run([sys.executable, "-c", load], check=True, cwd=tmp_path, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = torch.load(loaded)
    assert set(state) == set(sp_run[1])
    assert all(torch.equal(state[k], v) for k, v in sp_run[1].items())


def test_hsdp_parallelism_config_sp2_times_dp2_equals_ddp2(tmp_path, baselines):
    # ParallelismConfig(dp_replicate_size=2, dp_shard_size=2): FSDP2 over a 2-D mesh, shards over
    # {0, 1} and {2, 3} (the SP groups), replicas over {0, 2} and {1, 3} (the DP groups): accepted
    # beside --sp-size, and the gradient is still the mean over all ranks
    extra = ["--eval", *FSDP_ARGS, "--parallelism_config", "dp_replicate_size=2,dp_shard_size=2"]
    sp_run = run_example(tmp_path, nproc=4, sp=2, extra=extra, env=FSDP_ON_CPU)
    assert_same_training(sp_run, baselines("ddp2", nproc=2, extra=["--eval"]))
    assert_fsdp2_sharded(sp_run[0], 4, shard_ranks=2)
    assert "FSDP2 shards the parameters over 2 ranks, 2 replicas (HSDP)" in start_line(tmp_path)


def test_accelerate_config_fsdp2_lora_sp2_times_dp2_equals_ddp2(tmp_path, lora_baselines):
    # `accelerate launch --config_file examples/fsdp/accelerate_fsdp2.yaml` (distributed_type: FSDP,
    # fsdp_version: 2): FSDP reaches the Trainer only through accelerate's environment variables
    sp_run = run_example(tmp_path, nproc=4, sp=2, extra=["--eval", *LORA_ARGS], env=FSDP_ON_CPU,
                         accelerate_config=ACCELERATE_FSDP2)
    assert_same_training(sp_run, lora_baselines["ddp2"], clip=0.5)
    assert_fsdp2_sharded(sp_run[0], 4)
    assert "FSDP2 shards the parameters over all 4 ranks" in start_line(tmp_path)


def test_fsdp_dropped_by_accelerate_is_said_on_the_start_line(tmp_path, baselines):
    # no shim: accelerate on CPU (use_cpu, MULTI_CPU) ignores the FSDP plugin and trains DDP; the
    # numbers are still right (DDP is exact too), but the start line must not let it pass unsaid
    sp_run = run_example(tmp_path, nproc=2, sp=2, extra=["--eval", *FSDP_ARGS])
    assert_same_training(sp_run, baselines("plain", extra=["--eval"]))
    facts = sp_run[0]["parallelism"]
    assert facts["distributed_type"] == "DistributedType.MULTI_CPU" and facts["fsdp_version"] is None, facts
    assert facts["local_parameter_fraction"] == 1.0 and facts["dtensor_parameters"] == 0, facts
    line = start_line(tmp_path)
    assert "FSDP was asked for (TrainingArguments.fsdp) but is NOT in use" in line
    assert "MULTI_CPU" in line


_SLOW = pytest.mark.skipif(
    os.environ.get("ULYSSES_SLOW_TESTS") != "1", reason="CI time: the selective variant runs with ULYSSES_SLOW_TESTS=1"
)


@pytest.mark.parametrize(
    "selective", [False, pytest.param(True, marks=_SLOW)], ids=["long_sequence", "long_sequence_selective"]
)
def test_fsdp2_long_sequence_tied_embeddings_sp2_equals_plain(tmp_path, baselines, selective):
    # --long-sequence under FSDP2: chunked loss through the tied LM head / embedding (a DTensor
    # parameter, gathered by FSDP), tiled MLP, activation checkpointing with CPU offload; with
    # --selective-checkpointing the recomputes keep the attention outputs
    ref = baselines("tied", extra=["--eval", "--tie_embeddings"])
    flags = ["--long-sequence", *(["--selective-checkpointing"] if selective else [])]
    sp_run = run_example(tmp_path, nproc=2, sp=2, extra=["--eval", "--tie_embeddings", "--record_head_rows",
                                                          *FSDP_ARGS],
                         launch_flags=flags, env={**FSDP_ON_CPU, **LONG_SEQUENCE_ENV})
    assert_same_training(sp_run, ref)
    result = sp_run[0]
    assert_fsdp2_sharded(result, 2)
    assert result["parallelism"]["embeddings_tied"] and ref[0]["parallelism"]["embeddings_tied"]
    assert result["activation_checkpointing"] and result["mlp_rows_max"] <= 2 * 40
    assert "tiled MLP, activation checkpointing, checkpoint offload" in start_line(tmp_path)
    if not selective:
        assert 0 < result["lm_head_rows_max"] <= 48  # the chunked loss called the head chunk by chunk
        return
    assert result["selective_checkpointing_layers"] == 2
    steps = max(h["step"] for h in result["log_history"] if "loss" in h)
    # every checkpointed layer's backward reuses its attention output, in every micro-batch
    assert result["attention_calls_not_recomputed"] >= steps * result["selective_checkpointing_layers"]


# ------------------------------------------------------------------------------------------------
# accelerate's ParallelismConfig splitting sequences or heads as well: refused before it starts
# ------------------------------------------------------------------------------------------------


CONFLICTS = [  # (ParallelismConfig sizes, environment, what the error must name)
    ({"sp_size": 2}, {}, "sp_size=2: accelerate's own sequence parallelism (DeepSpeed ALST"),
    ({"cp_size": 2}, {}, "cp_size=2: context parallelism"),
    ({"tp_size": 2}, {}, "tp_size=2: tensor parallelism"),
    # an accelerate config's parallelism_config reaches accelerate through the environment
    (None, {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_CP_SIZE": "2"}, "cp_size=2"),
]


def _trainers_with_parallelism_configs(rank, world):
    """Build a Trainer under SP 2 (``--long-sequence``) with each conflicting config, then one with
    FSDP's own activation checkpointing; return the error each raised."""
    from accelerate.parallelism_config import ParallelismConfig
    from fsdp_cpu.sitecustomize import keep_fsdp_on_cpu
    from transformers import Trainer, TrainingArguments

    ulysses_attn.enable(sp_size=2, long_sequence=True)
    errors = []
    for sizes, env, _ in CONFLICTS:
        os.environ.update(env)
        config = ParallelismConfig(**sizes) if sizes else None
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, parallelism_config=config, report_to=[])
        try:
            Trainer(model=tiny_model("llama", 16, "ulysses_flash", 0), args=args)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
        for name in env:
            del os.environ[name]
    keep_fsdp_on_cpu()
    fsdp_config = {**json.load(open(FSDP2_JSON)), "activation_checkpointing": True}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, fsdp=True, fsdp_config=fsdp_config,
                             report_to=[])
    try:
        Trainer(model=tiny_model("llama", 16, "ulysses_flash", 0), args=args)
        errors.append(None)
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_parallelism_config_that_splits_sequences_is_refused_on_every_rank():
    # and FSDP's own activation checkpointing beside the package's (--long-sequence): both would
    # recompute every layer
    rank0, rank1 = run_distributed(_trainers_with_parallelism_configs, 2)
    assert rank0 == rank1 and None not in rank0  # the same errors on every rank: nothing hangs
    for (_, _, named), error in zip(CONFLICTS, rank0[:-1], strict=True):
        assert named in error
        assert "sequence parallelism of size 2 (--sp-size" in error  # both settings named
        assert "remove sp_size / cp_size / tp_size from the parallelism_config" in error  # what to do
    assert "FSDP's activation checkpointing (fsdp_config activation_checkpointing" in rank0[-1]
    assert "ulysses_attn's (--long-sequence" in rank0[-1] and "Use one" in rank0[-1]


def test_parallelism_config_that_only_shards_data_is_accepted():
    from accelerate.parallelism_config import ParallelismConfig

    assert refuse_conflicting_parallelism(ParallelismConfig(dp_shard_size=2, dp_replicate_size=2), 2) is None
    assert refuse_conflicting_parallelism(ParallelismConfig(cp_size=2), 1) is None  # no ulysses SP: accelerate's
    with pytest.raises(ValueError, match="sp_size=4"):
        refuse_conflicting_parallelism(ParallelismConfig(sp_size=4), 2)


# ------------------------------------------------------------------------------------------------
# TRL's SFTTrainer and DPOTrainer (LoRA) under FSDP2 at SP 2, against one process without either
# ------------------------------------------------------------------------------------------------


TRL_ATOL = 1e-5


def _full(tensor):
    """The whole tensor of a DTensor (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _trl_worker(rank, world, trainer_name, fsdp):
    import datasets
    import trl
    from example_runs import char_tokenizer
    from peft import LoraConfig
    from test_trl import preference_data, text_data

    if fsdp:
        from fsdp_cpu.sitecustomize import keep_fsdp_on_cpu

        keep_fsdp_on_cpu()
    ulysses_attn.enable(sp_size=world)
    rows = preference_data() if trainer_name == "dpo" else text_data()
    tokenizer = char_tokenizer([v for r in rows for v in r.values()])
    tokenizer.eos_token = tokenizer.pad_token
    model = tiny_model("llama", len(tokenizer), "ulysses_flash" if world > 1 else "sdpa", seed=0)
    fsdp_args = {"fsdp": True, "fsdp_config": json.load(open(FSDP2_JSON))} if fsdp else {}
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=3, learning_rate=1e-2, max_grad_norm=0.05, logging_steps=1, report_to=[], use_cpu=True,
                  bf16=False, seed=0, save_strategy="no", dataloader_num_workers=0, **fsdp_args)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    dataset = datasets.Dataset.from_list(rows)
    if trainer_name == "dpo":  # the reference model: the policy with its adapter disabled
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common, beta=0.5), train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=lora)
    else:
        config = trl.SFTConfig(**common, completion_only_loss=True, max_length=None)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=lora)
    seen = []
    trainer.model.get_base_model().model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    trainer.train()
    facts = {"type": str(trainer.accelerator.distributed_type), "dtensors": 0, "parameters": 0}
    for _, p in trainer.model.named_parameters():
        facts["parameters"] += 1
        facts["dtensors"] += int(_full(p) is not p)
    weights = {n: _full(p).detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"logs": trainer.state.log_history, "weights": weights, "longest": max(seen), "facts": facts}


@pytest.mark.parametrize("trainer_name", ["sft", "dpo"])
def test_trl_lora_under_fsdp2_sp2_equals_plain(trainer_name):
    ref = run_distributed(_trl_worker, 1, trainer_name, False)[0]
    sp = run_distributed(_trl_worker, 2, trainer_name, True)[0]
    assert sp["facts"]["type"] == "DistributedType.FSDP" and sp["facts"]["dtensors"] == sp["facts"]["parameters"]
    assert len(ref["logs"]) == len(sp["logs"])
    worst: dict[str, float] = {}
    for a, b in zip(sp["logs"], ref["logs"]):
        for k, v in b.items():
            if isinstance(v, float) and k not in ("epoch", "learning_rate", "total_flos") and "runtime" not in k \
                    and "per_second" not in k:
                # DPO's rewards and margins are differences of log-prob sums: an absolute tolerance
                # too, as tests/test_trl.py (ATOL)
                assert a[k] == pytest.approx(v, rel=RTOL, abs=TRL_ATOL), (k, a[k], v)
                worst[k] = max(worst.get(k, 0.0), abs(a[k] - v) / abs(v) if v else abs(a[k]))
    assert {"loss", "grad_norm"} <= set(worst) and max(worst["loss"], worst["grad_norm"]) < RTOL, worst
    grad_norms = [h["grad_norm"] for h in ref["logs"] if "grad_norm" in h]
    assert max(grad_norms) > 0.05  # clipping acted
    weights = max(((sp["weights"][n] - w).norm() / w.norm()).item() for n, w in ref["weights"].items())
    assert weights < RTOL_WEIGHTS
    assert sp["longest"] <= -(-ref["longest"] // 2)  # the decoder layers saw S/P tokens
    print(f"{trainer_name}: max relative differences {worst}, weights {weights:.2e}")
