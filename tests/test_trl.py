"""TRL DPO and SFT with Ulysses equal the same training without sequence parallelism
(real TRL trainers, tiny Llama from a config, fp32 on CPU, gloo)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import ulysses_attn  # noqa: E402
from distributed import run_distributed  # noqa: E402

from example_runs import char_tokenizer, tiny_model  # noqa: E402
from zoo import GRAD_FLOOR  # noqa: E402

RTOL = 1e-5
# Rewards and margins are differences of log-prob sums (|sum| ~ 10-100): fp32 round-off of the sums
# (~1e-7 relative) is ~1e-6 absolute after the cancellation, so those get an absolute tolerance too.
ATOL = 1e-5
# Weights are compared after plain SGD steps, which keep them linear in the gradients: AdamW divides
# each element by its own sqrt(v), so where a gradient element sits at the fp32 noise floor (q_proj's
# LoRA factors in a random tiny model: attention nearly uniform) summation-order noise of ~1e-7 turns
# into lr-sized differences whose size depends on the CPU's BLAS (seen at 1.2e-4 on one machine).
RTOL_WEIGHTS = 5e-5
WORDS = ["alpha", "beta", "gamma", "delta", "long", "short", "sequence", "shard", "token", "answer", "yes", "no"]


def preference_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    rows = []
    for i in range(n):
        # prompts of 3..12 words and completions of different lengths: they cross shard boundaries
        rows.append({"prompt": pick(3 + i % 10), "chosen": pick(2 + (i * 3) % 7), "rejected": pick(1 + (i * 5) % 9)})
    return rows


def text_data(n=8, seed=1):
    rows = preference_data(n, seed)
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]


def _grads_callback():
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def __init__(self):
            self.first = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.first is None:
                self.first = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    return Capture()


def _reward_vowels(completions, **kwargs):
    """A deterministic reward: the share of vowels in each completion."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def _model(arch: str, vocab: int, attn: str):
    """The tiny Llama of the examples, or a tiny Qwen3.5 (a gated delta-net layer, then a full-attention one)."""
    if arch == "llama":
        return tiny_model("llama", vocab, attn, seed=0)
    from transformers import AutoModelForCausalLM
    from zoo import tiny_config

    cfg = tiny_config(arch)
    cfg.vocab_size, cfg.num_hidden_layers, cfg.layer_types = vocab, 2, ["linear_attention", "full_attention"]
    cfg.use_cache = False
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def _train(rank, world, trainer_name, sp_size, options):
    from peft import LoraConfig

    ulysses_attn.enable(sp_size=sp_size)
    attn = "ulysses_flash" if sp_size > 1 else "sdpa"
    rows = preference_data() if trainer_name in ("dpo", "reward", "orpo", "cpo") else text_data()
    if trainer_name == "kto":  # desirable and undesirable completions, alternating
        rows = [{**r, "label": i % 2 == 0} for i, r in enumerate(rows)]
    tokenizer = char_tokenizer([v for r in rows for v in r.values() if isinstance(v, str)])
    tokenizer.eos_token = tokenizer.pad_token
    model = _model(options.get("arch", "llama"), len(tokenizer), attn)
    if trainer_name == "reward":  # the same tiny Llama with a scalar score head
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        config = model.config.__class__(**{**model.config.to_dict(), "num_labels": 1, "pad_token_id": 0})
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn, dtype=torch.float32)
    common = dict(output_dir=f"/tmp/ulysses_trl_{os.getpid()}", per_device_train_batch_size=2, max_steps=3,
                  optim="sgd", learning_rate=0.1, logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                  save_strategy="no", gradient_checkpointing=options.get("gradient_checkpointing", False),
                  gradient_accumulation_steps=options.get("grad_accum", 1), dataloader_num_workers=0)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if options.get("lora") else None
    capture = _grads_callback()
    dataset = datasets.Dataset.from_list(rows)
    if options.get("precompute"):  # TRL caches reference log-probs next to the dataset's files: share them
        path = os.path.join(options["tmp"], "dataset")
        if rank == 0:
            dataset.save_to_disk(path)
        torch.distributed.barrier()
        dataset = datasets.load_from_disk(path)
    if trainer_name == "dpo":
        config = trl.DPOConfig(**common, loss_type=options.get("loss_type", ["sigmoid"]),
                               loss_weights=options.get("loss_weights"), beta=0.5,
                               precompute_ref_log_probs=options.get("precompute", False))
        ref_model = _model(options.get("arch", "llama"), len(tokenizer), attn) if options.get("ref_model") else None
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[capture])
    elif trainer_name == "kto":
        config = trl.KTOConfig(**common, beta=0.5)
        ref_model = tiny_model("llama", len(tokenizer), attn, seed=0) if options.get("ref_model") else None
        trainer = trl.KTOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[capture])
    elif trainer_name in ("orpo", "cpo"):  # trl.experimental in trl 1.x
        module = importlib.import_module(f"trl.experimental.{trainer_name}")
        name = trainer_name.upper()
        config = getattr(module, f"{name}Config")(**common, beta=0.5)
        trainer = getattr(module, f"{name}Trainer")(model=model, args=config, train_dataset=dataset,
                                                    processing_class=tokenizer, peft_config=peft_config,
                                                    callbacks=[capture])
    elif trainer_name == "reward":
        config = trl.RewardConfig(**common)
        trainer = trl.RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                    peft_config=peft_config, callbacks=[capture])
    else:
        config = trl.SFTConfig(**common, padding_free=options.get("padding_free", False),
                               completion_only_loss=options.get("completion_only_loss"), max_length=None)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[capture])
    seen = []
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    base.model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
    trainer.train()
    from ulysses_attn.integrations.trainer import trainer_loss_path

    path = trainer_loss_path(trainer).value
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"logs": trainer.state.log_history, "grads": capture.first, "weights": trained, "longest": max(seen), "path": path}


