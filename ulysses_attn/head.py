"""The LM head as the model applies it, for losses that call the head themselves.

The chunked losses (``memory.py``'s chunked causal-LM loss, LLaMA-Factory's DPO log-probs) project
the backbone's hidden states through ``get_output_embeddings()`` chunk by chunk instead of calling
the model's forward, so they must apply whatever the forward does to the logits after the head.
The package knows three such transforms from the config -- Cohere's ``logit_scale`` (multiplies),
Granite's ``logits_scaling`` (divides) and Gemma 2/3's ``final_logit_softcapping`` -- and
:func:`checked_logit_transform` checks, once per model, that they are all there is: a 4-token
forward of the model itself (evaluation mode, no gradient, no SP) against the transform applied to
the head's output on the backbone's hidden states. A model whose logits differ (a multiplier or
cap the package does not know, a head that is not ``get_output_embeddings()``) gets ``None``, and
the caller keeps the model's own forward: exact, with the full logits in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .state import STATE, warn_once

__all__ = ["LogitTransform", "logit_transform", "checked_logit_transform"]

_PROBE_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to ``lm_head(hidden)``: multiply by ``scale``, then soft-cap."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(config: Any) -> LogitTransform:
    """The transform a transformers config declares (Cohere, Granite, Gemma 2/3); unchecked."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)  # Cohere multiplies
    if scale is None and getattr(text, "logits_scaling", None):
        scale = 1.0 / text.logits_scaling  # Granite divides
    return LogitTransform(float(scale if scale is not None else 1.0), getattr(text, "final_logit_softcapping", None))


def checked_logit_transform(model: Any, forward: Callable[..., Any] | None = None) -> LogitTransform | None:
    """:func:`logit_transform` of ``model`` (a ``*ForCausalLM``) if its own forward -- ``forward``,
    default ``model.__call__`` -- gives exactly ``transform(get_output_embeddings()(last_hidden_state))``
    on a probe, else ``None`` (warned once). Cached per model. Every rank must call it alike: under
    ZeRO-3 the probe gathers parameters.

    >>> transform = checked_logit_transform(model)
    >>> if transform is None: ...  # keep the model's own forward
    """
    if model in STATE.logit_transforms:
        return STATE.logit_transforms[model]
    transform = logit_transform(model.config)
    mismatch = _probe_mismatch(model, forward or model, transform)
    checked = None if mismatch else transform
    if mismatch:
        warn_once(
            ("logit_transform", type(model).__name__),
            "ulysses_attn: %s's logits are not %s applied to its output embeddings' projection of the backbone's "
            "hidden states (%s), so the chunked losses, which call the head themselves, would be wrong; the model's "
            "own forward computes them instead (exact, with the full [tokens, vocab] logits in memory).",
            type(model).__name__,
            transform,
            mismatch,
        )
    STATE.logit_transforms[model] = checked
    return checked


def _probe_mismatch(model: Any, forward: Callable[..., Any], transform: LogitTransform) -> str | None:
    """Why the model's logits on a probe are not ``transform(head(hidden))``, or ``None``."""
    head = model.get_output_embeddings()
    device = model.get_input_embeddings().weight.device
    ids = torch.arange(_PROBE_TOKENS, device=device)[None] % model.config.get_text_config().vocab_size
    captured: list[torch.Tensor] = []
    handle = model.base_model.register_forward_hook(lambda m, args, out: captured.append(out[0]))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    STATE.unsharded += 1  # the probe is one rank's own forward: no SP, no collectives of the backend
    try:
        with torch.no_grad():
            logits = forward(input_ids=ids, position_ids=ids.clone(), use_cache=False).logits
            ours = transform(head(captured[0])) if captured else None
    except Exception as e:  # noqa: BLE001 -- any failure means "not checked"; every rank fails alike
        return f"the probe forward failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        STATE.unsharded -= 1
        handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if ours is None or logits is None or ours.shape != logits.shape:
        return "the head's output has another shape than the logits" if ours is not None else "no backbone output"
    tolerance = max(2 * torch.finfo(ours.dtype).eps, 1e-5)
    diff = (ours.float() - logits.float()).abs().max().item()
    scale = logits.float().abs().max().item()
    return None if diff <= tolerance * scale + 1e-6 else f"max difference {diff:.3g} on logits up to {scale:.3g}"
