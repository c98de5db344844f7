"""LLaMA-Factory 0.9.5's recipes, unchanged, under ``-m ulysses_attn.launch`` (docs/llamafactory.md).

LoRA DPO and LoRA SFT with DeepSpeed ZeRO-3 whose JSON carries ``sequence_parallel_size: 2``, on
tiny Llama-3 and Qwen2.5 models built from configs (examples/llamafactory/make_tiny_model.py) with
the bundled data (examples/data/dataset_info.json), run as LLaMA-Factory runs them
(``torchrun -m llamafactory.launcher recipe.yaml key=value...``) at SP = 2 and compared with the
same recipe without SP in one process: every logged loss, grad norm, reward, log-prob and accuracy,
``total_flos``; the decoder layers saw ceil(S/2) tokens; resuming from a checkpoint continues with
the uninterrupted run's numbers. DPO scores its log-probs from the sharded hidden states
(integrations/llamafactory.py): the LM head never sees more than a chunk of the sequence.

LLaMA-Factory pins transformers <= 5.6 and trl <= 0.24, so it runs in a virtual environment of its
own with transformers 5.2.0 (tests/llamafactory_venv.sh, built on first use at ``.venv-lf``, or
``ULYSSES_LF_PYTHON``): these tests are also the package's tests on the oldest transformers it
supports.
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "examples", "llamafactory")
DPO = os.path.join(RECIPES, "dpo_lora_z3.yaml")
SFT = os.path.join(RECIPES, "sft_lora_z3.yaml")
NO_SP_CONFIG = "deepspeed=examples/llamafactory/ds_z3.json"  # the same ZeRO-3 JSON without sequence_parallel_size
# what LLaMA-Factory logs from the real tokens; its logits/chosen and logits/rejected are means over
# every position, padding included, whose values depend on the attention kernel (docs/llamafactory.md)
DPO_KEYS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
SFT_KEYS = ("loss", "grad_norm")


def _lf_python() -> str:
    python = os.environ.get("ULYSSES_LF_PYTHON") or os.path.join(ROOT, ".venv-lf", "bin", "python")
    if not os.path.exists(python):
        subprocess.run(
            ["bash", os.path.join(ROOT, "tests", "llamafactory_venv.sh"), os.path.dirname(os.path.dirname(python))],
            check=True,
            timeout=1800,
        )
    return python


@pytest.fixture(scope="module")
def lf(tmp_path_factory):
    """The LLaMA-Factory interpreter and the tiny models it trains."""
    python = _lf_python()
    models = {}
    for arch in ("llama3", "qwen2.5"):
        models[arch] = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
        script = os.path.join(RECIPES, "make_tiny_model.py")
        subprocess.run([python, script, "--arch", arch, "--out", models[arch]], check=True, capture_output=True)
    return python, models, tmp_path_factory.mktemp("datasets-cache")


def run_lf(lf, recipe, out_dir, *overrides, sp=None, nproc=1) -> tuple[list[dict], dict[int, list[int]], str]:
    """One LLaMA-Factory training run; returns its log history, per rank the sequence length the
    first decoder layer saw in each forward, and its stderr."""
    python, _, cache = lf
    record = os.path.join(str(out_dir), "lengths")
    env = {
        **os.environ,
        "PYTHONPATH": os.path.join(ROOT, "tests", "llamafactory_path"),  # torchaudio stand-in, length recorder
        "ULYSSES_TEST_RECORD": record,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "HF_DATASETS_CACHE": str(cache),
        "TORCH_EXTENSIONS_DIR": os.path.join(os.path.dirname(os.path.dirname(python)), "torch_extensions"),
    }
    launch = ["-m", "ulysses_attn.launch", "--sp-size", str(sp)] if sp else []
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launch]
    cmd += ["-m", "llamafactory.launcher", recipe, f"output_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(os.path.join(str(out_dir), "trainer_state.json")) as f:
        logs = json.load(f)["log_history"]
    lengths = {}
    for rank in range(nproc):
        with open(os.path.join(record, f"rank{rank}.json")) as f:
            lengths[rank] = json.load(f)
    return logs, lengths, proc.stderr


# fp32 round-off: a reward is beta x (policy - reference) of two log-prob sums of ~ -500 (tiny
# models, ~300 tokens) summed in another order, so it agrees to ~1e-7 x 500 x beta absolutely; a
# dropped or duplicated token at a shard boundary moves it by ~0.3. Loss and grad norm follow.
TOLERANCES = {"rewards": (0.0, 5e-5), "logps": (1e-6, 0.0), "loss": (1e-4, 0.0), "grad_norm": (1e-4, 0.0)}
EVAL = ("val_size=0.25", "eval_strategy=steps", "eval_steps=2", "per_device_eval_batch_size=1")


def assert_same_logs(got: list[dict], want: list[dict], keys, steps=None, kind="loss") -> None:
    want_steps = [w for w in want if kind in w and (steps is None or w["step"] in steps)]
    got_by_step = {g["step"]: g for g in got if kind in g}
    assert want_steps and all(w["step"] in got_by_step for w in want_steps), (want_steps, list(got_by_step))
    for w in want_steps:
        g = got_by_step[w["step"]]
        for key in keys:
            rel, abs_ = TOLERANCES[key.split("/")[0].removeprefix("eval_")]
            assert math.isclose(g[key], w[key], rel_tol=rel, abs_tol=abs_), (w["step"], key, g[key], w[key])


def assert_sharded(sp_lengths: dict[int, list[int]], ref_lengths: dict[int, list[int]], sp: int) -> None:
    """Every forward of the SP run gave each rank's first decoder layer ceil(S/P) of the S tokens
    the run without SP saw (training, reference and evaluation forwards alike)."""
    ref = ref_lengths[0]
    assert ref and max(ref) > 16
    for rank, lengths in sp_lengths.items():
        assert lengths == [math.ceil(s / sp) for s in ref], (rank, lengths[:8], ref[:8])


def test_dpo_lora_zero3_sp2_equals_no_sp_and_resumes(lf, tmp_path):
    model = f"model_name_or_path={lf[1]['llama3']}"
    ref_logs, ref_lengths, _ = run_lf(lf, DPO, tmp_path / "ref", model, NO_SP_CONFIG, *EVAL)
    sp_logs, sp_lengths, log = run_lf(lf, DPO, tmp_path / "sp", model, *EVAL, sp=2, nproc=2)
    assert "loss path transparent" in log and "its DPO log-probs from the sharded hidden states" in log
    assert_same_logs(sp_logs, ref_logs, DPO_KEYS)
    assert_same_logs(sp_logs, ref_logs, [f"eval_{k}" for k in DPO_KEYS if k != "grad_norm"], kind="eval_loss")
    assert len([e for e in sp_logs if "eval_loss" in e]) == 2
    assert [e["step"] for e in sp_logs if "loss" in e] == [1, 2, 3, 4]
    total = [e for e in ref_logs if "total_flos" in e][0]["total_flos"]
    assert [e for e in sp_logs if "total_flos" in e][0]["total_flos"] == pytest.approx(total, rel=1e-6)
    assert_sharded(sp_lengths, ref_lengths, 2)

    checkpoint = f"resume_from_checkpoint={tmp_path / 'sp' / 'checkpoint-2'}"
    resumed_logs, _, _ = run_lf(lf, DPO, tmp_path / "resumed", model, checkpoint, *EVAL, sp=2, nproc=2)
    assert_same_logs(resumed_logs, sp_logs, DPO_KEYS, steps={3, 4})
    assert_same_logs(resumed_logs, ref_logs, DPO_KEYS, steps={3, 4})


def test_sft_lora_zero3_sp2_equals_no_sp_qwen(lf, tmp_path):
    model, template = f"model_name_or_path={lf[1]['qwen2.5']}", "template=qwen"
    ref_logs, ref_lengths, _ = run_lf(lf, SFT, tmp_path / "ref", model, template, NO_SP_CONFIG)
    sp_logs, sp_lengths, _ = run_lf(lf, SFT, tmp_path / "sp", model, template, sp=2, nproc=2)
    assert_same_logs(sp_logs, ref_logs, SFT_KEYS)
    assert len([e for e in sp_logs if "loss" in e]) == 4
    assert_sharded(sp_lengths, ref_lengths, 2)


# the package's own model-level tests, run again on LLaMA-Factory's transformers 5.2.0: the oldest
# transformers the package supports (CI runs the whole suite on the newest)
OLDEST_TRANSFORMERS_TESTS = (
    "tests/test_attention.py",
    "tests/test_model_parity.py::test_forward_backward_parity[llama-2]",
    "tests/test_transparent.py::test_any_loss_from_logits_exact_sp2[qwen3_moe]",
    "tests/test_transparent.py::test_generation_runs_unsharded_and_equals_plain_and_unknown_outputs_are_refused",
)


def test_core_tests_pass_on_the_oldest_supported_transformers(lf):
    python = lf[0]
    version = subprocess.run(
        [python, "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    assert version == "5.2.0"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ""}
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OLDEST_TRANSFORMERS_TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout, proc.stdout[
        -2000:
    ]