# ORPO and CPO log the mean of the logits over every position, padding included; a pad position's
# logits depend on the attention kernel (sdpa lets it attend to the real tokens, flash_attention_2
# zeroes it, ulysses_flash continues the causal sequence), so those two metrics are not compared.
PAD_POSITION_METRICS = ("logits/chosen", "logits/rejected")


def _compare(sp_size, trainer_name, options, world=None, tmp=None):
    world = world or sp_size
    ref = run_distributed(_train, world // sp_size, trainer_name, 1, {**options, "tmp": tmp and str(tmp / "ref")})[0]
    sp = run_distributed(_train, world, trainer_name, sp_size, {**options, "tmp": tmp and str(tmp / "sp")})[0]
    keys = set()
    assert len(ref["logs"]) == len(sp["logs"])
    for a, b in zip(sp["logs"], ref["logs"]):
        for k, v in b.items():
            # total_flos is the Trainer's estimate summed over processes (it counts each SP rank's full batch)
            if isinstance(v, float) and k not in ("epoch", "learning_rate", "total_flos") and "runtime" not in k \
                    and "per_second" not in k and k not in PAD_POSITION_METRICS:
                assert a[k] == pytest.approx(v, rel=RTOL, abs=ATOL), (k, a[k], v)
                keys.add(k)
    assert ref["grads"] and set(ref["grads"]) == set(sp["grads"])
    # a gradient far smaller than the model's largest is compared against 1e-3 of that (the zoo's floor):
    # fp32 round-off of the largest sets the scale (Qwen3.5's dt_bias gradient is ~1e-5 of it)
    floor = GRAD_FLOOR * max(g.norm().item() for g in ref["grads"].values())
    for n, g in ref["grads"].items():
        assert ((sp["grads"][n] - g).norm() / max(g.norm().item(), floor, 1e-12)).item() < RTOL, n
    for n, w in ref["weights"].items():
        assert ((sp["weights"][n] - w).norm() / w.norm()).item() < RTOL_WEIGHTS, n
    assert sp["longest"] <= -(-ref["longest"] // sp_size), "decoder layers must see only the local shard"
    keys.add(f"path={sp['path']}")
    return keys


def test_dpo_sigmoid_separate_reference_model_p2():
    keys = _compare(2, "dpo", {"ref_model": True, "gradient_checkpointing": True})
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= keys


def test_dpo_ipo_lora_adapter_disabled_reference_p2():
    keys = _compare(2, "dpo", {"lora": True, "loss_type": ["ipo"]})
    assert "rewards/margins" in keys


def test_dpo_hinge_plus_sft_precomputed_reference_p4(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "sp").mkdir()
    options = {"precompute": True, "loss_type": ["hinge", "sft"], "loss_weights": [1.0, 0.5]}
    _compare(4, "dpo", options, tmp=tmp_path)


def test_dpo_sp2_times_dp2_with_grad_accum():
    _compare(2, "dpo", {"grad_accum": 2, "ref_model": True}, world=4)


@pytest.mark.parametrize("name", ["kto", "reward", "orpo", "cpo"])
def test_own_loss_trainers_transparent_p2(name):
    # their compute_loss is their own: transparent mode (whole batches and logits), exact
    keys = _compare(2, name, {"ref_model": name == "kto"})  # KTO's reference model is made transparent too
    assert "path=transparent" in keys and "loss" in keys
    expected = {"kto": {"kl"}, "reward": {"accuracy", "margin"}, "orpo": {"nll_loss", "log_odds_ratio"},
                "cpo": {"nll_loss", "rewards/margins"}}[name]
    assert expected <= keys, keys


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_qwen3_5_gated_delta_net_p2(name):
    # a hybrid model: the GDN layer's conv and delta rule run sequence-parallel inside the trainer
    keys = _compare(2, name, {"arch": "qwen3_5_text", "ref_model": name == "dpo"})
    assert "loss" in keys and (name == "sft" or "rewards/margins" in keys)


def test_sft_padded_completion_only_p2():
    keys = _compare(2, "sft", {"completion_only_loss": True})
    assert {"loss", "entropy", "num_tokens", "mean_token_accuracy"} <= keys


def test_sft_padding_free_lora_p4():
    _compare(4, "sft", {"padding_free": True, "lora": True})


def _unsupported_worker(rank, world):
    import trl.trainer.dpo_trainer as dpo

    ulysses_attn.enable(sp_size=world)  # wraps dpo.add_fused_lm_head, as DPOTrainer looks it up
    model = tiny_model("llama", 40, "ulysses_flash", seed=0)
    dpo.add_fused_lm_head(model)
    ids = torch.randint(1, 40, (1, 12))
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)  # supported: full-sequence per-token outputs
    try:
        model(input_ids=ids)  # full logits (label smoothing, compute_loss_func, generation)
        error = None
    except NotImplementedError as e:
        error = str(e)
    return {"log_probs_shape": tuple(out.log_probs.shape), "error": error}


def test_options_needing_full_logits_raise_under_sp():
    for r in run_distributed(_unsupported_worker, 2):
        assert r["log_probs_shape"] == (1, 11)
        assert r["error"] and "fused LM head" in r["error"] and "label smoothing" in r["error"]


def test_trl_trainer_with_too_old_trl_trains_transparent(monkeypatch, caplog):
    # an older TRL has no fused LM head: its trainers' own compute_loss reads the full logits, so
    # they take transparent mode (whole batches and logits), never the shards
    import ulysses_attn.integrations.trainer as integration
    import ulysses_attn.integrations.trl as trl_integration

    monkeypatch.setattr(trl, "__version__", "1.15.0")
    assert not trl_integration.trl_supported() and trl_integration.fused_trainer_classes() == ()
    with caplog.at_level("INFO", logger="ulysses_attn"):
        trl_integration.patch_trl()
    assert "transparent mode" in caplog.text
    trainer = trl.SFTTrainer.__new__(trl.SFTTrainer)
    trainer.model, trainer.compute_loss_func, trainer.label_smoother = tiny_model("llama", 40, "ulysses_flash", 0), None, None
    assert integration.full_logits_needed(trainer) == "SFTTrainer.compute_loss (a loss of its own)"
    assert ulysses_attn.loss.loss_path(trainer.model, chunked_loss=True, sp_size=2,
                                       full_logits_needed=integration.full_logits_needed(trainer)).value == "transparent"



def _grpo_worker(rank, world):
    ulysses_attn.enable(sp_size=world)
    tokenizer = char_tokenizer(WORDS)
    config = trl.GRPOConfig(output_dir=f"/tmp/ulysses_grpo_{os.getpid()}", per_device_train_batch_size=2,
                            num_generations=2, generation_batch_size=4, max_completion_length=4, use_cpu=True,
                            report_to=[], beta=0.0)
    dataset = datasets.Dataset.from_list([{"prompt": w} for w in WORDS])
    try:
        trl.GRPOTrainer(model=tiny_model("llama", len(tokenizer), "ulysses_flash", seed=0), reward_funcs=_reward_vowels,
                        args=config, train_dataset=dataset, processing_class=tokenizer)
    except NotImplementedError as e:
        return str(e)
    return None


def test_grpo_is_refused_under_sp():
    # online trainers count processes where SP ranks share a batch: refused, never a different number
    for error in run_distributed(_grpo_worker, 2):
        assert error and "GRPOTrainer generates completions" in error and "sp_size=1" in error
