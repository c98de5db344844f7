"""The inner attention that runs on the full (gathered) sequence for this rank's heads.

One kernel per file, all with the signature ``fn(q, k, v, layout, *, causal, scale, dropout,
window, softcap) -> [B, S, H, D]`` on the flash layout ``q [B, S, H, D]``, ``k/v [B, S_k, H_kv, D]``
(:class:`~ulysses_attn.layout.Layout` says which tokens attend to which); those that support
attention sinks take ``sinks`` ``[H]`` too:

* ``flash_attn`` (:mod:`.flash_attn`): FA3, FA4 (Hopper and newer) or FA2; see :func:`flash_version`;
  sinks with FA4 (its output rescaled from its log-sum-exp);
* ``sdpa`` (:mod:`.sdpa`): PyTorch SDPA (flash / cuDNN backends; no window or softcap; a segmented
  layout runs one call per segment);
* ``torch_varlen`` (:mod:`.torch_varlen`): ``torch.nn.attention.varlen``, no softcap;
* ``reference`` (:mod:`.reference`): exact eager math, every feature (sinks too), O(S^2) memory: the
  fallback.

:func:`choose_kernel` is the one selection rule: the forced kernel, else the fastest that can run
the call. Force one with ``ULYSSES_ATTN_KERNEL=<name>`` or :func:`set_kernel`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layout import Layout, layout_from_positions
from ..state import STATE, log_once
from . import device as _device
from .flash4 import supported as flash4_supported
from .flash_attn import flash_attn, flash_version
from .reference import reference
from .sdpa import sdpa
from .torch_varlen import torch_varlen

__all__ = [
    "Kernel",
    "KERNELS",
    "Layout",
    "layout_from_positions",
    "attend",
    "choose_kernel",
    "set_kernel",
    "available_kernels",
    "flash_version",
    "used_kernels",
    "reset_used_kernels",
]


def _always(device: torch.device) -> bool:
    return True


def _never(device: torch.device) -> bool:
    return False


@dataclass(frozen=True)
class Kernel:
    fn: Callable
    available: Callable[[torch.device], bool]
    window: bool = True
    softcap: bool = True
    dropout: Callable[[torch.device], bool] = _always  # attention dropout on this device
    sinks: Callable[[torch.device], bool] = _never  # attention sinks (one more logit per head) on this device


KERNELS: dict[str, Kernel] = {
    "flash_attn": Kernel(
        flash_attn,
        lambda d: flash_version(d) is not None,
        dropout=lambda d: flash_version(d) == "fa2",
        sinks=lambda d: flash_version(d) == "fa4" and flash4_supported(),  # from FA4's log-sum-exp
    ),
    "sdpa": Kernel(sdpa, _always, window=False, softcap=False),
    "torch_varlen": Kernel(torch_varlen, _device.has_torch_varlen, softcap=False, dropout=lambda d: False),
    "reference": Kernel(reference, _always, sinks=_always),
}


def set_kernel(name: str | None) -> None:
    """Force the inner kernel (one of :data:`KERNELS`), or ``None`` to choose automatically."""
    if name is not None and name not in KERNELS:
        raise ValueError(f"Unknown attention kernel {name!r}; choose one of {sorted(KERNELS)}.")
    STATE.forced_kernel = name


def available_kernels(device: torch.device | str = "cuda") -> list[str]:
    """The kernels that can run on ``device``, in registry order."""
    device = torch.device(device)
    return [name for name, k in KERNELS.items() if k.available(device)]


def used_kernels() -> set[str]:
    """Labels (``"sdpa"``, ``"flash_attn/fa4"``, ...) of the kernels :func:`attend` ran since
    :func:`reset_used_kernels` (or the start of the process)."""
    return set(STATE.used_kernels)


def reset_used_kernels() -> None:
    STATE.used_kernels.clear()


def _supports(k: Kernel, window, softcap, dropout, device: torch.device, sinks: bool = False) -> bool:
    return (
        (not window or k.window)
        and (not softcap or k.softcap)
        and (not dropout or k.dropout(device))
        and (not sinks or k.sinks(device))
    )


def _auto_order(device: torch.device, layout: Layout) -> list[str]:
    """The fastest kernels first (H200 measurements in docs/benchmarks.md, "Kernel choice")."""
    if device.type != "cuda":
        return ["sdpa", "reference"]  # packed: sdpa per document, O(S) memory where the reference needs O(S^2)
    if not layout.dense:  # sdpa per document is the last resort: cuDNN builds a graph per new length
        return ["flash_attn", "torch_varlen", "sdpa", "reference"]
    if flash_version(device) == "fa2" and _device.sdpa_runs_cudnn(device):
        return ["sdpa", "flash_attn", "torch_varlen", "reference"]  # cuDNN beats the FA2 kernel on Hopper
    return ["flash_attn", "sdpa", "torch_varlen", "reference"]


def choose_kernel(
    device: torch.device, layout: Layout, window=None, softcap=None, dropout=0.0, sinks: bool = False
) -> str:
    """The forced kernel (checked: it must be available and able to run the call), else the kernel
    the script's ``attn_implementation`` asked for where it can run the call (``select_backend``),
    else the first of the automatic order that is available here and supports the window, softcap,
    dropout and attention sinks."""
    forced = STATE.forced_kernel or os.environ.get("ULYSSES_ATTN_KERNEL") or None
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"ULYSSES_ATTN_KERNEL={forced!r} is not one of {sorted(KERNELS)}.")
        k = KERNELS[forced]
        if not k.available(device):
            raise RuntimeError(f"Attention kernel {forced!r} is not available on {device}.")
        if not _supports(k, window, softcap, dropout, device, sinks):
            raise ValueError(
                f"Attention kernel {forced!r} cannot run this call (sliding_window={window}, softcap={softcap}, "
                f"dropout={dropout}, attention sinks={sinks}); unset the forced kernel."
            )
        return forced
    preferred = KERNELS.get(STATE.preferred_kernel or "")
    if preferred and preferred.available(device) and _supports(preferred, window, softcap, dropout, device, sinks):
        return str(STATE.preferred_kernel)
    for name in _auto_order(device, layout):
        k = KERNELS[name]
        if k.available(device) and _supports(k, window, softcap, dropout, device, sinks):
            return name
    return "reference"


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout: float = 0.0,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over ``q [B, S, H, D]``, ``k/v [B, S_k, H_kv, D]`` with the chosen kernel;
    ``sinks`` ``[H]``: one more logit per head in every row's softmax, with no value (gpt-oss)."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    window = window if window and window < k.shape[1] else None  # a window as long as the sequence is no window
    if q.shape[1] != k.shape[1]:  # decoding with a KV cache: bottom-right causal alignment
        name = "reference"
    else:
        name = choose_kernel(q.device, layout, window, softcap, dropout, sinks is not None)
    label = f"flash_attn/{flash_version(q.device)}" if name == "flash_attn" else name
    STATE.used_kernels.add(label)
    where = f"{q.device.type} dense={layout.dense} window={bool(window)} softcap={bool(softcap)}"
    where += " sinks=True" if sinks is not None else ""
    log_once(("kernel", label, where), "ulysses_flash inner attention: %s (%s)", label, where)
    extra = {} if sinks is None else {"sinks": sinks}  # only kernels that support sinks take them
    return KERNELS[name].fn(
        q, k, v, layout, causal=causal, scale=scale, dropout=dropout, window=window, softcap=softcap, **extra
    )
