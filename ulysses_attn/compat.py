"""Registration with transformers, and the one compatibility shim it needs.

transformers 5.x treats every ``attn_implementation`` whose name contains ``"flash"`` as a
FlashAttention kernel request and calls ``lazy_import_flash_attention(name)`` from
``PreTrainedModel._check_and_adjust_attn_implementation``, which fails for a name that is not a
flash-attn package or Hub kernel. We wrap that single module-level name in
``transformers.modeling_utils`` so that it is a no-op for ``"ulysses_flash"`` (our function picks
its own kernel) and unchanged for every other name.
"""

from __future__ import annotations

import functools

import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import ulysses_flash_attention, ulysses_flash_mask

ATTN_IMPLEMENTATION = "ulysses_flash"
_TESTED = (Version("5.0.0"), Version("6.0.0"))  # [min, max)


def decoder_layers(model) -> list:
    """The decoder layers of ``model``: transformers' ``GradientCheckpointingLayer`` modules, in
    registration order (what activation checkpointing wraps, and what the memory options act on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _needs_flash_shim() -> bool:
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(requested_attention_implementation=ATTN_IMPLEMENTATION)


def _install_flash_shim() -> None:
    import transformers.modeling_utils as mu

    original = getattr(mu, "lazy_import_flash_attention", None)
    if original is None:
        raise ImportError(
            f"transformers {transformers.__version__} has no modeling_utils.lazy_import_flash_attention; "
            f"ulysses_attn supports transformers in [{_TESTED[0]}, {_TESTED[1]})."
        )
    if getattr(original, "_ulysses_shim", False):
        return

    @functools.wraps(original)
    def lazy_import_flash_attention(implementation, *args, **kwargs):
        if implementation == ATTN_IMPLEMENTATION:
            return None
        return original(implementation, *args, **kwargs)

    lazy_import_flash_attention._ulysses_shim = True
    mu.lazy_import_flash_attention = lazy_import_flash_attention


def register() -> None:
    """Register ``"ulysses_flash"`` with transformers (idempotent; runs on ``import ulysses_attn``)."""
    version = Version(transformers.__version__)
    if not (_TESTED[0] <= version < _TESTED[1]):
        raise ImportError(
            f"ulysses_attn needs transformers >={_TESTED[0]},<{_TESTED[1]}; found {transformers.__version__}."
        )
    AttentionInterface.register(ATTN_IMPLEMENTATION, ulysses_flash_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ulysses_flash_mask)
    if _needs_flash_shim():
        _install_flash_shim()
