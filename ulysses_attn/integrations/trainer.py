"""HF Trainer integration: ``ulysses_attn.enable(sp_size)``.

After ``enable``, every ``transformers.Trainer`` (TRL's trainers included) whose model uses
``attn_implementation="ulysses_flash"`` trains with sequence parallelism, with no change to the
script:

* batches are sharded over the data-parallel groups, not over ranks (the P ranks of an SP group
  get the same batch; the order is the one a run without SP on ``dp_size`` processes sees);
* the collator is wrapped in :class:`~ulysses_attn.UlyssesCollator` (pad to a multiple of P,
  global ``position_ids``, full-sequence ``shift_labels``, this rank's shard);
* the causal-LM loss is :func:`~ulysses_attn.causal_lm_loss`; the Trainer's own token counting
  (``num_items_in_batch`` over ``shift_labels``, ``average_tokens_across_devices``) then makes
  the loss and the DDP gradient equal to the non-SP ones, gradient accumulation included;
* evaluation results are gathered once per SP group, so eval loss and metrics equal the non-SP
  ones.

The Trainer surface touched is small and listed in :mod:`ulysses_attn.patches`: ``Trainer.__init__``
is wrapped (to attach the above to each instance); on the instance, the collator, the loss
function, two arguments, and accelerate's dataloader preparation and metrics gather
(``integrations/accelerate.py``). TRL's fused-head trainers (SFT, DPO) keep whole batches
instead: see ``integrations/trl.py``. :func:`disable` undoes all of it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import torch.distributed as dist

from .. import guards, patches, state
from ..data import UlyssesCollator
from ..groups import SequenceParallel, destroy_sequence_parallel, get_sequence_parallel, init_sequence_parallel
from ..kernels import set_kernel
from ..loss import LossPath, causal_lm_loss, loss_path
from ..memory import MemoryOptions, configure_memory
from ..models import ulysses_models, uses_ulysses
from ..state import STATE, announce_once
from ..transparent import is_transparent, make_transparent
from .accelerate import install_metrics_gather, shard_dataloaders_over_dp_groups
from .deepspeed import reconcile_new_deepspeed_configs, reconcile_sequence_parallel_size
from .fsdp import fsdp_note, parallelism_config_of, refuse_conflicting_parallelism, refuse_double_checkpointing
from .llamafactory import is_llamafactory_dpo, sp_aware_dpo_log_probs
from .trl import fused_trainer_classes, patch_trl

logger = logging.getLogger("ulysses_attn")

__all__ = [
    "enable",
    "disable",
    "resolve_sp_size",
    "attach",
    "apply_memory_options",
    "trainer_loss_path",
    "full_logits_needed",
]

_ENV_SIZE = "ULYSSES_SP_SIZE"


def _deepspeed_sp_size() -> tuple[object, str | None]:
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not os.path.isfile(path):
        return None, None
    with open(path) as f:
        size = json.load(f).get("sequence_parallel_size")
    return size, path


def _positive_int(value, source: str) -> int:
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.strip().isdigit()
    )
    if not whole or int(value) < 1:
        raise ValueError(f"{source} must be a positive integer (the sequence-parallel size); got {value!r}.")
    return int(value)


def resolve_sp_size(sp_size: int | None = None) -> int:
    """SP size from the argument, else ``ULYSSES_SP_SIZE``, else the DeepSpeed config's
    ``sequence_parallel_size`` (``ACCELERATE_DEEPSPEED_CONFIG_FILE``). Conflicting values raise."""
    candidates = []
    if sp_size is not None:
        candidates.append(("the sp_size argument", _positive_int(sp_size, "sp_size")))
    if os.environ.get(_ENV_SIZE):
        candidates.append((_ENV_SIZE, _positive_int(os.environ[_ENV_SIZE], _ENV_SIZE)))
    ds_size, ds_path = _deepspeed_sp_size()
    if ds_size is not None:
        source = f"sequence_parallel_size in {ds_path}"
        candidates.append((source, _positive_int(ds_size, source)))
    if not candidates:
        raise ValueError(
            "No sequence-parallel size given: pass enable(sp_size=N) / --sp-size N, set ULYSSES_SP_SIZE, "
            "or put sequence_parallel_size in the DeepSpeed config."
        )
    if len({v for _, v in candidates}) > 1:
        raise ValueError(
            "Conflicting sequence-parallel sizes: " + ", ".join(f"{src}={v}" for src, v in candidates) + "."
        )
    return candidates[0][1]


def _train_on_cpu_if_no_accelerator() -> None:
    """Several processes and no accelerator: make the Trainer's accelerate state distributed on the
    CPU (``ACCELERATE_USE_CPU``, what ``use_cpu=True`` sets), where it would otherwise run each rank
    as its own unconnected single process."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.accelerator.is_available():
        return
    if os.environ.get("ACCELERATE_USE_CPU") is not None:
        return
    os.environ["ACCELERATE_USE_CPU"] = "true"
    patches.track("accelerate.ACCELERATE_USE_CPU", os.environ, lambda: _unset("ACCELERATE_USE_CPU"))


