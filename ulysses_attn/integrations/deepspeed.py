"""DeepSpeed (ZeRO-2/3) beside Ulysses, through the HF Trainer / accelerate.

The ranks of an SP group hold partial gradients of the same replicated parameters, and the HF
Trainer scales each rank's loss so that a mean over *all* ranks is the exact gradient (see
``loss.py``). DeepSpeed must therefore treat the whole world as its data-parallel group, which is
what it does with a plain ZeRO config. A config carrying ``"sequence_parallel_size": N`` (the
shape of DeepSpeed's own Ulysses configs) would instead make DeepSpeed divide its data-parallel
world by N -- and disagree with the Trainer's ``"train_batch_size": "auto"`` -- so we read N as the
SP size and remove the key from the config DeepSpeed receives.

Two places see such a config: the Trainer's (checked when the Trainer attaches), and every
``HfDeepSpeedConfig`` made after :func:`ulysses_attn.enable` (patch record
``accelerate.utils.deepspeed.HfDeepSpeedConfig.__init__``). The second matters for scripts that
build ``TrainingArguments(deepspeed=...)`` *before* loading the model (LLaMA-Factory does): with
ZeRO-3 ``from_pretrained`` then runs ``deepspeed.zero.Init`` on that config before any Trainer
exists. ``enable()`` made the process group before that config existed, so accelerate never ran
``deepspeed.init_distributed()``, and ``zero.Init`` would count a world of one: the hook joins
DeepSpeed's communication to the existing group first, and takes back the ``ACCELERATE_USE_CPU``
that ``enable()`` sets on a machine without accelerators (under it accelerate would train DDP
instead of DeepSpeed).
"""

from __future__ import annotations

import functools

from .. import patches

KEY = "sequence_parallel_size"
_INIT = "accelerate.utils.deepspeed.HfDeepSpeedConfig.__init__"
_CPU_FLAG = "accelerate.ACCELERATE_USE_CPU"  # set by enable() on machines without accelerators


def trainer_deepspeed_configs(trainer) -> list[dict]:
    """The DeepSpeed config dicts a Trainer will hand to ``deepspeed.initialize``."""
    configs: list[dict] = []
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    for holder in (getattr(plugin, "hf_ds_config", None), getattr(trainer.args, "hf_deepspeed_config", None)):
        config = getattr(holder, "config", None)
        if isinstance(config, dict) and all(config is not c for c in configs):
            configs.append(config)
    return configs


def reconcile_config(config: dict, sp_size: int) -> None:
    """Check a DeepSpeed config dict's ``sequence_parallel_size`` against ``sp_size`` and remove it
    (``disable()`` puts it back)."""
    size = config.pop(KEY, None)
    if size is None:
        return
    patches.track(f"deepspeed.config.{KEY}", config, functools.partial(config.setdefault, KEY, size))
    if int(size) != sp_size:
        raise ValueError(
            f"The DeepSpeed config sets {KEY}={size} but sequence parallelism was initialised with size "
            f"{sp_size}; make them agree (or drop one of them)."
        )


def reconcile_sequence_parallel_size(trainer, sp_size: int) -> None:
    """:func:`reconcile_config` on every DeepSpeed config the trainer holds."""
    for config in trainer_deepspeed_configs(trainer):
        reconcile_config(config, sp_size)


def reconcile_new_deepspeed_configs(sp_size: int) -> None:
    """Make every ``HfDeepSpeedConfig`` built from now on (``TrainingArguments(deepspeed=...)``,
    accelerate's ``DeepSpeedPlugin``) read and drop ``sequence_parallel_size`` as it is loaded."""
    try:
        from accelerate.utils.deepspeed import HfDeepSpeedConfig
    except ImportError:  # accelerate without its DeepSpeed utilities: no such config can be built
        return
    if patches.is_replaced(HfDeepSpeedConfig, "__init__"):
        return
    original = HfDeepSpeedConfig.__init__

    @functools.wraps(original)
    def __init__(self, config_file_or_dict, *args, **kwargs):
        original(self, config_file_or_dict, *args, **kwargs)
        if isinstance(getattr(self, "config", None), dict):
            reconcile_config(self.config, sp_size)
        _deepspeed_comm_on_the_existing_group()
        # accelerate drops DeepSpeed under use_cpu; DeepSpeed runs on the CPU itself (DS_ACCELERATOR=cpu)
        patches.undo(_CPU_FLAG)

    patches.replace(_INIT, HfDeepSpeedConfig, "__init__", __init__)


def _deepspeed_comm_on_the_existing_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        import deepspeed
    except ImportError:  # a DeepSpeed config without DeepSpeed: the Trainer reports it
        return
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the group; idempotent
