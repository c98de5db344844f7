"""Transparent mode (ulysses_attn/transparent.py): whole batches in, whole logits out, any loss exact.

Each rank of the SP group gets the whole batch; the decoder layers must see S/P tokens, and the
logits, the model's own loss (MoE router loss included), a loss of our own from the logits and
every gradient (summed over the group / P, what DDP's mean gives) must equal the stock model's in
one process. Generation (a cached forward) runs unsharded and gives the same tokens."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from zoo import GRAD_FLOOR, RTOL, build, build_reference, make_batch, rel_err, tiny_config

import ulysses_attn
from ulysses_attn.models import decoder_layers
from ulysses_attn.transparent import make_transparent


def smoothed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A loss the package knows nothing of: label-smoothed cross-entropy of the shifted logits."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=0.1
    )


def _config(model_type: str, router_loss: bool):
    cfg = tiny_config(model_type)
    if router_loss:
        cfg.output_router_logits = True
        cfg.router_aux_loss_coef = 0.5
    return cfg


def _reference(cfg, kind: str) -> dict:
    ref, _ = build_reference(cfg)
    batch = {**make_batch(kind), "use_cache": False}
    if "position_ids" in batch:  # packed: the documents one at a time, as zoo.reference_forward
        pos, ids = batch["position_ids"][0], batch["input_ids"]
        starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
        logits = torch.cat([ref(input_ids=ids[:, a:b], use_cache=False).logits for a, b in zip(starts, starts[1:])], 1)
        loss = F.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=-100)
    else:
        out = ref(**batch)
        logits, loss = out.logits, out.loss
    custom = smoothed_loss(logits, batch["labels"])
    (loss + custom).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in ref.named_parameters()}
    return {"logits": logits.detach(), "loss": loss.item(), "custom": custom.item(), "grads": grads}


def _worker(rank, world, model_type, kinds, router_loss):
    import torch.distributed as dist

    sp = ulysses_attn.enable(sp_size=world, select_backend=False)  # the reference keeps its stock backend
    cfg = _config(model_type, router_loss)
    model = build(cfg, "ulysses_flash")
    make_transparent(model, sp)
    seen: list[int] = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(
            lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True
        )
    results = {}
    for kind in kinds:
        reference = _reference(cfg, kind)
        model.zero_grad(set_to_none=True)
        seen.clear()
        batch = {**make_batch(kind), "use_cache": False}
        out = model(**batch)  # the whole batch, on every rank
        custom = smoothed_loss(out.logits, batch["labels"])
        (out.loss + custom).backward()
        floor = GRAD_FLOOR * max(g.norm().item() for g in reference["grads"].values() if g is not None)
        worst = 0.0
        for n, p in model.named_parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            dist.all_reduce(g)
            r = reference["grads"][n]
            r = torch.zeros_like(p) if r is None else r
            worst = max(worst, ((g / world - r).norm() / max(r.norm().item(), floor)).item())
        keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        results[kind] = {
            "seq": batch["input_ids"].shape[1],
            "seen": max(seen),
            "logits": rel_err(out.logits.detach()[keep], reference["logits"][keep]),
            "loss": abs(out.loss.item() - reference["loss"]) / abs(reference["loss"]),
            "custom": abs(custom.item() - reference["custom"]) / abs(reference["custom"]),
            "grad": worst,
        }
    return results


def _assert_exact(results, world):
    for r in results:
        for kind, v in r.items():
            assert v["seen"] <= -(-v["seq"] // world), (kind, v)  # the decoder layers saw S/P tokens
            assert max(v["logits"], v["loss"], v["custom"], v["grad"]) < RTOL, (kind, v)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen3_moe"])
def test_any_loss_from_logits_exact_sp2(model_type):
    _assert_exact(run_distributed(_worker, 2, model_type, ("plain", "padded", "packed"), False), 2)


def test_moe_router_loss_exact_sp2():
    # the router's auxiliary loss mixes every token's routing: its logits are re-assembled too
    _assert_exact(run_distributed(_worker, 2, "mixtral", ("plain", "padded"), True), 2)


def test_any_loss_from_logits_exact_sp4():
    _assert_exact(run_distributed(_worker, 4, "qwen2", ("plain", "padded", "packed"), False), 4)


def _generate_worker(rank, world):
    sp = ulysses_attn.enable(sp_size=world, select_backend=False)  # the reference keeps its stock backend
    cfg = tiny_config("llama")
    ref, _ = build_reference(cfg)
    model = build(cfg, "ulysses_flash")
    make_transparent(model, sp)
    prompt = make_batch("plain")["input_ids"][:, :9]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    result = {"sp": model.generate(prompt, **kwargs).tolist(), "ref": ref.generate(prompt, **kwargs).tolist()}

    # a backbone output the package does not know (here a pooled vector: a shard's mean is not the
    # sequence's) is refused by name, not passed through or guessed from its shape
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    backbone = build(cfg, "ulysses_flash").model
    stock_forward = backbone.forward

    @functools.wraps(stock_forward)
    def pooled_forward(**kwargs):
        out = stock_forward(**kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=out[0], pooler_output=out[0].mean(1))

    backbone.forward = pooled_forward
    make_transparent(backbone, sp)
    try:
        backbone(input_ids=prompt)
    except NotImplementedError as e:
        result["refused"] = str(e)
    return result


def test_generation_runs_unsharded_and_equals_plain_and_unknown_outputs_are_refused():
    for r in run_distributed(_generate_worker, 2):
        assert r["sp"] == r["ref"] and len(r["sp"][0]) == 15
        assert "output 'pooler_output'" in r["refused"]


# ------------------------------------------------------------------------------------------------
# the HF Trainer: losses the package does not make SP-aware train in transparent mode, exactly
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option", [["--loss_func"], ["--label_smoothing", "0.1"]], ids=["compute_loss_func", "label_smoothing"]
)
def test_compute_loss_func_and_label_smoothing_sp2_equal_plain(tmp_path, baselines, option):
    from test_trainer import assert_same_training, run

    ref = baselines("-".join(option), extra=["--eval", *option])
    sp_run = run(tmp_path, nproc=2, sp=2, extra=["--eval", *option])
    assert_same_training(sp_run, ref, 2)
    assert sp_run[0]["loss_path"] == "transparent" and ref[0]["loss_path"] is None


def test_cpu_run_without_use_cpu_trains_distributed(tmp_path, baselines):
    # without use_cpu accelerate would run each rank as its own process (each on half of every
    # sequence); the launcher makes the run distributed on the CPU instead
    from test_trainer import assert_same_training, run

    sp_run = run(tmp_path, nproc=2, sp=2, extra=["--eval", "--no_use_cpu"])
    assert sp_run[0]["world_size"] == 2
    assert_same_training(sp_run, baselines("plain", extra=["--eval"]), 2)


def _single_process_trainer_worker(rank, world):
    from example_runs import tiny_model
    from transformers import Trainer, TrainingArguments

    from ulysses_attn.integrations.trainer import attach

    ulysses_attn.enable(sp_size=world)
    model = tiny_model("llama", 40, "ulysses_flash", seed=0)
    args = TrainingArguments(output_dir=f"/tmp/ulysses_single_{rank}", use_cpu=True, report_to=[])
    trainer = Trainer.__new__(Trainer)  # a Trainer whose accelerate state is not distributed
    trainer.args, trainer.model = args, model
    trainer.accelerator = type("NotDistributed", (), {"num_processes": 1, "distributed_type": "NO"})()
    with pytest.raises(RuntimeError, match="trains as 1 process.*use_cpu=True"):
        attach(trainer)
    return True


def test_sp_with_a_single_process_trainer_is_refused():
    assert all(run_distributed(_single_process_trainer_worker, 2))


# ------------------------------------------------------------------------------------------------
# the launcher selects the backend: an unchanged script that never names ulysses_flash
# ------------------------------------------------------------------------------------------------


def test_unchanged_script_gets_ulysses_flash_from_the_launcher(tmp_path, baselines):
    # examples/sft_trainer.py loads its model with attn_implementation="sdpa" (its default)
    from test_trainer import assert_same_training, run

    sp_run = run(tmp_path, nproc=2, sp=2, extra=["--eval"], attn=None)
    assert sp_run[0]["loss_path"] == "chunked"
    assert_same_training(sp_run, baselines("plain", extra=["--eval"]), 2)


def _select_worker(rank, world, tmp):
    import os

    from transformers import AutoModelForCausalLM
    from zoo import tiny_config

    from ulysses_attn.state import STATE

    cfg = tiny_config("llama")
    got = {}
    ulysses_attn.enable(sp_size=world)
    for asked in ("sdpa", "eager", None):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=asked)
        got[asked] = model.config._attn_implementation
    got["kernel"] = STATE.preferred_kernel  # the first request, sdpa
    ids = make_batch("plain")["input_ids"]
    try:  # a loop of the script's own: nothing shards the inputs of a model the launcher switched
        model(input_ids=ids)
        got["unprepared"] = None
    except RuntimeError as e:
        got["unprepared"] = str(e)
    make_transparent(model, ulysses_attn.get_sequence_parallel())
    got["transparent_logits"] = tuple(model(input_ids=ids).logits.shape)
    if rank == 0:
        model.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json")) if rank == 0 else open(os.devnull) as f:
        got["saved"] = f.read()
    ulysses_attn.disable()
    ulysses_attn.enable(sp_size=world, select_backend=False)
    got["kept"] = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").config._attn_implementation
    return got


def test_models_built_under_sp_get_ulysses_flash_and_save_without_it(tmp_path):
    import subprocess
    import sys

    r = run_distributed(_select_worker, 2, str(tmp_path))[0]
    assert r["sdpa"] == r["eager"] == r[None] == "ulysses_flash" and r["kernel"] == "sdpa"
    assert r["kept"] == "sdpa"
    assert r["unprepared"] and "runs outside a Trainer" in r["unprepared"] and "make_transparent" in r["unprepared"]
    assert r["transparent_logits"] == (1, 30, 96)
    assert r["saved"] and "ulysses" not in r["saved"]
    # the saved model loads and runs where the package was never imported
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); "
        "assert 'ulysses_attn' not in sys.modules; print(m.config._attn_implementation); "
        "print(m(torch.tensor([[1, 2, 3]])).logits.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "sdpa"


def test_compute_loss_func_sp2_times_dp2_equals_ddp2(tmp_path, baselines):
    from test_trainer import assert_same_training, run

    ref = baselines("ddp2-loss_func", nproc=2, extra=["--eval", "--loss_func"])
    sp_run = run(tmp_path, nproc=4, sp=2, extra=["--eval", "--loss_func"])
    assert sp_run[0]["world_size"] == 4 and sp_run[0]["loss_path"] == "transparent"
    assert_same_training(sp_run, ref, 2)


def _loss_set_after_init_worker(rank, world):
    from example_runs import tiny_model
    from transformers import Trainer, TrainingArguments

    ulysses_attn.enable(sp_size=world)
    model = tiny_model("llama", 40, "ulysses_flash", seed=0)
    ids = torch.randint(2, 40, (4, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=f"/tmp/ulysses_late_loss_{rank}", max_steps=1, per_device_train_batch_size=1, use_cpu=True,
        report_to=[], save_strategy="no", seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.logits.float().mean()
    with pytest.raises(RuntimeError, match="compute_loss_func, set after the Trainer was built.*--transparent on"):
        trainer.train()
    return True


def test_a_logits_loss_set_after_the_trainer_was_built_is_refused():
    # the sharded path was chosen at construction; a compute_loss_func set afterwards (as some Trainer
    # subclasses do after super().__init__()) would see a shard of the logits: refused, never silent
    assert all(run_distributed(_loss_set_after_init_worker, 2))
