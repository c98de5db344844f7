"""DeepSpeed (ZeRO-2/3) beside Ulysses, through the HF Trainer / accelerate.

The ranks of an SP group hold partial gradients of the same replicated parameters, and the HF
Trainer scales each rank's loss so that a mean over *all* ranks is the exact gradient (see
``loss.py``). DeepSpeed must therefore treat the whole world as its data-parallel group, which is
what it does with a plain ZeRO config. A config carrying ``"sequence_parallel_size": N`` (the
shape of DeepSpeed's own Ulysses configs) would instead make DeepSpeed divide its data-parallel
world by N -- and disagree with the Trainer's ``"train_batch_size": "auto"`` -- so we read N as the
SP size and remove the key from the config DeepSpeed receives.
"""

from __future__ import annotations

import functools

from .. import patches

KEY = "sequence_parallel_size"


def trainer_deepspeed_configs(trainer) -> list[dict]:
    """The DeepSpeed config dicts a Trainer will hand to ``deepspeed.initialize``."""
    configs: list[dict] = []
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    for holder in (getattr(plugin, "hf_ds_config", None), getattr(trainer.args, "hf_deepspeed_config", None)):
        config = getattr(holder, "config", None)
        if isinstance(config, dict) and all(config is not c for c in configs):
            configs.append(config)
    return configs


def reconcile_sequence_parallel_size(trainer, sp_size: int) -> None:
    """Check the config's ``sequence_parallel_size`` against ``sp_size`` and remove it."""
    for config in trainer_deepspeed_configs(trainer):
        size = config.pop(KEY, None)
        if size is not None:
            patches.track(f"deepspeed.config.{KEY}", config, functools.partial(config.setdefault, KEY, size))
        if size is not None and int(size) != sp_size:
            raise ValueError(
                f"The DeepSpeed config sets {KEY}={size} but sequence parallelism was initialised with size "
                f"{sp_size}; make them agree (or drop one of them)."
            )
