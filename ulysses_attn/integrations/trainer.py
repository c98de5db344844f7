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

The Trainer surface touched is small: ``Trainer.__init__`` is wrapped (to attach the above to each
instance); on the instance, ``accelerator.prepare_data_loader`` (every dataloader the trainer
prepares is sharded over DP groups) and ``accelerator.gather_for_metrics`` are wrapped. TRL's
fused-head trainers (SFT, DPO) keep whole batches instead: see ``integrations/trl.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import torch
import torch.distributed as dist

from ..compat import ATTN_IMPLEMENTATION
from ..data import UlyssesCollator
from ..groups import SequenceParallel, get_sequence_parallel, init_sequence_parallel
from ..kernels import set_kernel
from ..loss import causal_lm_loss
from ..memory import MemoryOptions, configure_memory
from .deepspeed import reconcile_sequence_parallel_size
from .trl import fused_trainer_classes, is_trl_trainer, patch_trl, trl_supported

logger = logging.getLogger("ulysses_attn")

__all__ = ["enable", "resolve_sp_size", "attach", "apply_memory_options"]

_ENV_SIZE = "ULYSSES_SP_SIZE"
_memory_options: MemoryOptions | None = None  # set by enable()


def _deepspeed_sp_size() -> tuple[object, str | None]:
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or not os.path.isfile(path):
        return None, None
    with open(path) as f:
        size = json.load(f).get("sequence_parallel_size")
    return size, path


def _positive_int(value, source: str) -> int:
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip().isdigit())
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


def _init_distributed() -> None:
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState

    PartialState()  # the same initialisation the Trainer would do (backend per device / DeepSpeed)


def enable(
    sp_size: int | None = None,
    *,
    kernel: str | None = None,
    long_sequence: bool = False,
    memory: MemoryOptions | None = None,
) -> SequenceParallel:
    """Initialise sequence parallelism and make HF Trainers use it.

    >>> import ulysses_attn
    >>> ulysses_attn.enable(sp_size=4)   # before building the Trainer, on every rank
    >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ulysses_flash")
    >>> Trainer(model=model, args=args, train_dataset=ds, data_collator=collator).train()

    ``long_sequence=True`` turns on every memory saving (``MemoryOptions.long_sequence()``:
    chunked loss, tiled MLP, activation checkpointing with overlapped CPU offload); ``memory``
    picks them one by one. Without either, SP runs use the chunked loss only.
    """
    global _memory_options
    size = resolve_sp_size(sp_size)
    _init_distributed()
    sp = init_sequence_parallel(size)
    if kernel is not None:
        set_kernel(kernel)
    if long_sequence and memory is not None:
        raise ValueError("pass either long_sequence=True or memory=MemoryOptions(...), not both")
    _memory_options = MemoryOptions.long_sequence() if long_sequence else memory
    _patch_trainer()
    patch_trl()
    if sp.size > 1:
        logger.info("ulysses_attn: sequence parallel size %d, data parallel size %d", sp.size, sp.dp_size)
    return sp


def _patch_trainer() -> None:
    from transformers import Trainer

    if getattr(Trainer.__init__, "_ulysses_patched", False):
        return
    original = Trainer.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sp = get_sequence_parallel()
        if sp is None or (sp.size == 1 and _memory_options is None):
            return
        if _uses_ulysses(self.model):
            if sp.size > 1:
                attach(self, sp)
            apply_memory_options(self, (_memory_options or MemoryOptions()).with_env_overrides())
        elif sp.size > 1:
            logger.warning(
                "ulysses_attn: sequence parallelism (size %d) is enabled but %s's model does not use "
                'attn_implementation="ulysses_flash": it trains with plain data parallelism over all ranks.',
                sp.size, type(self).__name__,
            )

    __init__._ulysses_patched = True
    Trainer.__init__ = __init__


