"""``"ulysses_flash"`` in transformers' attention and mask interfaces, and the one shim it needs.

transformers 5.x treats every ``attn_implementation`` whose name contains ``"flash"`` as a
FlashAttention kernel request and calls ``lazy_import_flash_attention(name)`` from
``PreTrainedModel._check_and_adjust_attn_implementation``, which fails for a name that is not a
flash-attn package or Hub kernel. The shim (patch record
``transformers.modeling_utils.lazy_import_flash_attention``) makes that call a no-op for
``"ulysses_flash"`` (our function picks its own kernel) and leaves every other name unchanged.
"""

from __future__ import annotations

import functools

import transformers
from packaging.specifiers import SpecifierSet
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import guards, linear_attention, patches
from .attention import ulysses_flash_attention, ulysses_flash_mask
from .models import ATTN_IMPLEMENTATION
from .state import STATE

__all__ = ["ATTN_IMPLEMENTATION", "register", "unregister"]

_SHIM = "transformers.modeling_utils.lazy_import_flash_attention"


def _needs_flash_shim() -> bool:
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(requested_attention_implementation=ATTN_IMPLEMENTATION)


def _install_flash_shim() -> None:
    import transformers.modeling_utils as mu

    if patches.is_replaced(mu, "lazy_import_flash_attention"):
        return
    original = getattr(mu, "lazy_import_flash_attention", None)
    if original is None:
        raise ImportError(
            f"transformers {transformers.__version__} has no modeling_utils.lazy_import_flash_attention; "
            f"ulysses_attn supports transformers{patches.PATCHES[_SHIM].versions}."
        )

    @functools.wraps(original)
    def lazy_import_flash_attention(implementation, *args, **kwargs):
        if implementation == ATTN_IMPLEMENTATION:
            return None
        return original(implementation, *args, **kwargs)

    patches.replace(_SHIM, mu, "lazy_import_flash_attention", lazy_import_flash_attention)


# what the script asked for -> the inner kernel that follows it (None: the automatic choice)
_KERNEL_ASKED = {
    "sdpa": "sdpa",
    "eager": "reference",
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn",
    "flash_attention_4": "flash_attn",
}


def _selected_backend(model, requested):
    """``"ulysses_flash"`` in place of what the script asked for, while ``enable(select_backend=True)``
    (the launcher's default) is in force under SP, for a model class that can take it (transformers'
    flash path and AttentionInterface); the inner kernel then follows the request."""
    sp = STATE.sp
    if not STATE.select_backend or sp is None or sp.size == 1 or requested == ATTN_IMPLEMENTATION:
        return requested
    if not (requested is None or requested in _KERNEL_ASKED):
        return requested  # a per-sub-model dict or a Hub kernel: the script chose deliberately
    cls = type(model)
    interface = getattr(cls, "_supports_attention_backend", False) or linear_attention.defines_exact_layers(cls)
    if not (getattr(cls, "_supports_flash_attn", False) and interface):
        return requested
    if STATE.preferred_kernel is None and requested is not None:
        STATE.preferred_kernel = _KERNEL_ASKED[requested]
    STATE.selected_from.add(requested or "default")
    STATE.selected_models.add(model)
    return ATTN_IMPLEMENTATION


def _install_model_hooks() -> None:
    """Keep ``"ulysses_flash"`` on models that would swap it for their own flash kernel, and watch
    every model built with it (:func:`ulysses_attn.guards.watch`)."""
    from transformers import PreTrainedModel

    if not patches.is_replaced(PreTrainedModel, "_check_and_adjust_attn_implementation"):
        check = PreTrainedModel._check_and_adjust_attn_implementation

        @functools.wraps(check)
        def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
            attn_implementation = _selected_backend(self, attn_implementation)
            if attn_implementation != ATTN_IMPLEMENTATION or not getattr(
                self, "_compatible_flash_implementations", None
            ):
                return check(self, attn_implementation, *args, **kwargs)
            self._compatible_flash_implementations = None  # hides the class's list for this call
            try:
                return check(self, attn_implementation, *args, **kwargs)
            finally:
                del self._compatible_flash_implementations

        patches.replace(
            "transformers.PreTrainedModel._check_and_adjust_attn_implementation",
            PreTrainedModel,
            "_check_and_adjust_attn_implementation",
            _check_and_adjust_attn_implementation,
        )
    if not patches.is_replaced(PreTrainedModel, "post_init"):
        post_init = PreTrainedModel.post_init

        @functools.wraps(post_init)
        def watching_post_init(self, *args, **kwargs):
            out = post_init(self, *args, **kwargs)
            if getattr(getattr(self, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION:
                guards.watch(self)
            return out

        patches.replace("transformers.PreTrainedModel.post_init", PreTrainedModel, "post_init", watching_post_init)


def register() -> None:
    """Register ``"ulysses_flash"`` with transformers (idempotent; runs on ``import ulysses_attn``)."""
    window = patches.PATCHES[_SHIM].versions
    if transformers.__version__ not in SpecifierSet(window, prereleases=True):
        raise ImportError(f"ulysses_attn needs transformers{window}; found {transformers.__version__}.")
    AttentionInterface.register(ATTN_IMPLEMENTATION, ulysses_flash_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ulysses_flash_mask)
    if _needs_flash_shim():
        _install_flash_shim()
    _install_model_hooks()


def unregister() -> None:
    """Remove ``"ulysses_flash"`` from transformers' interfaces and undo the shim
    (``disable(unregister=True)``); :func:`register` brings both back."""
    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
    patches.undo_all(keep_import=False)
