"""One runner per system under test: :class:`~.ulysses.UlyssesRunner` (this package),
:class:`~.alst.AlstRunner` (DeepSpeed ALST's attention and memory features) and
:class:`~.stock.StockRunner` (a stock HF backend, no SP). A mode label names the runner and its
options: ``ulysses[@<kernel>][+selective[+offload]|+auto]``, ``alst``, ``sdpa``, ``flash_attention_<n>``."""

from __future__ import annotations

from ..common import STOCK
from .alst import AlstRunner
from .base import Runner
from .stock import StockRunner
from .ulysses import UlyssesRunner

VARIANTS = ("", "selective", "selective+offload", "auto")


def parse_mode(label: str) -> tuple[str, str, str]:
    """``(system, forced kernel, variant)`` of a mode label."""
    name, _, variant = label.partition("+")  # "ulysses+selective": keep attention outputs
    if variant not in VARIANTS or (variant and not name.startswith("ulysses")):
        raise ValueError(f"unknown variant in {label!r} (ulysses+selective, ulysses+selective+offload, ulysses+auto)")
    name, _, forced = name.partition("@")  # "ulysses@torch_varlen": force the inner kernel
    if forced and name != "ulysses":
        raise ValueError(f"only ulysses takes a forced kernel, got {label!r}")
    return name, forced, variant


def make_runner(name: str, sp, args) -> Runner:
    """The runner of system ``name`` over the SP groups of ``sp``."""
    if name in STOCK:
        return StockRunner(name)
    if name == "ulysses":
        return UlyssesRunner(sp)
    if name == "alst":
        return AlstRunner(sp, args.alst_attn)
    raise ValueError(name)


__all__ = ["AlstRunner", "Runner", "StockRunner", "UlyssesRunner", "make_runner", "parse_mode"]