def _unset(name: str) -> None:
    os.environ.pop(name, None)


def _init_distributed() -> None:
    _train_on_cpu_if_no_accelerator()
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState

    PartialState()  # the same initialisation the Trainer would do (backend per device / DeepSpeed)


def enable(
    sp_size: int | None = None,
    *,
    kernel: str | None = None,
    long_sequence: bool | str = False,
    memory: MemoryOptions | None = None,
    transparent: bool | None = None,
    select_backend: bool = True,
) -> SequenceParallel:
    """Initialise sequence parallelism and make HF Trainers use it.

    >>> import ulysses_attn
    >>> ulysses_attn.enable(sp_size=4)   # before building the Trainer, on every rank
    >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ulysses_flash")
    >>> Trainer(model=model, args=args, train_dataset=ds, data_collator=collator).train()

    ``long_sequence=True`` turns on every memory saving (``MemoryOptions.long_sequence()``:
    chunked loss, tiled MLP, activation checkpointing with overlapped CPU offload); ``memory``
    picks them one by one. Without either, SP runs use the chunked loss only. ``long_sequence="auto"``
    picks them at every training forward (``MemoryOptions.automatic()``: the least recompute that
    fits the device's free memory; docs/long-sequences.md).

    ``transparent``: ``None`` (default) lets each Trainer whose loss the package does not make
    SP-aware (``compute_loss_func``, label smoothing, a trainer's own ``compute_loss``, a model that
    is not a causal LM, MoE router losses) train in transparent mode (:mod:`ulysses_attn.transparent`:
    whole batches, whole logits, any loss exact); ``True`` forces it for every Trainer, ``False``
    refuses such Trainers instead.

    ``select_backend`` (default ``True``): under SP, every model built afterwards whose class can take
    ``"ulysses_flash"`` gets it, whatever ``attn_implementation`` the script asked for; the inner
    kernel follows the request (``sdpa`` -> SDPA, ``flash_attention_2/3`` -> flash-attn, ``eager`` ->
    the reference kernel) unless ``kernel`` forces one. Saved configs keep no trace of it.
    """
    size = resolve_sp_size(sp_size)
    _init_distributed()
    sp = init_sequence_parallel(size)
    if kernel is not None:
        set_kernel(kernel)
    if long_sequence and memory is not None:
        raise ValueError("pass either long_sequence=True or memory=MemoryOptions(...), not both")
    if long_sequence not in (False, True, "auto"):
        raise ValueError(f"long_sequence must be True, False or 'auto'; got {long_sequence!r}")
    if long_sequence == "auto":
        memory = MemoryOptions.automatic()
    STATE.memory = MemoryOptions.long_sequence() if long_sequence is True else memory
    STATE.transparent = transparent
    STATE.select_backend = select_backend
    _patch_trainer()
    reconcile_new_deepspeed_configs(sp.size)
    patch_trl()
    if sp.size > 1:
        logger.info("ulysses_attn: sequence parallel size %d, data parallel size %d", sp.size, sp.dp_size)
    return sp


def disable(*, unregister: bool = False) -> None:
    """Undo :func:`enable`: every patched object gets its original back (Trainers and models made
    meanwhile included), the SP groups are destroyed and the runtime state is cleared, so that
    ``enable`` can run again. ``unregister=True`` also removes ``"ulysses_flash"`` from
    transformers (``import ulysses_attn`` / :func:`ulysses_attn.registration.register` adds it back).

    >>> ulysses_attn.enable(sp_size=2); ...; ulysses_attn.disable()
    """
    patches.undo_all()
    if unregister:
        from ..registration import unregister as _unregister

        _unregister()
    destroy_sequence_parallel()
    state.reset()


