"""The public API: what ``ulysses_attn`` exports, and that every exported function and method is
fully annotated (mypy checks the package in CI; this keeps the public surface strict)."""

from __future__ import annotations

import inspect

import ulysses_attn

PUBLIC = {
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
    "sp_sum",
    "set_kernel",
    "available_kernels",
    "make_transparent",
    "unsharded",
}


def _unannotated(name: str, fn) -> list[str]:
    sig = inspect.signature(fn)
    missing = [
        f"{name}({p.name})"
        for p in sig.parameters.values()
        if p.name not in ("self", "cls")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty and not name.endswith("__init__"):
        missing.append(f"{name} -> ?")
    return missing


def test_exports_are_the_documented_api():
    assert set(ulysses_attn.__all__) == PUBLIC


def test_every_public_function_and_method_is_annotated():
    missing = []
    for name in ulysses_attn.__all__:
        obj = getattr(ulysses_attn, name)
        if inspect.isfunction(obj):
            missing += _unannotated(name, obj)
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(fn) and (not attr.startswith("_") or attr == "__init__"):
                    missing += _unannotated(f"{name}.{attr}", fn)
    assert missing == []
