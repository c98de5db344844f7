"""Every change ulysses_attn makes to an object another library owns: one record each, with undo.

A :class:`Patch` says what is changed (``target``), in which library and version window it was
written against, why, what public API would make it unnecessary, and which test covers it. The
code that makes the change calls :func:`replace` (an attribute: a function on a module or class,
a method or field on an instance) or :func:`track` (a hook handle or another change with its own
undo); both log an :class:`Applied` entry in the runtime state. :func:`undo_all` (what
:func:`ulysses_attn.disable` calls) restores every original in reverse order: the attribute is
the very object it was before (``is``), or gone again where it was inherited.

>>> from ulysses_attn import patches
>>> patches.replace("accelerate.Accelerator.prepare_data_loader", accelerator, "prepare_data_loader", wrapper)
>>> patches.original(accelerator, "prepare_data_loader")     # what it was before
>>> patches.undo_all()

``docs/compatibility.md`` lists :data:`PATCHES` (a test keeps the two equal) and
``tests/test_patches.py`` checks that each target still exists with the signature its
replacement expects.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .state import STATE, warn_once

__all__ = [
    "Patch",
    "PATCHES",
    "Applied",
    "replace",
    "track",
    "original",
    "is_replaced",
    "restore",
    "undo_all",
    "applied",
    "check_window",
    "installed_version",
    "table",
]


@dataclass(frozen=True)
class Patch:
    """One kind of change to another library's object.

    ``kind`` is ``"replace"`` (an attribute is replaced, restored by :func:`undo_all`),
    ``"tracked"`` (a hook, flag or config key set through public API, reverted by :func:`undo_all`)
    or ``"private"`` (a private name the package uses but does not change)."""

    target: str  # dotted path of what is changed, e.g. "transformers.Trainer.__init__"
    library: str  # distribution name, e.g. "transformers"
    versions: str  # the window it was written and tested against, e.g. ">=5.0,<6"
    why: str
    public_alternative: str
    test: str  # tests/<file>::<test>
    kind: str = "replace"
    scope: str = "enable"  # "import": applied on `import ulysses_attn`, undone by disable(unregister=True)


def _p(*args: str, **kwargs: str) -> Patch:
    return Patch(*args, **kwargs)


_HF = ">=5.0,<6"
_ACC = ">=1.10,<2"
_TRL = ">=1.16,<2"
PATCHES: dict[str, Patch] = {
    p.target: p
    for p in (
        _p(
            "transformers.modeling_utils.lazy_import_flash_attention",
            "transformers",
            _HF,
            'transformers treats every attn_implementation containing "flash" as a flash-attn package to import',
            'a way to register an AttentionInterface function whose name contains "flash" without the import',
            "tests/test_patches.py::test_flash_shim_leaves_other_names_alone",
            scope="import",
        ),
        _p(
            "transformers.PreTrainedModel._check_and_adjust_attn_implementation",
            "transformers",
            _HF,
            'models with _compatible_flash_implementations (gpt-oss, ...) swap any "flash" name for their '
            "own kernel with only a warning: the model would silently run without SP; under enable(select_backend="
            "True) (the launcher) a model built under SP gets ulysses_flash whatever the script asked for",
            "an opt-out of the flash auto-correction for registered AttentionInterface functions",
            "tests/test_guards.py::test_models_with_their_own_flash_kernel_keep_ulysses_flash",
            scope="import",
        ),
        _p(
            "transformers.PreTrainedModel.post_init",
            "transformers",
            _HF,
            "every model built with ulysses_flash is checked on its first SP forward (ulysses_attn/guards.py)",
            "a hook transformers runs when a model selects an attention implementation",
            "tests/test_guards.py::test_token_mixing_outside_attention_is_refused",
            scope="import",
        ),
        _p(
            "transformers.PreTrainedModel.register_forward_pre_hook",
            "transformers",
            _HF,
            "the first-SP-forward check of guards.watch",
            "public API (removed by disable())",
            "tests/test_guards.py::test_token_mixing_outside_attention_is_refused",
            kind="tracked",
            scope="import",
        ),
        _p(
            "transformers.RotaryEmbedding.forward",
            "transformers",
            _HF,
            "RoPE types that follow max(position_ids) (dynamic, longrope) must see the group's maximum position",
            "none",
            "tests/test_guards.py::test_length_dependent_rope_sees_the_whole_sequence",
        ),
        _p(
            "transformers.Trainer.__init__",
            "transformers",
            _HF,
            "every Trainer built after enable() trains with SP, with no change to the script",
            "a Trainer callback that runs before the dataloaders and the loss are set up",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "transformers.Trainer.data_collator",
            "transformers",
            _HF,
            "batches are padded to a multiple of P, shifted on the full sequence and sharded",
            "passing data_collator=UlyssesCollator(...) in the script",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "transformers.Trainer.gather_function",
            "transformers",
            _HF,
            "evaluation gathers once per SP group (see accelerate.Accelerator.gather_for_metrics)",
            "none",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "transformers.TrainingArguments.average_tokens_across_devices",
            "transformers",
            _HF,
            "the SP loss is exact only with the token count of the whole world",
            "setting it in the script",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "transformers.TrainingArguments.activation_checkpointing",
            "transformers",
            _HF,
            "long_sequence=True turns activation checkpointing on for every Trainer",
            "setting it in the script",
            "tests/test_memory.py::test_launcher_long_sequence_and_selective_switches_sp2_equal_plain",
        ),
        _p(
            "transformers.PreTrainedModel.loss_function",
            "transformers",
            _HF,
            "the causal-LM loss of a shard must be reduced over the SP group",
            "model.loss_function = ulysses_attn.causal_lm_loss in the script",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "transformers.PreTrainedModel.forward",
            "transformers",
            _HF,
            "the chunked loss runs the backbone and the LM head chunk by chunk, without full logits",
            "ulysses_attn.chunked_causal_lm_loss in a custom compute_loss",
            "tests/test_memory.py::test_long_sequence_options_equal_plain_forward_and_bound_logits",
        ),
        _p(
            "transformers.PreTrainedModel.base_model.forward",
            "transformers",
            _HF,
            "checkpoint offload and selective checkpointing wrap the decoder stack's forward",
            "none",
            "tests/test_memory.py::test_long_sequence_and_selective_checkpointing_under_sp_equal_plain_forward",
        ),
        _p(
            "transformers.PreTrainedModel.base_model.forward.transparent",
            "transformers",
            _HF,
            "transparent mode: the backbone shards whole batches and re-assembles its outputs, so any loss is exact",
            "a sequence-parallel hook on the decoder stack in transformers",
            "tests/test_transparent.py::test_compute_loss_func_and_label_smoothing_sp2_equal_plain",
        ),
        _p(
            "transformers.Trainer.compute_loss",
            "transformers",
            _HF,
            "transparent mode: the models a trainer sets up after __init__ (TRL's reference models) are made "
            "transparent before each loss; sharded path: a logits loss set after __init__ is refused, not silent",
            "a Trainer hook after the subclass's __init__",
            "tests/test_trl.py::test_own_loss_trainers_transparent_p2",
        ),
        _p(
            "transformers.GradientCheckpointingLayer._gradient_checkpointing_func",
            "transformers",
            _HF,
            "selective checkpointing passes a context_fn to each layer's checkpoint",
            "a context_fn option of gradient_checkpointing_enable applied per layer",
            "tests/test_memory.py::test_selective_checkpointing_keeps_attention_and_equals_full_recompute",
        ),
        _p(
            "transformers.GradientCheckpointingLayer.gradient_checkpointing",
            "transformers",
            _HF,
            "the memory plan checkpoints the first k decoder layers per step (transformers reads each layer's "
            "switch at the call); disable() switches every layer back on",
            "gradient_checkpointing_enable(every_n_layers=...) (a fixed pattern, not per step)",
            "tests/test_memory_plan.py::test_the_plan_follows_the_budget_in_a_training_step",
            kind="tracked",
        ),
        _p(
            "transformers.decoder_layer.mlp.forward",
            "transformers",
            _HF,
            "the tiled MLP runs each decoder MLP over sequence chunks",
            "none",
            "tests/test_memory.py::test_long_sequence_options_equal_plain_forward_and_bound_logits",
        ),
        _p(
            "torch.nn.Module.register_forward_hook",
            "torch",
            ">=2.4",
            "the tiled MLP agrees on its chunk count once per forward; offload marks the end of the decoder stack; "
            "guards watch the decoder layers during the first SP forward",
            "public API (hooks are removed by disable())",
            "tests/test_memory.py::test_long_sequence_options_equal_plain_forward_and_bound_logits",
            kind="tracked",
        ),
        _p(
            "transformers.GatedDeltaNet._kernel_funcs.causal_conv1d_forward",
            "transformers",
            ">=5.25,<6",
            "a gated delta-net layer's causal conv (Qwen3-Next, Qwen3.5) gets the k-1 positions before its shard "
            "from the previous ranks under SP (halo exchange)",
            "a sequence-parallel hook for the kernel functions of linear-attention layers",
            "tests/test_linear_attention.py::test_gated_delta_net_models_sp_equal_one_process",
        ),
        _p(
            "transformers.ShortConv._kernel_funcs.causal_conv1d_forward",
            "transformers",
            ">=5.25,<6",
            "a short-convolution layer's causal conv (LFM2, LFM2-MoE, LFM3) gets the k-1 positions before its "
            "shard from the previous ranks under SP (halo exchange)",
            "a sequence-parallel hook for the kernel functions of linear-attention layers",
            "tests/test_linear_attention.py::test_short_conv_models_sp_equal_one_process",
        ),
        _p(
            "transformers.Mamba2Mixer._kernel_funcs.causal_conv1d_forward",
            "transformers",
            ">=5.25,<6",
            "a Mamba-2 mixer's causal conv (Bamba, Nemotron-H, Granite-4 hybrid) gets the k-1 positions before its "
            "shard from the previous ranks under SP (halo exchange)",
            "a sequence-parallel hook for the kernel functions of linear-attention layers",
            "tests/test_linear_attention.py::test_mamba2_hybrids_sp_equal_one_process",
        ),
        _p(
            "transformers.Mamba2Mixer._kernel_funcs.mamba_chunk_scan_combined",
            "transformers",
            ">=5.25,<6",
            "a Mamba-2 mixer's SSD scan runs over the full sequence for H/P heads under SP (all-to-all in and out, "
            "as attention)",
            "a sequence-parallel hook for the kernel functions of linear-attention layers",
            "tests/test_linear_attention.py::test_mamba2_hybrids_sp_equal_one_process",
        ),
        _p(
            "transformers.Mamba2Mixer._kernel_funcs.mamba_split_conv1d_scan_combined",
            "transformers",
            ">=5.25,<6",
            "a Mamba-2 mixer's fused conv + scan training kernel (when one is installed) would run on the shard "
            "alone: under SP it returns None, so the mixer takes its unfused path through the two seams above",
            "a sequence-parallel hook for the kernel functions of linear-attention layers",
            "tests/test_linear_attention.py::test_mamba2_hybrids_sp_equal_one_process",
        ),
        _p(
            "transformers.GatedDeltaNet._kernel_funcs.chunk_gated_delta_rule",
            "transformers",
            ">=5.25,<6",
            "a gated delta-net layer's delta rule runs over the full sequence for Hv/P value heads under SP "
            "(all-to-all in and out, as attention)",
            "a sequence-parallel hook for the kernel functions of linear-attention layers",
            "tests/test_linear_attention.py::test_gated_delta_net_models_sp_equal_one_process",
        ),
        _p(
            "torch.nn.Module.register_forward_pre_hook",
            "torch",
            ">=2.4",
            "a decoder layer holding a gated delta-net checks each SP forward: its SP kernels still in place, no "
            "packed rows",
            "public API (hooks are removed by disable())",
            "tests/test_linear_attention.py::test_packed_and_cached_forwards_are_refused",
            kind="tracked",
        ),
        _p(
            "ulysses_attn.model_attributes",
            "transformers",
            _HF,
            "the memory options, tiling and offloader of a model live on it as _ulysses_* attributes",
            "public API of our own",
            "tests/test_patches.py::test_enable_disable_enable",
            kind="tracked",
        ),
        _p(
            "accelerate.Accelerator.prepare_data_loader",
            "accelerate",
            _ACC,
            "every dataloader a Trainer prepares is sharded over DP groups, not over ranks",
            "a sampler argument of the Trainer, or accelerate support for SP groups",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "accelerate.data_loader.BatchSamplerShard.num_processes",
            "accelerate",
            _ACC,
            "the sharded sampler of a prepared dataloader counts DP groups, not ranks",
            "accelerate support for SP groups",
            "tests/test_trainer.py::test_sp2_times_dp2_equals_ddp2",
        ),
        _p(
            "accelerate.Accelerator.pad_across_processes",
            "accelerate",
            _ACC,
            "sequence-dim padding of sharded eval outputs is deferred to the SP gather",
            "none",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "accelerate.Accelerator.gather_for_metrics",
            "accelerate",
            _ACC,
            "eval outputs are re-assembled over the SP group, then gathered over the DP group",
            "accelerate support for SP groups",
            "tests/test_trainer.py::test_sp2_padded_batches_with_eval_and_grad_accum",
        ),
        _p(
            "trl.trainer.sft_trainer.add_fused_lm_head",
            "trl",
            _TRL,
            "TRL's fused LM head is where its SFT trainer scores tokens; it is made sequence-parallel",
            "an SP hook in TRL's fused head",
            "tests/test_trl.py::test_sft_padded_completion_only_p2",
        ),
        _p(
            "trl.trainer.dpo_trainer.add_fused_lm_head",
            "trl",
            _TRL,
            "as for SFT, for DPO",
            "an SP hook in TRL's fused head",
            "tests/test_trl.py::test_dpo_sigmoid_separate_reference_model_p2",
        ),
        _p(
            "trl.fused_lm_head.forward",
            "trl",
            _TRL,
            "the forward add_fused_lm_head installs shards the batch and gathers per-token outputs",
            "an SP hook in TRL's fused head",
            "tests/test_trl.py::test_sft_padded_completion_only_p2",
        ),
        _p(
            "accelerate.ACCELERATE_USE_CPU",
            "accelerate",
            _ACC,
            "a multi-process SP run on a machine without accelerators must train distributed on the CPU, "
            "not as unconnected single processes",
            "use_cpu=True in the script's TrainingArguments",
            "tests/test_transparent.py::test_cpu_run_without_use_cpu_trains_distributed",
            kind="tracked",
        ),
        _p(
            "deepspeed.config.sequence_parallel_size",
            "deepspeed",
            ">=0.16,<1",
            "DeepSpeed would divide its data-parallel world by the key; the Trainer's world is the whole world",
            "dropping the key from the config",
            "tests/test_deepspeed.py::test_zero2_sp_size_from_config_equals_plain",
            kind="tracked",
        ),
        _p(
            "llamafactory.CustomDPOTrainer.concatenated_forward",
            "llamafactory",
            ">=0.9.4,<0.10",
            "LLaMA-Factory's DPO log-probs are sums over tokens of full-sequence logits; under SP they are "
            "scored from the sharded hidden states instead, so no rank holds the [2B, S, vocab] logits",
            "a hook for the log-prob computation of LLaMA-Factory's DPO trainer",
            "tests/test_llamafactory.py::test_dpo_lora_zero3_sp2_equals_no_sp_and_resumes",
        ),
        _p(
            "transformers.Trainer.floating_point_ops",
            "transformers",
            _HF,
            "every rank of an SP group holds the whole batch in transparent mode and TRL's fused-head path; "
            "the Trainer sums the ranks' counts into total_flos",
            "a per-process share in the Trainer's FLOP count",
            "tests/test_llamafactory.py::test_dpo_lora_zero3_sp2_equals_no_sp_and_resumes",
        ),
        _p(
            "accelerate.utils.deepspeed.HfDeepSpeedConfig.__init__",
            "accelerate",
            _ACC,
            "a DeepSpeed config with sequence_parallel_size that a script loads before its model (TrainingArguments "
            "first, as LLaMA-Factory does) reaches deepspeed.zero.Init in from_pretrained before any Trainer exists",
            "a hook on DeepSpeed configs as transformers / accelerate load them",
            "tests/test_deepspeed.py::test_deepspeed_configs_loaded_after_enable_drop_the_sp_key",
        ),
        _p(
            "deepspeed.utils.set_z3_leaf_module",
            "deepspeed",
            ">=0.16,<1",
            "a tiled MLP is gathered once per call under ZeRO-3, not once per chunk",
            "public API (unset by disable())",
            "tests/test_deepspeed.py::test_zero3_long_sequence_sp2_times_dp2_equals_ddp2",
            kind="tracked",
        ),
        _p(
            "transformers.AttentionInterface._global_mapping",
            "transformers",
            _HF,
            "disable(unregister=True) removes ulysses_flash from the attention and mask interfaces",
            "an unregister method of transformers' GeneralInterface",
            "tests/test_patches.py::test_unregister_and_register_again",
            kind="private",
            scope="import",
        ),
        _p(
            "flash_attn.cute.interface._flash_attn_fwd",
            "flash-attn-4",
            ">=4.0.0b1,<5",
            "FA4's kernels as a dispatcher op, so selective checkpointing can keep their outputs",
            "a registered torch op in flash-attn-4",
            "tests/test_flash4.py::test_an_fa4_with_other_internals_goes_through_its_public_function",
            kind="private",
        ),
    )
}


class Applied:
    """One change in force: ``owner.attr`` was ``original`` (``inherited``: not in ``owner``'s own
    ``__dict__``) and is ``new``; or, for a tracked change, ``undo`` reverses it.

    A change of an instance (a model, an accelerator) must not keep it alive: the entry holds the
    instance through a weak reference and parks ``original`` / ``new`` / ``undo`` -- bound methods
    and closures over the instance -- in the instance's own ``__dict__``, so they go when it goes."""

    _keys = itertools.count()

    def __init__(
        self,
        patch: Patch,
        owner: Any,
        attr: str | None = None,
        original: Any = None,
        new: Any = None,
        inherited: bool = False,
        undo: Callable[[], None] | None = None,
    ) -> None:
        self.patch, self.attr, self.inherited = patch, attr, inherited
        payload = {"original": original, "new": new, "undo": undo}
        self._key = next(self._keys)
        self._payload: dict[str, Any] | None = payload
        self.owner: Any = owner
        if not isinstance(owner, type) and type(owner).__name__ != "module":
            try:
                self.owner = weakref.ref(owner)
                vars(owner).setdefault(_PARKED, {})[self._key] = payload
                self._payload = None
            except TypeError:  # no weak references or no __dict__: hold it strongly
                self.owner = owner

    def __repr__(self) -> str:
        return f"Applied({self.patch.target!r}, attr={self.attr!r}, in_force={self.in_force()})"

    def _data(self) -> dict[str, Any]:
        if self._payload is not None:
            return self._payload
        owner = self.target()
        return {} if owner is None else vars(owner).get(_PARKED, {}).get(self._key, {})

    @property
    def original(self) -> Any:
        return self._data().get("original")

    @property
    def new(self) -> Any:
        return self._data().get("new")

    @property
    def undo(self) -> Callable[[], None] | None:
        return self._data().get("undo")

    def target(self) -> Any:
        return self.owner() if isinstance(self.owner, weakref.ref) else self.owner

    def in_force(self) -> bool:
        owner = self.target()
        if owner is None:
            return False
        return self.undo is not None or getattr(owner, str(self.attr), None) is self.new

    def revert(self) -> None:
        owner = self.target()
        if owner is None or not self.in_force():
            return
        if self.undo is not None:
            self.undo()
        elif self.inherited and self.attr in getattr(owner, "__dict__", {}):
            delattr(owner, str(self.attr))
        else:  # a property (e.g. PreTrainedModel.loss_function) or an own attribute
            setattr(owner, str(self.attr), self.original)

    def forget(self) -> None:
        """Drop the entry's hold on what it parked in the instance (after a revert, or when the
        change was overwritten by something else)."""
        owner = self.target()
        if self._payload is None and owner is not None:
            parked = vars(owner).get(_PARKED, {})
            parked.pop(self._key, None)
            if not parked:
                vars(owner).pop(_PARKED, None)