def _patch_trainer() -> None:
    from transformers import Trainer

    if patches.is_replaced(Trainer, "__init__"):
        return
    original = Trainer.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        sp = get_sequence_parallel()
        if sp is not None:  # before accelerate builds a device mesh of its own
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            refuse_conflicting_parallelism(parallelism_config_of(training_args), sp.size)
        original(self, *args, **kwargs)
        sp = get_sequence_parallel()
        if sp is None or (sp.size == 1 and STATE.memory is None):
            return
        if uses_ulysses(self.model):
            if sp.size > 1:
                attach(self, sp)
            apply_memory_options(self, (STATE.memory or MemoryOptions()).with_env_overrides())
        elif sp.size > 1:
            logger.warning(
                "ulysses_attn: sequence parallelism (size %d) is enabled but %s's model does not use "
                'attn_implementation="ulysses_flash": it trains with plain data parallelism over all ranks.',
                sp.size,
                type(self).__name__,
            )

    patches.replace("transformers.Trainer.__init__", Trainer, "__init__", __init__)


def full_logits_needed(trainer) -> str | None:
    """Why the trainer's loss needs the full-sequence logits (is not one the package makes
    SP-aware), or ``None``."""
    from transformers import Trainer

    fused = isinstance(trainer, fused_trainer_classes())
    heads = _causal_lm_heads(trainer.model)
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "the Trainer's compute_loss_func"
    if getattr(trainer, "label_smoother", None) is not None:
        return "label smoothing (label_smoothing_factor)"
    if not heads:
        return f"a model that is not a causal LM ({type(trainer.model).__name__})"
    if any(getattr(m.config.get_text_config(), "output_router_logits", False) for m in heads):
        return "the MoE router auxiliary loss (output_router_logits)"
    if not fused and type(trainer).compute_loss is not Trainer.compute_loss:
        return f"{type(trainer).__name__}.compute_loss (a loss of its own)"
    return None


def trainer_loss_path(trainer, options: MemoryOptions | None = None) -> LossPath:
    """The loss path of the trainer's training steps (:func:`ulysses_attn.loss.loss_path`)."""
    chunked = (options or STATE.memory or MemoryOptions()).chunked_loss
    heads = ulysses_models(trainer.model)
    return loss_path(
        heads[0] if heads else trainer.model,
        chunked_loss=chunked,
        trl_fused_head=isinstance(trainer, fused_trainer_classes()),
        full_logits_needed=full_logits_needed(trainer),
        # a model made transparent by the script takes whole batches: sharding them first would cut twice
        transparent=True if any(is_transparent(m) for m in heads) else STATE.transparent,
    )


def _causal_lm_heads(model) -> list:
    return [m for m in ulysses_models(model) if type(m).__name__.endswith("ForCausalLM")]


def _outermost(models: list) -> list:
    """The models of the list that no other model of the list contains."""
    inner = {id(sub) for m in models for sub in m.modules() if sub is not m}
    return [m for m in models if id(m) not in inner]


def _set_arg(trainer, record: str, name: str, value) -> None:
    patches.replace(f"transformers.TrainingArguments.{record}", trainer.args, name, value)


