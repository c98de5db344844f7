"""DeepSpeed-Ulysses sequence parallelism for HuggingFace models, as an attention backend.

>>> import ulysses_attn
>>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ulysses_flash")
>>> ulysses_attn.enable(sp_size=4)      # or: python -m ulysses_attn.launch --sp-size 4 train.py
>>> ulysses_attn.enable(sp_size=4, long_sequence=True)   # + chunked loss, tiled MLP, offload
>>> ulysses_attn.disable()              # every patched object back to its original
"""

from .data import UlyssesCollator, UlyssesSampler, shard_batch
from .groups import (
    SequenceParallel,
    destroy_sequence_parallel,
    get_sequence_parallel,
    init_sequence_parallel,
)
from .integrations.trainer import disable, enable
from .kernels import available_kernels, set_kernel
from .loss import causal_lm_loss, chunked_causal_lm_loss, sp_sum
from .memory import MemoryOptions, configure_memory
from .registration import ATTN_IMPLEMENTATION, register
from .tiled_mlp import tile_mlp
from .transparent import make_transparent, unsharded

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "enable",
    "disable",
    "SequenceParallel",
    "init_sequence_parallel",
    "get_sequence_parallel",
    "destroy_sequence_parallel",
    "UlyssesSampler",
    "UlyssesCollator",
    "shard_batch",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "MemoryOptions",
    "configure_memory",
    "tile_mlp",
    "make_transparent",
    "unsharded",
    "sp_sum",
    "set_kernel",
    "available_kernels",
]
__version__ = "0.1.0"