_PARKED = "_ulysses_attn_parked_originals"


def _remove(entry: Applied) -> None:
    STATE.applied.remove(entry)
    entry.forget()


def _record(entry: Applied) -> None:
    STATE.applied[:] = [e for e in STATE.applied if e.target() is not None]  # the gone instances' entries
    STATE.applied.append(entry)


def installed_version(library: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(library))
    except importlib.metadata.PackageNotFoundError:
        return None


def check_window(name: str) -> Patch:
    """The record ``name``; warns once if the installed library is outside its window."""
    patch = PATCHES[name]
    version = installed_version(patch.library)
    if version is not None and not SpecifierSet(patch.versions, prereleases=True).contains(version, prereleases=True):
        warn_once(
            ("patch_window", name),
            "ulysses_attn: patch %s was written for %s%s; found %s %s. If results look wrong, pin %s%s and report it.",
            name,
            patch.library,
            patch.versions,
            patch.library,
            version,
            patch.library,
            patch.versions,
        )
    return patch


def _matches(entry: Applied, owner: Any, attr: str) -> bool:
    return entry.attr == attr and entry.target() is owner


def replace(name: str, owner: Any, attr: str, new: Any) -> Any:
    """Set ``owner.attr = new`` as a change of record ``name``; returns what it was. Entries of the
    same attribute that something else has since replaced are forgotten (their original is gone)."""
    patch = check_window(name)
    for stale in [e for e in STATE.applied if _matches(e, owner, attr) and not e.in_force()]:
        _remove(stale)
    old = getattr(owner, attr)
    inherited = attr not in getattr(owner, "__dict__", {})
    _record(Applied(patch, owner, attr, old, new, inherited))
    setattr(owner, attr, new)
    return old