def attach(trainer, sp: SequenceParallel | None = None) -> None:
    """Make one Trainer instance sequence-parallel (``enable`` does this for every new Trainer)."""
    _refuse_online_trl_trainers(trainer)
    sp = sp or get_sequence_parallel()
    args = trainer.args
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        raise NotImplementedError(
            "train_sampling_strategy='batch_rebalance' is not supported with sequence parallelism."
        )
    if not args.average_tokens_across_devices:
        logger.warning("ulysses_attn: setting average_tokens_across_devices=True (required for an exact SP loss).")
        _set_arg(trainer, "average_tokens_across_devices", "average_tokens_across_devices", True)
    if sp is None:
        raise RuntimeError("attach() needs an SP group: call ulysses_attn.enable(sp_size) first.")
    _refuse_single_process_trainer(trainer, sp)
    reconcile_sequence_parallel_size(trainer, sp.size)
    path = trainer_loss_path(trainer)
    models = _outermost(ulysses_models(trainer.model))
    heads = _causal_lm_heads(trainer.model)
    for m in models:  # a model switched to ulysses_flash after it was built was not watched at post_init
        guards.watch(m)
        STATE.prepared_models.add(m)  # the Trainer shards its inputs (or makes it transparent below)
    if path is LossPath.TRANSPARENT:
        _transparent_models_of(trainer, sp)
        if is_llamafactory_dpo(trainer):
            sp_aware_dpo_log_probs(trainer, sp)
    # transparent mode and TRL's fused-head trainers keep whole batches and shard inside the forward
    sharded_inputs = path not in (LossPath.TRANSPARENT, LossPath.TRL_FUSED_HEAD)
    _announce(trainer, sp, path)
    if sharded_inputs:
        for m in heads:
            patches.replace("transformers.PreTrainedModel.loss_function", m, "loss_function", causal_lm_loss)
        if not isinstance(trainer.data_collator, UlyssesCollator):
            pad = getattr(trainer.processing_class, "pad_token_id", None)
            collator = UlyssesCollator(trainer.data_collator, pad_token_id=pad, sp=sp)
            patches.replace("transformers.Trainer.data_collator", trainer, "data_collator", collator)
        _refuse_logit_losses_set_later(trainer)
    else:
        _count_flos_once_per_group(trainer, sp)
    shard_dataloaders_over_dp_groups(trainer.accelerator, sp)
    install_metrics_gather(trainer.accelerator, sp, sharded_inputs)
    patches.replace(
        "transformers.Trainer.gather_function", trainer, "gather_function", trainer.accelerator.gather_for_metrics
    )


def _refuse_logit_losses_set_later(trainer) -> None:
    """The sharded-loss path was chosen when the Trainer was built. A loss that reads the logits
    set afterwards (``self.compute_loss_func = ...`` after ``super().__init__()``, as some trainer
    subclasses do) would see only this rank's shard: refuse it on the first step, naming the fix."""
    compute_loss = trainer.compute_loss

    @functools.wraps(compute_loss)
    def compute_loss_checked(*args, **kwargs):
        reason = full_logits_needed(trainer)
        if reason is not None:
            raise RuntimeError(
                f"ulysses_attn: {type(trainer).__name__} has {reason}, set after the Trainer was built, when the "
                "package chose the sharded-loss path: that loss would see only this rank's shard of the logits. "
                "Pass it to the Trainer's constructor (in a subclass, before super().__init__()), or launch with "
                "--transparent on (enable(transparent=True))."
            )
        return compute_loss(*args, **kwargs)

    patches.replace("transformers.Trainer.compute_loss", trainer, "compute_loss", compute_loss_checked)


def _count_flos_once_per_group(trainer, sp: SequenceParallel) -> None:
    """Every rank of an SP group holds the whole batch (transparent / TRL fused head), and the
    Trainer sums the ranks' ``floating_point_ops``: each counts its 1/P share, so that
    ``total_flos`` is the non-SP one."""
    count = trainer.floating_point_ops

    @functools.wraps(count)
    def floating_point_ops(inputs):
        return count(inputs) / sp.size

    patches.replace("transformers.Trainer.floating_point_ops", trainer, "floating_point_ops", floating_point_ops)


def _transparent_models_of(trainer, sp: SequenceParallel) -> None:
    """Make every ``ulysses_flash`` model the trainer holds transparent (its model, and a reference
    model or any other module it keeps as an attribute), now and before each loss: trainers such as
    TRL's set their reference model up after ``Trainer.__init__`` returns."""
    import torch

    seen: set[int] = set()

    def scan() -> None:
        for value in list(vars(trainer).values()):
            if isinstance(value, torch.nn.Module) and id(value) not in seen:
                seen.add(id(value))
                for m in _outermost(ulysses_models(value)):
                    make_transparent(m, sp)

    scan()
    compute_loss = trainer.compute_loss

    @functools.wraps(compute_loss)
    def compute_loss_with_transparent_models(*args, **kwargs):
        scan()
        return compute_loss(*args, **kwargs)

    patches.replace("transformers.Trainer.compute_loss", trainer, "compute_loss", compute_loss_with_transparent_models)


# TRL trainers that generate during training: their batch sizes, sampler and gathers of completions
# and rewards count processes, where under SP the P ranks of a group share one batch.
_ONLINE_TRL_TRAINERS = (
    "GRPOTrainer",
    "RLOOTrainer",
    "OnlineDPOTrainer",
    "DistillationTrainer",
    "GKDTrainer",
    "NashMDTrainer",
    "XPOTrainer",
    "PPOTrainer",
)


