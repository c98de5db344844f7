"""``--zero 3``: every mode in a DeepSpeed ZeRO-3 engine over the whole world, and what keeps a
destroyed engine alive dropped between configurations."""

from __future__ import annotations

import gc

import torch


def zero3_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8,
                              "stage3_param_persistence_threshold": 1e6},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def mark_zero3(model) -> None:
    """Keep an ``HfDeepSpeedConfig`` alive with the model, so that ``is_deepspeed_zero3_enabled()``
    holds as under the HF Trainer (the model is built whole, partitioned by :func:`initialize`)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    model._hf_ds_config = HfDeepSpeedConfig(zero3_config())


def initialize(model, opt: torch.optim.Optimizer, mpu):
    """The engine and its optimizer (``mpu``: ALST's, as DeepSpeed documents, else None)."""
    import deepspeed

    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=zero3_config(), mpu=mpu)
    return engine, opt


def release_zero3_references() -> None:
    """Drop what keeps a destroyed ZeRO-3 engine (and its states) reachable in DeepSpeed 0.19.8:
    ``parameter_offload.FWD_MODULE_STACK`` keeps the top module (pushed at setup, never popped) and
    the class-level ``lru_cache`` of ``PartitionedParameterCoordinator.__params_to_release`` keeps
    the coordinators and modules. On one H200 each configuration of a process otherwise started
    with the previous one's 18.4 GiB (1B shape) still allocated."""
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    parameter_offload.FWD_MODULE_STACK.clear()
    fn = getattr(partitioned_param_coordinator.PartitionedParameterCoordinator,
                 "_PartitionedParameterCoordinator__params_to_release", None)
    for cell in getattr(fn, "__closure__", None) or ():  # behind DeepSpeed's instrument_w_nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def release(zero: int, state: dict) -> None:
    """After a configuration: destroy its engine (also when it failed), and under ZeRO-3 unset the
    HF DeepSpeed config (else the next model would be built under zero.Init, with other init values)
    and drop DeepSpeed's references; stop if an engine is still alive."""
    engine = state.pop("engine", None)
    if engine is not None:  # frees ZeRO-3's partitions and hooks
        engine.destroy()
    engine = None  # else this reference would keep it alive through the check below
    if zero == 3:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        release_zero3_references()
    gc.collect()
    if zero == 3 and any(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects()):
        raise RuntimeError("a destroyed DeepSpeed engine is still reachable (its states would count in the "
                           "next configuration's peak): run one configuration per process")
