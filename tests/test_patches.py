"""The patch registry: every target still exists with the signature its replacement expects, the
docs list exactly the registry, and enable -> disable restores every original object (``is``)."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import inspect
import logging
import os
import re
import weakref

import pytest
import torch
from distributed import run_distributed
from tiny_models import VOCAB, build

import ulysses_attn
from ulysses_attn import guards, patches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what each replacement relies on: the parameters (in order, a prefix) of the function it wraps or
# calls, or the attribute/field it sets. A library upgrade that changes one fails here, by name.
SIGNATURES = {
    "transformers.modeling_utils.lazy_import_flash_attention": (
        "transformers.modeling_utils:lazy_import_flash_attention",
        ["implementation"],
    ),
    "transformers.PreTrainedModel._check_and_adjust_attn_implementation": (
        "transformers:PreTrainedModel._check_and_adjust_attn_implementation",
        ["self", "attn_implementation"],
    ),
    "transformers.PreTrainedModel.post_init": ("transformers:PreTrainedModel.post_init", ["self"]),
    "transformers.Trainer.__init__": (
        "transformers:Trainer.__init__",
        ["self", "model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class"],
    ),
    "transformers.Trainer.compute_loss": (
        "transformers:Trainer.compute_loss",
        ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    ),
    "transformers.Trainer.floating_point_ops": ("transformers:Trainer.floating_point_ops", ["self", "inputs"]),
    "accelerate.utils.deepspeed.HfDeepSpeedConfig.__init__": (
        "accelerate.utils.deepspeed:HfDeepSpeedConfig.__init__",
        ["self", "config_file_or_dict"],
    ),
    "accelerate.Accelerator.prepare_data_loader": (
        "accelerate:Accelerator.prepare_data_loader",
        ["self", "data_loader"],
    ),
    "accelerate.Accelerator.pad_across_processes": (
        "accelerate:Accelerator.pad_across_processes",
        ["self", "tensor", "dim", "pad_index", "pad_first"],
    ),
    "accelerate.Accelerator.gather_for_metrics": (
        "accelerate:Accelerator.gather_for_metrics",
        ["self", "input_data", "use_gather_object"],
    ),
    "accelerate.data_loader.BatchSamplerShard.num_processes": (
        "accelerate.data_loader:BatchSamplerShard.__init__",
        ["self", "batch_sampler", "num_processes", "process_index"],
    ),
    "trl.trainer.sft_trainer.add_fused_lm_head": ("trl.trainer.sft_trainer:add_fused_lm_head", ["model"]),
    "trl.trainer.dpo_trainer.add_fused_lm_head": ("trl.trainer.dpo_trainer:add_fused_lm_head", ["model"]),
    "deepspeed.utils.set_z3_leaf_module": ("deepspeed.utils:set_z3_leaf_module", ["model", "flag"]),
}
FIELDS = {  # TrainingArguments fields the integration sets
    "transformers.TrainingArguments.average_tokens_across_devices": "average_tokens_across_devices",
    "transformers.TrainingArguments.activation_checkpointing": "activation_checkpointing",
}


def _resolve(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_target_has_the_signature_its_replacement_expects(name):
    patch = patches.PATCHES[name]
    pytest.importorskip(patch.library.replace("-", "_"))
    path, expected = SIGNATURES[name]
    target = patches.original(*_owner_attr(path))  # the library's own, even while ulysses_attn replaced it
    params = list(inspect.signature(target).parameters)
    assert params[: len(expected)] == expected, f"patch {name}: {path} now takes {params}"


def _owner_attr(path: str):
    module, _, attr = path.partition(":")
    owner_path, _, last = attr.rpartition(".")
    return _resolve(module, owner_path), last


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_training_arguments_have_the_fields_set(name):
    from transformers import TrainingArguments

    assert FIELDS[name] in {f.name for f in dataclasses.fields(TrainingArguments)}, name


def test_model_targets_exist():
    from transformers import PreTrainedModel

    loss_function = inspect.getattr_static(PreTrainedModel, "loss_function")
    assert isinstance(loss_function, property) and loss_function.fset is not None
    model = build("llama", "ulysses_flash")
    model.activation_checkpointing_enable({"use_reentrant": False})
    layer = model.model.layers[0]
    assert callable(layer._gradient_checkpointing_func)  # selective checkpointing wraps this partial
    assert isinstance(layer.mlp, torch.nn.Module) and callable(model.base_model.forward)


def test_every_kind_of_record_is_covered():
    kinds = {p.kind for p in patches.PATCHES.values()}
    assert kinds == {"replace", "tracked", "private"}
    replaced = {n for n, p in patches.PATCHES.items() if p.kind == "replace"}
    covered = set(SIGNATURES) | set(FIELDS)
    # replacements of instance attributes that have no signature: checked by test_model_targets_exist and
    # by the enable/disable round trip below
    instance_only = {
        "transformers.Trainer.data_collator",
        "transformers.Trainer.gather_function",
        "transformers.PreTrainedModel.loss_function",
        "transformers.PreTrainedModel.forward",
        "transformers.PreTrainedModel.base_model.forward",
        "transformers.PreTrainedModel.base_model.forward.transparent",
        "transformers.GradientCheckpointingLayer._gradient_checkpointing_func",
        "transformers.decoder_layer.mlp.forward",
        "trl.fused_lm_head.forward",
        "transformers.RotaryEmbedding.forward",
        # a linear-attention layer's private kernel wrappers: tests/test_linear_attention.py checks the seam
        "transformers.GatedDeltaNet._kernel_funcs.causal_conv1d_forward",
        "transformers.ShortConv._kernel_funcs.causal_conv1d_forward",
        "transformers.Mamba2Mixer._kernel_funcs.causal_conv1d_forward",
        "transformers.Mamba2Mixer._kernel_funcs.mamba_chunk_scan_combined",
        "transformers.Mamba2Mixer._kernel_funcs.mamba_split_conv1d_scan_combined",
        "transformers.GatedDeltaNet._kernel_funcs.chunk_gated_delta_rule",
        "llamafactory.CustomDPOTrainer.concatenated_forward",  # LLaMA-Factory runs in its own venv
    }
    assert replaced - covered == instance_only


@pytest.mark.parametrize("name", sorted(patches.PATCHES))
def test_record_names_a_test_that_exists(name):
    path, _, test = patches.PATCHES[name].test.partition("::")
    with open(os.path.join(ROOT, path)) as f:
        assert re.search(rf"^def {re.escape(test)}\(", f.read(), re.M), f"{name}: {path} has no {test}"


def test_docs_list_exactly_the_registry():
    with open(os.path.join(ROOT, "docs", "compatibility.md")) as f:
        doc = f.read()
    assert patches.table() in doc, (
        "docs/compatibility.md is out of date with ulysses_attn.patches.PATCHES; paste the output of "
        "`python -c 'from ulysses_attn import patches; print(patches.table())'`"
    )


def test_outside_the_window_warns_naming_the_patch(monkeypatch, caplog):
    name = "transformers.Trainer.__init__"
    monkeypatch.setitem(patches.PATCHES, name, dataclasses.replace(patches.PATCHES[name], versions="<1"))
    with caplog.at_level(logging.WARNING, logger="ulysses_attn"):
        patches.check_window(name)
    assert name in caplog.text and "transformers<1" in caplog.text


def test_flash_shim_leaves_other_names_alone():
    import transformers.modeling_utils as mu

    shim, original = mu.lazy_import_flash_attention, patches.original(mu, "lazy_import_flash_attention")
    assert shim is not original and patches.is_replaced(mu, "lazy_import_flash_attention")
    assert shim(ulysses_attn.ATTN_IMPLEMENTATION) is None
    outcomes = []
    for fn in (shim, original):
        try:
            outcomes.append(("returned", type(fn("flash_attention_2"))))
        except Exception as e:  # flash-attn is not installed here: both must fail alike
            outcomes.append(("raised", type(e), str(e)))
    assert outcomes[0] == outcomes[1]


def test_unregister_and_register_again():
    import transformers.modeling_utils as mu
    from transformers import AttentionInterface

    original = patches.original(mu, "lazy_import_flash_attention")
    ulysses_attn.disable(unregister=True)
    try:
        assert mu.lazy_import_flash_attention is original
        assert ulysses_attn.ATTN_IMPLEMENTATION not in AttentionInterface()
        with pytest.raises(Exception):
            build("llama", "ulysses_flash")
    finally:
        ulysses_attn.register()
    assert mu.lazy_import_flash_attention is not original
    assert patches.original(mu, "lazy_import_flash_attention") is original
    assert build("llama", "ulysses_flash")(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, VOCAB)


def test_replace_and_restore_keep_identity():
    class Owner:
        def method(self):
            return "class"

    owner = Owner()
    own = {"field": 1}
    holder = type("Holder", (), {})()
    holder.field = own
    patches.replace("transformers.Trainer.gather_function", owner, "method", lambda: "patched")
    patches.replace("transformers.Trainer.gather_function", holder, "field", {"field": 2})
    assert owner.method() == "patched" and holder.field == {"field": 2}
    assert patches.original(holder, "field") is own
    assert patches.undo_all() == 2
    assert "method" not in vars(owner) and owner.method() == "class"  # inherited again, not a copy
    assert holder.field is own


def test_a_patched_model_is_not_kept_alive():
    """The registry holds instances weakly: a model that ``configure_memory`` changed (forward,
    backbone forward, tiled MLPs, hooks -- each a closure over the model) is freed once the user
    drops it, and its entries go with it (a leak here kept whole ZeRO-3 engines alive)."""
    model = build("llama", "ulysses_flash")
    ulysses_attn.configure_memory(model, ulysses_attn.MemoryOptions.long_sequence())
    assert len(patches.applied()) >= 3 and patches.is_replaced(model, "forward")
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
    assert patches.applied("enable") == []
    before = len(patches.applied("import"))
    patches.replace("transformers.Trainer.gather_function", type("Holder", (), {"field": 0})(), "field", 1)
    assert len(ulysses_attn.state.STATE.applied) == before + 1  # the dead model's entries were dropped


def test_destroy_frees_groups_so_a_hundred_cycles_work():
    for world in (2,):
        assert run_distributed(_init_destroy_cycles, world, 100) == [100] * world


def _init_destroy_cycles(rank, world, cycles):
    import torch.distributed as dist

    for _ in range(cycles):
        sp = ulysses_attn.init_sequence_parallel(world)
        t = torch.ones(1)
        dist.all_reduce(t, group=sp.group)
        assert t.item() == world
        ulysses_attn.destroy_sequence_parallel()
        assert ulysses_attn.get_sequence_parallel() is None
    return cycles


def _tiny_trainer(tmp, model):
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (4, 12), generator=gen).tolist()]
    args = TrainingArguments(
        output_dir=tmp,
        max_steps=2,
        per_device_train_batch_size=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        average_tokens_across_devices=False,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def _snapshot(trainer):
    acc = trainer.accelerator
    return {
        "Trainer.__init__": type(trainer).__init__,
        "collator": trainer.data_collator,
        "gather_function": trainer.gather_function,
        "acc_own": {k for k in ("prepare_data_loader", "pad_across_processes", "gather_for_metrics") if k in vars(acc)},
        "average_tokens": trainer.args.average_tokens_across_devices,
        "checkpointing": trainer.args.activation_checkpointing,
        "model_own": {k for k in vars(trainer.model) if k == "forward" or k.startswith("_ulysses")} - IMPORT_SCOPE,
        "backbone_forward": "forward" in vars(trainer.model.model),
        "mlp_own": ["forward" in vars(layer.mlp) for layer in trainer.model.model.layers],
        "loss_function": trainer.model.loss_function,
        "our_hooks": [
            h
            for m in trainer.model.modules()
            for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
            if getattr(h, "__module__", "").startswith("ulysses_attn") and h is not guards._first_sp_forward
        ],
    }


# left by import ulysses_attn on a ulysses_flash model (guards.watch; disable(unregister=True) undoes it)
IMPORT_SCOPE = {"_ulysses_attn_watched", "_ulysses_attn_parked_originals"}


def _enable_disable_enable(rank, world, tmp):
    from transformers import Trainer

    original_init = Trainer.__init__
    losses = []
    for round_ in range(2):
        ulysses_attn.enable(sp_size=world, long_sequence=True, select_backend=False)  # "plain" keeps sdpa
        assert Trainer.__init__ is not original_init
        model = build("llama", "ulysses_flash")
        plain = _snapshot(_tiny_trainer(os.path.join(tmp, "plain"), build("llama", "sdpa")))
        trainer = _tiny_trainer(os.path.join(tmp, f"r{rank}_{round_}"), model)
        changed = _snapshot(trainer)
        losses.append(trainer.train().training_loss)
        ulysses_attn.disable()
        after = _snapshot(trainer)
        assert Trainer.__init__ is original_init and ulysses_attn.get_sequence_parallel() is None
        assert changed["collator"] is not after["collator"] and changed["acc_own"] and changed["model_own"]
        assert after["Trainer.__init__"] is original_init
        assert after["acc_own"] == set() and after["model_own"] == set() and not after["backbone_forward"]
        assert after["mlp_own"] == [False, False] and after["average_tokens"] is False
        assert after["checkpointing"] is False and len(changed["our_hooks"]) == 2 and after["our_hooks"] == []
        assert after["loss_function"] is not ulysses_attn.causal_lm_loss
        assert after["collator"] is plain["collator"]
    return losses


def test_enable_disable_enable(tmp_path):
    losses = run_distributed(_enable_disable_enable, 2, str(tmp_path))
    assert losses[0] == losses[1]  # both ranks of the SP group hold the same loss
    assert losses[0][0] == pytest.approx(losses[0][1], rel=1e-6)  # the second enable trains as the first