def _refuse_online_trl_trainers(trainer) -> None:
    online = [
        c.__name__
        for c in type(trainer).__mro__
        if c.__module__.startswith("trl") and c.__name__ in _ONLINE_TRL_TRAINERS
    ]
    if online:
        raise NotImplementedError(
            f"ulysses_attn: {online[0]} generates completions during training, and its batch sizes, sampler and "
            "gathers of completions and rewards count processes, where under sequence parallelism the ranks of an SP "
            "group share one batch: it would not train as without SP. It is not supported yet; train it without "
            "sequence parallelism (sp_size=1)."
        )


def _refuse_single_process_trainer(trainer, sp: SequenceParallel) -> None:
    """SP over several processes with a Trainer that is not distributed trains each rank alone on
    its shard: refuse, naming the fix."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    trained_by = trainer.accelerator.num_processes
    if world > 1 and trained_by != world:
        raise RuntimeError(
            f"ulysses_attn: sequence parallelism (size {sp.size}) runs over {world} processes, but the Trainer "
            f"trains as {trained_by} process(es) (accelerate: {trainer.accelerator.distributed_type}), so each rank "
            "would train alone on its shard of every sequence. On a machine without GPUs pass use_cpu=True in "
            "TrainingArguments (--use_cpu); otherwise check that the launcher's environment reaches the Trainer "
            "(torchrun / accelerate launch)."
        )


_PATH_NOTES = {
    LossPath.CHUNKED: "sharded batches, chunked loss",
    LossPath.SP_LOGITS: "sharded batches, SP-reduced loss of the shard's logits",
    LossPath.TRL_FUSED_HEAD: "whole batches, TRL's fused LM head sharded inside",
    LossPath.TRANSPARENT: "whole batches and logits, the decoder layers sharded inside",
}


def _backend_note() -> str:
    kernel = STATE.forced_kernel or (f"{STATE.preferred_kernel} (as asked)" if STATE.preferred_kernel else "auto")
    selected = ", ".join(sorted(STATE.selected_from))
    return f"kernel {kernel}" + (f"; ulysses_flash selected in place of {selected}" if selected else "")


def _announce(trainer, sp: SequenceParallel, path: LossPath) -> None:
    """The one start line of a sequence-parallel Trainer (rank 0, always printed)."""
    options = STATE.memory or MemoryOptions()
    memory = [
        name
        for name, on in (
            ("tiled MLP", options.tiled_mlp),
            ("activation checkpointing", options.activation_checkpointing),
            ("checkpoint offload", options.offload_checkpoints),
            ("selective checkpointing", options.selective_checkpointing),
        )
        if on
    ]
    why = full_logits_needed(trainer) if path is LossPath.TRANSPARENT else None
    if path is LossPath.TRANSPARENT:
        why = why or "forced by enable(transparent=True) / --transparent"
        if is_llamafactory_dpo(trainer):
            why += "; its DPO log-probs from the sharded hidden states, no full logits"
    fsdp = fsdp_note(trainer)
    announce_once(
        ("start", type(trainer).__name__, path),
        f"ulysses_attn: sequence parallelism on for {type(trainer).__name__}: SP size {sp.size} x DP size "
        f"{sp.dp_size} = world {sp.size * sp.dp_size}; {_backend_note()}; loss path "
        f"{path.value} ({_PATH_NOTES[path]}{'; because of ' + why if why else ''}); memory options: "
        f"{', '.join(memory) or 'none'}{'; ' + fsdp if fsdp else ''}.",
    )


def apply_memory_options(trainer, options: MemoryOptions) -> None:
    """Apply ``options`` to the trainer's causal LM(s) (see :mod:`ulysses_attn.memory`)."""
    refuse_double_checkpointing(trainer, options.activation_checkpointing)
    if trainer_loss_path(trainer, options) in (LossPath.TRL_FUSED_HEAD, LossPath.TRANSPARENT):
        # TRL's fused head is chunked already; transparent mode is there to return the logits
        options = dataclasses.replace(options, chunked_loss=False)
    for model in ulysses_models(trainer.model):
        if model.get_output_embeddings() is not None:  # type: ignore[operator]
            configure_memory(model, options)
    if options.activation_checkpointing:
        name = (
            "activation_checkpointing"
            if hasattr(trainer.args, "activation_checkpointing")
            else "gradient_checkpointing"
        )
        _set_arg(trainer, "activation_checkpointing", name, True)