def track(name: str, owner: Any, undo: Callable[[], None]) -> None:
    """Log a change of record ``name`` made through public API (a hook, a flag) and how to undo it."""
    _record(Applied(check_window(name), owner, undo=undo))


def original(owner: Any, attr: str) -> Any:
    """What ``owner.attr`` was before ulysses_attn replaced it (the attribute itself if it is not
    replaced)."""
    for entry in reversed(STATE.applied):
        if _matches(entry, owner, attr) and entry.in_force():
            while True:  # replaced twice: the first original
                earlier = next((e for e in STATE.applied if _matches(e, owner, attr) and e.new is entry.original), None)
                if earlier is None:
                    return entry.original
                entry = earlier
    return getattr(owner, attr)


def is_replaced(owner: Any, attr: str) -> bool:
    return any(_matches(e, owner, attr) and e.in_force() for e in STATE.applied)


def restore(owner: Any, attr: str) -> bool:
    """Undo the replacements of ``owner.attr`` in force; returns whether there were any."""
    entries = [e for e in STATE.applied if _matches(e, owner, attr)]
    found = any(e.in_force() for e in entries)
    for entry in reversed(entries):
        entry.revert()
        _remove(entry)
    return found


def undo(name: str) -> bool:
    """Undo the changes of record ``name`` in force (before :func:`undo_all`); returns whether
    there were any."""
    entries = [e for e in STATE.applied if e.patch.target == name]
    found = any(e.in_force() for e in entries)
    for entry in reversed(entries):
        entry.revert()
        _remove(entry)
    return found


def applied(scope: str | None = None) -> list[Applied]:
    """The changes in force, in the order they were made (of one ``scope`` if given)."""
    return [e for e in STATE.applied if e.in_force() and (scope is None or e.patch.scope == scope)]


def undo_all(*, keep_import: bool = True) -> int:
    """Restore every original, newest change first; ``keep_import`` leaves the changes that
    ``import ulysses_attn`` made. Returns the number of changes undone."""
    undone = 0
    for entry in reversed(list(STATE.applied)):
        if keep_import and entry.patch.scope == "import":
            continue
        if entry.in_force():
            entry.revert()
            undone += 1
        _remove(entry)
    return undone


def table() -> str:
    """The markdown table of :data:`PATCHES` that docs/compatibility.md shows (a test compares them)."""
    rows = ["| target | library | versions | kind | why | public alternative | test |", "|---" * 7 + "|"]
    for p in PATCHES.values():
        kind = p.kind if p.scope == "enable" else f"{p.kind} (on import)"
        rows.append(
            f"| `{p.target}` | {p.library} | `{p.versions}` | {kind} | {p.why} | {p.public_alternative} | `{p.test}` |"
        )
    return "\n".join(rows)
