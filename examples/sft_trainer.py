"""A plain HF Trainer SFT script (it knows nothing about sequence parallelism).

Without SP:      python examples/sft_trainer.py --output_dir out/plain
With Ulysses:    torchrun --nproc_per_node 2 -m ulysses_attn.launch --sp-size 2 \
                     examples/sft_trainer.py --attn ulysses_flash --output_dir out/sp

By default it builds a tiny Llama from a config and a character-level tokenizer over the bundled
corpus (examples/data/tiny_corpus.jsonl), so it runs anywhere, CPU included, with no downloads.
Pass --model_name_or_path to fine-tune a real checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    chars = sorted(set("".join(texts)))
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_model(arch: str, vocab_size: int, attn: str, seed: int, tie: bool = False):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  use_cache=False, tie_word_embeddings=tie)
    if arch == "qwen3_5_text":  # a hybrid: a gated delta-net layer, then a full-attention one
        from transformers import Qwen3_5TextConfig

        config = Qwen3_5TextConfig(**common, layer_types=["linear_attention", "full_attention"],
                                   linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                   linear_value_head_dim=16, linear_conv_kernel_dim=4)
    else:
        config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def save_log_history(trainer, output_dir: str) -> None:
    """Write the logged metrics of a finished run to output_dir/log_history.json (main process)."""
    if trainer.is_world_process_zero():
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)


def base_model(model):
    """The transformers model under a peft adapter (the model itself without one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LongestSequenceSeen(TrainerCallback):
    """Records the longest sequence any decoder layer processed, the most token rows a decoder MLP's
    down projection and (with ``head=True``) the LM head in training processed in one call (plain
    forward hooks; a hooked head makes the chunked loss call it as a module, chunk by chunk), and the
    optimizer steps run."""

    def __init__(self, model, head: bool = False):
        self.longest = self.head_rows = self.mlp_rows = self.steps_run = 0
        model = base_model(model)
        layers = model.model.layers if hasattr(model, "model") else []
        for layer in layers:
            layer.register_forward_pre_hook(self._hook, with_kwargs=True)
            layer.mlp.down_proj.register_forward_hook(self._mlp_hook)
        if head:
            model.get_output_embeddings().register_forward_hook(self._head_hook)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1  # optimizer steps this process ran (a resumed run skips the checkpoint's)

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.longest = max(self.longest, hidden.shape[1])

    def _head_hook(self, module, args, output):
        if module.training:
            self.head_rows = max(self.head_rows, output[..., 0].numel())

    def _mlp_hook(self, module, args, output):
        self.mlp_rows = max(self.mlp_rows, output[..., 0].numel())


def token_weighted_loss(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func of the script's own: cross-entropy of the next token from outputs.logits,
    summed and divided by the Trainer's token count (z-loss added, so it is not the model's loss)."""
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    scored = targets != -100
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    z_loss = 1e-2 * (torch.logsumexp(logits, dim=-1)[scored] ** 2).sum()
    count = num_items_in_batch if num_items_in_batch is not None else scored.sum()
    return (ce + z_loss) / count


def selective_checkpointing(model) -> tuple[int, int]:
    """Decoder layers that keep their attention outputs through the recompute (the launcher's
    ``--selective-checkpointing``) and the attention calls their recomputes skipped; the script
    itself does not import ulysses_attn."""
    selective = sys.modules.get("ulysses_attn.selective_checkpoint")
    if selective is None:
        return 0, 0
    layers = base_model(model).model.layers
    return sum(map(selective.keeps_attention_outputs, layers)), selective.replayed_attention_outputs()


def loss_path(trainer) -> str | None:
    """How ulysses_attn computes this Trainer's loss under SP (None when it is not loaded)."""
    integration = sys.modules.get("ulysses_attn.integrations.trainer")
    sp = sys.modules["ulysses_attn"].get_sequence_parallel() if integration else None
    if sp is None or sp.size == 1:
        return None
    return integration.trainer_loss_path(trainer).value


def compiled_graphs() -> int:
    """How many graphs torch.compile (dynamo) built in this process (0 without --torch_compile)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo else 0


def parallelism_config(spec: str):
    """An accelerate ParallelismConfig from "name=size,name=size" (e.g. "dp_replicate_size=2,dp_shard_size=2")."""
    from accelerate.parallelism_config import ParallelismConfig

    sizes = dict(item.split("=") for item in spec.split(","))
    return ParallelismConfig(**{name: int(size) for name, size in sizes.items()})


def local_numel(param) -> int:
    """Elements of a parameter this rank holds: its FSDP2 shard (DTensor), its ZeRO-3 partition, or all."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local().numel()
    partition = getattr(param, "ds_tensor", None)  # DeepSpeed ZeRO-3
    return partition.numel() if partition is not None else param.numel()


def parallelism_facts(trainer) -> dict:
    """How the trained model was distributed, seen from this rank: accelerate's distributed type, the
    FSDP version, how many modules are FSDP2 units (``FSDPModule``), how many parameters are DTensors,
    and the fraction of the model's parameter elements this rank holds (1.0 when every rank holds
    the whole model, as under DDP; about 1/world when FSDP2 shards it over the world)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model, base = trainer.model_wrapped, base_model(trainer.model)
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    for module in model.modules():  # the root FSDP2 unit keeps its parameters gathered after a forward
        if isinstance(module, FSDPModule):
            module.reshard()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    local = sum(local_numel(p) for p in params)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3: ds_numel, the full size
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "fsdp_modules": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "dtensor_parameters": sum(isinstance(p, DTensor) for p in params),
        "parameters": len(params),
        "not_dtensor": [n for n, p in named if not isinstance(p, DTensor)],
        "local_parameter_fraction": local / total if total else None,
        "embeddings_tied": base.get_output_embeddings().weight is base.get_input_embeddings().weight,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", required=True)
    p.add_argument("--attn", default="sdpa", help='attn_implementation, e.g. "ulysses_flash"')
    p.add_argument("--model_name_or_path", default=None)
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3_5_text"])
    p.add_argument("--data", default=os.path.join(HERE, "data", "tiny_corpus.jsonl"))
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--packed", action="store_true", help="padding-free batches (DataCollatorWithFlattening)")
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping threshold")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--record_head_rows", action="store_true", help="hook the LM head to record its rows per call")
    p.add_argument("--save_steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    p.add_argument("--save_model", action="store_true", help="trainer.save_model(output_dir/final) after training")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    p.add_argument("--torch_compile_backend", default=None, help="TrainingArguments(torch_compile_backend=...)")
    p.add_argument("--label_smoothing", type=float, default=0.0, help="TrainingArguments(label_smoothing_factor=...)")
    p.add_argument("--loss_func", action="store_true", help="a compute_loss_func of the script's own, from the logits")
    p.add_argument("--no_use_cpu", action="store_true", help="leave use_cpu off even without a GPU")
    p.add_argument("--fsdp", action="store_true", help="TrainingArguments(fsdp=True), set up by --fsdp_config")
    p.add_argument("--fsdp_config", default=None, help="TrainingArguments(fsdp_config=...): a JSON file")
    p.add_argument("--parallelism_config", default=None,
                   help='TrainingArguments(parallelism_config=...), e.g. "dp_replicate_size=2,dp_shard_size=2"')
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft, dropout 0) instead of all weights")
    p.add_argument("--tie_embeddings", action="store_true", help="tiny model with the LM head tied to the embedding")
    args = p.parse_args()

    texts = [json.loads(line)["text"] for line in open(args.data)]
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, attn_implementation=args.attn)
    else:
        tokenizer = char_tokenizer(texts)
        model = tiny_model(args.arch, len(tokenizer), args.attn, args.seed, tie=args.tie_embeddings)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(model, lora)

    def encode(text):
        ids = tokenizer(text, truncation=True, max_length=args.max_length)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}

    data = [encode(t) for t in texts]
    train, evaluation = data[:80], data[80:]
    if args.packed:
        collator = DataCollatorWithFlattening()
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        max_grad_norm=args.max_grad_norm,
        logging_steps=1,
        eval_strategy="steps" if args.eval else "no",
        eval_steps=2,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available() and not args.no_use_cpu,
        dataloader_num_workers=0,
        torch_compile=args.torch_compile,
        torch_compile_backend=args.torch_compile_backend,
        label_smoothing_factor=args.label_smoothing,
        fsdp=args.fsdp or None,
        fsdp_config=args.fsdp_config,
        **({"parallelism_config": parallelism_config(args.parallelism_config)} if args.parallelism_config else {}),
    )
    seen = LongestSequenceSeen(model, head=args.record_head_rows)
    trainer = Trainer(model=model, args=training_args, train_dataset=train,
                      eval_dataset=evaluation if args.eval else None, data_collator=collator, callbacks=[seen],
                      compute_loss_func=token_weighted_loss if args.loss_func else None)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if args.save_model:
        trainer.save_model(os.path.join(args.output_dir, "final"))  # every rank: gathers FSDP / ZeRO-3 shards
    parallelism = parallelism_facts(trainer)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective: gathers ZeRO-3 shards
    selective_layers, skipped_attention = selective_checkpointing(trainer.model)
    ds_utils = sys.modules.get("deepspeed.utils")  # imported by the Trainer when DeepSpeed runs
    zero3_leaves = len(ds_utils.get_z3_leaf_modules(trainer.model)) if ds_utils else 0
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        weights = {k.removeprefix("_orig_mod."): v.detach().cpu() for k, v in state.items()}  # torch.compile's wrapper
        torch.save(weights, os.path.join(args.output_dir, "weights.pt"))
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump({"log_history": trainer.state.log_history, "longest_sequence_seen": seen.longest,
                       "lm_head_rows_max": seen.head_rows, "mlp_rows_max": seen.mlp_rows,
                       "activation_checkpointing": trainer.model.is_activation_checkpointing,
                       "selective_checkpointing_layers": selective_layers,
                       "attention_calls_not_recomputed": skipped_attention,
                       "zero3_leaf_modules": zero3_leaves,
                       "compiled_graphs": compiled_graphs(),
                       "loss_path": loss_path(trainer),
                       "world_size": training_args.world_size, "parallelism": parallelism,
                       "steps_run": seen.steps_run}, f, indent=1)


if __name__ == "__main__":
    main()
