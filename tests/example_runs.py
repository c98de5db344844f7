"""Runs of the example training script (examples/sft_trainer.py) for the tests, as subprocesses.

The tests never import from examples/: the script is run exactly as a user runs it (one process,
``torchrun``, ``accelerate launch`` or ``accelerate launch --use_deepspeed``, with or without
``-m ulysses_attn.launch``), the same way examples/demo.py runs it. The tiny model and tokenizer
the script builds are mirrored here (:func:`char_tokenizer`, :func:`tiny_model`) for tests that
build them in-process (TRL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPT = os.path.join(EXAMPLES, "sft_trainer.py")


def run_example(
    out_dir,
    nproc=1,
    sp=None,
    launcher="torchrun",
    extra=(),
    deepspeed_config=None,
    timeout=900,
    launch_flags=(),
    env=None,
    attn="ulysses_flash",
    accelerate_config=None,
):
    """Run examples/sft_trainer.py; return (result.json contents, final weights). Raises with the
    tail of the logs on failure.

    ``sp``: None (no SP), an int (``--sp-size``) or ``"config"`` (size from the DeepSpeed config).
    ``launcher``: ``"torchrun"`` or ``"accelerate"`` (multi-process runs without DeepSpeed).
    ``deepspeed_config``: a DeepSpeed JSON, launched through ``accelerate launch --use_deepspeed``.
    ``launch_flags``: more ``ulysses_attn.launch`` options (e.g. ``--long-sequence``); ``env``: extra
    environment variables. ``attn``: the script's ``--attn`` under SP (``None``: the script's default,
    sdpa, which the launcher replaces with ulysses_flash). ``accelerate_config``: an accelerate config
    file, launched through ``accelerate launch --config_file``. The run's stderr is kept in
    ``out_dir/stderr.txt`` (the start line of ulysses_attn is printed there).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    script = [SCRIPT, "--output_dir", str(out_dir), *extra]
    if sp is not None:
        size = [] if sp == "config" else ["--sp-size", str(sp)]
        script = ["-m", "ulysses_attn.launch", *size, *launch_flags, *script, *(["--attn", attn] if attn else [])]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    machine = ["--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    if accelerate_config is not None:
        cmd = [*accelerate, f"--config_file={accelerate_config}", f"--num_processes={nproc}", *script]
    elif deepspeed_config is not None:
        cmd = [
            *accelerate,
            "--use_deepspeed",
            f"--deepspeed_config_file={deepspeed_config}",
            f"--num_processes={nproc}",
            *machine,
            *script,
        ]
    elif nproc == 1 and sp is None:
        cmd = [sys.executable, *script]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    elif launcher == "accelerate":  # --multi_gpu selects its torch.distributed launcher (CPU included)
        cmd = [*accelerate, "--multi_gpu", f"--num_processes={nproc}", *machine, *script]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stderr.txt"), "w") as f:
        f.write(proc.stderr)
    if proc.returncode != 0 and not _finished_then_aborted_at_exit(proc, out_dir):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with open(os.path.join(out_dir, "result.json")) as f:
        result = json.load(f)
    return result, torch.load(os.path.join(out_dir, "weights.pt"))


def _finished_then_aborted_at_exit(proc, out_dir) -> bool:
    """A plain multi-process run (no launcher) whose script finished and wrote its results, after
    which gloo's threads aborted the interpreter's teardown ("terminate called without an active
    exception", a known gloo exit race that ulysses_attn.launch sidesteps): the run itself is done."""
    aborted = "terminate called without an active exception" in proc.stderr
    return aborted and os.path.isfile(os.path.join(out_dir, "result.json")) and os.path.isfile(
        os.path.join(out_dir, "weights.pt")
    )


def compare(sp_run, ref_run) -> dict:
    """Largest relative differences between two runs' logged values and final weights."""
    (sp_res, sp_w), (ref_res, ref_w) = sp_run, ref_run
    logged: dict[str, float] = {}
    for a, b in zip(sp_res["log_history"], ref_res["log_history"]):
        for key in ("loss", "grad_norm", "eval_loss", "train_loss"):
            if key in b:
                logged[key] = max(logged.get(key, 0.0), abs(a[key] - b[key]) / abs(b[key]))
    weights = max(((sp_w[k] - v).norm() / v.norm()).item() for k, v in ref_w.items())
    return {
        "logged": logged,
        "weights": weights,
        "steps": len(ref_res["log_history"]),
        "same_length": len(sp_res["log_history"]) == len(ref_res["log_history"]),
    }


# ------------------------------------------------------------------------------------------------
# the example's tiny model and tokenizer (examples/sft_trainer.py: char_tokenizer, tiny_model)
# ------------------------------------------------------------------------------------------------


def char_tokenizer(texts: list[str]):
    """A character-level tokenizer over ``texts`` (pad 0, unk 1), as the example script builds it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)))
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_model(arch: str, vocab_size: int, attn: str, seed: int):
    """The example script's tiny Llama / Qwen2 (2 layers, GQA 4/2 heads), built from a config."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        use_cache=False,
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