def _ulysses_models(model: torch.nn.Module):
    return [
        m
        for m in model.modules()
        if getattr(getattr(m, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION
        and hasattr(type(m), "loss_function")
    ]


def _uses_ulysses(model) -> bool:
    return model is not None and bool(_ulysses_models(model))


def attach(trainer, sp: SequenceParallel | None = None) -> None:
    """Make one Trainer instance sequence-parallel (``enable`` does this for every new Trainer)."""
    if is_trl_trainer(trainer) and not trl_supported():
        import trl

        raise NotImplementedError(
            f"Sequence parallelism with TRL trainers needs trl>=1.16 (its fused LM head); found trl {trl.__version__}. "
            "Upgrade TRL, or train with transformers.Trainer."
        )
    sp = sp or get_sequence_parallel()
    args = trainer.args
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        raise NotImplementedError("train_sampling_strategy='batch_rebalance' is not supported with sequence parallelism.")
    if not args.average_tokens_across_devices:
        logger.warning("ulysses_attn: setting average_tokens_across_devices=True (required for an exact SP loss).")
        args.average_tokens_across_devices = True
    heads = [m for m in _ulysses_models(trainer.model) if type(m).__name__.endswith("ForCausalLM")]
    if not heads:
        raise NotImplementedError(
            "Sequence parallelism with the Trainer supports causal-LM models (*ForCausalLM); "
            f"got {type(trainer.model).__name__}."
        )
    reconcile_sequence_parallel_size(trainer, sp.size)
    sharded_inputs = not isinstance(trainer, fused_trainer_classes())
    if sharded_inputs:
        # TRL's fused-head trainers keep whole batches and shard inside the forward (integrations/trl.py)
        for m in heads:
            m.loss_function = causal_lm_loss
        if not isinstance(trainer.data_collator, UlyssesCollator):
            pad = getattr(trainer.processing_class, "pad_token_id", None)
            trainer.data_collator = UlyssesCollator(trainer.data_collator, pad_token_id=pad, sp=sp)

    prepare_data_loader = trainer.accelerator.prepare_data_loader

    @functools.wraps(prepare_data_loader)
    def _prepare_data_loader(*a, **kw):
        loader = prepare_data_loader(*a, **kw)
        shard_over_dp_groups(loader, sp)
        return loader

    trainer.accelerator.prepare_data_loader = _prepare_data_loader
    install_metrics_gather(trainer.accelerator, sp, sharded_inputs)
    trainer.gather_function = trainer.accelerator.gather_for_metrics
    trainer._ulysses_sp = sp


def apply_memory_options(trainer, options: MemoryOptions) -> None:
    """Apply ``options`` to the trainer's causal LM(s) (see :mod:`ulysses_attn.memory`)."""
    if isinstance(trainer, fused_trainer_classes()):
        options = dataclasses.replace(options, chunked_loss=False)  # TRL's fused head is chunked already
    for model in _ulysses_models(trainer.model):
        if model.get_output_embeddings() is not None:
            configure_memory(model, options)
    if options.activation_checkpointing:
        name = "activation_checkpointing" if hasattr(trainer.args, "activation_checkpointing") else "gradient_checkpointing"
        setattr(trainer.args, name, True)


def shard_over_dp_groups(loader, sp: SequenceParallel) -> None:
    """Re-point accelerate's sharding of a prepared dataloader from ranks to DP groups."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard

    if isinstance(loader, DataLoaderDispatcher):
        raise NotImplementedError(
            "dispatch_batches=True is not supported with sequence parallelism; "
            "set accelerator_config={'dispatch_batches': False}."
        )
    for obj in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        if isinstance(obj, (BatchSamplerShard, IterableDatasetShard)):
            obj.num_processes, obj.process_index = sp.dp_size, sp.dp_rank


def install_metrics_gather(accelerator, sp: SequenceParallel, sharded_inputs: bool) -> None:
    """Route the evaluation loop's ``pad_across_processes`` + ``gather_for_metrics`` through SP.

    The loop pads per-token tensors to the longest over the world, then gathers. With sharded
    inputs that padding would land on each shard, i.e. inside the re-assembled sequence when DP
    groups hold different lengths; so sequence-dim padding is deferred to the gather, which pads
    whole sequences at their end."""
    if sharded_inputs:
        pad_across_processes = accelerator.pad_across_processes

        @functools.wraps(pad_across_processes)
        def _pad_across_processes(tensor, dim=0, pad_index=0, pad_first=False):
            if dim == 1 and not pad_first:
                return tensor
            return pad_across_processes(tensor, dim=dim, pad_index=pad_index, pad_first=pad_first)

        accelerator.pad_across_processes = _pad_across_processes
    accelerator.gather_for_metrics = functools.partial(_gather_for_metrics, accelerator, sp, sharded_inputs)


def _gather_for_metrics(
    accelerator, sp: SequenceParallel, sharded_inputs: bool, input_data, use_gather_object: bool = False
):
    """``Accelerator.gather_for_metrics`` for SP.

    Inside the SP group, per-token tensors (``dim >= 2``: logits, labels) of sharded inputs are
    re-assembled along the sequence (TRL's fused trainers already hold whole sequences) and per-sample values (``dim <= 1``: losses) are averaged -- each rank's loss is
    its shard's share of the sample's loss (``num_items_in_batch`` convention) or already the full
    value. The result is then gathered over the DP group exactly as a run without SP on
    ``dp_size`` processes gathers it (re-assembled sequences padded at their end with -100 to the
    longest over the DP group, as the evaluation loop pads them without SP), dropping the
    duplicated tail of the last batch likewise.
    """
    from accelerate.utils import pad_across_processes, recursively_apply

    from ..comm import all_gather_seq

    if use_gather_object:
        raise NotImplementedError("gather_for_metrics(use_gather_object=True) is not supported with SP.")

    def gather(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2:
            if sharded_inputs:
                t = all_gather_seq(t, sp.group, dim=1)
                if sp.dp_size > 1:  # whole sequences now: pad them at their end, as the loop does without SP
                    t = pad_across_processes(t, dim=1, pad_index=-100)
        else:
            t = t.reshape(-1).clone()
            dist.all_reduce(t, group=sp.group)
            t = t / sp.size
        return all_gather_seq(t, sp.dp_group, dim=0) if sp.dp_size > 1 else t

    data = recursively_apply(gather, input_data, error_on_other_type=True)
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        data = recursively_apply(lambda t: t[: state.remainder], data)
    return data
