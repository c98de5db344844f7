"""Run an unchanged HF Trainer script with Ulysses sequence parallelism.

    torchrun --nproc_per_node 4 -m ulysses_attn.launch --sp-size 4 train.py --my-args ...
    accelerate launch --num_processes 4 -m ulysses_attn.launch --sp-size 2 train.py ...
    python -m ulysses_attn.launch --sp-size 2 -m my_package.train ...
    torchrun --nproc_per_node 8 -m ulysses_attn.launch --sp-size 8 --long-sequence train.py ...

The script needs no change: every model it builds that can take ``"ulysses_flash"`` gets it
(``--keep-attn-implementation`` turns that off), and a loss the package does not make SP-aware
trains in transparent mode (``--transparent auto|on|off``).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .integrations.trainer import enable
from .memory import MemoryOptions


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into the launcher's own options and ``[script.py | -m module] args...``."""
    takes_value = {"--sp-size", "--kernel", "--transparent"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-m" or not arg.startswith("-"):
            return argv[:i], argv[i:]
        optional_value = arg == "--long-sequence" and i + 1 < len(argv) and argv[i + 1] == "auto"
        i += 1 if "=" in arg or (arg not in takes_value and not optional_value) else 2
    return argv, []


def main(argv: list[str] | None = None) -> None:
    own, target = _split(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(
        prog="python -m ulysses_attn.launch",
        usage="%(prog)s [--sp-size N] [--kernel K] [--long-sequence [auto]] [--selective-checkpointing] "
        "[--transparent auto|on|off] [--keep-attn-implementation] (script.py | -m module) [args]",
    )
    parser.add_argument(
        "--sp-size",
        type=int,
        default=None,
        help="sequence-parallel size (default: $ULYSSES_SP_SIZE or the DeepSpeed config's sequence_parallel_size)",
    )
    parser.add_argument("--kernel", default=None, help="force the inner attention kernel (see ulysses_attn.kernels)")
    parser.add_argument(
        "--long-sequence",
        nargs="?",
        const=True,
        default=False,
        choices=[True, "auto"],
        help="turn on every memory saving: chunked loss, tiled MLP, activation checkpointing with "
        "CPU offload; 'auto': the memory plan picks them for each step (docs/long-sequences.md)",
    )
    parser.add_argument(
        "--selective-checkpointing",
        action="store_true",
        help="activation checkpointing that keeps the attention outputs (more memory, less time)",
    )
    parser.add_argument(
        "--keep-attn-implementation",
        action="store_true",
        help="leave each model's attn_implementation as the script asks (default: ulysses_flash for every "
        "model that can take it, its inner kernel following the request)",
    )
    parser.add_argument(
        "--transparent",
        choices=["auto", "on", "off"],
        default="auto",
        help="whole batches and logits with the decoder layers sharded inside: auto (default) where the loss is "
        "not one the package makes SP-aware; on: always; off: refuse such losses (docs/transparent.md)",
    )
    args = parser.parse_args(own)
    if not target or (target[0] == "-m" and len(target) < 2):
        parser.error("give a script to run (or -m module)")
    memory = (
        MemoryOptions.automatic()
        if args.long_sequence == "auto"
        else MemoryOptions.long_sequence()
        if args.long_sequence
        else None
    )
    if args.selective_checkpointing and args.long_sequence == "auto":
        parser.error("--long-sequence auto chooses selective checkpointing itself; drop --selective-checkpointing")
    if args.selective_checkpointing:
        memory = memory or MemoryOptions(activation_checkpointing=True)
        memory.selective_checkpointing = True
    transparent = {"auto": None, "on": True, "off": False}[args.transparent]
    enable(
        args.sp_size,
        kernel=args.kernel,
        memory=memory,
        transparent=transparent,
        select_backend=not args.keep_attn_implementation,
    )
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))  # as `python script.py` does
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    _shutdown()


def _shutdown() -> None:
    # Tear the process groups down before interpreter exit: gloo's threads can otherwise abort the
    # process at exit ("terminate called without an active exception") after a successful run.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _exit_without_teardown() -> None:
    """End a worker whose script finished: run the exit handlers (logging, trackers), flush, and
    leave without the interpreter's teardown, in which C++ threads left by gloo or DeepSpeed can
    still abort a successful run ("terminate called without an active exception", exit -6, with the
    process groups already destroyed: docs/benchmarks.md, "Measurements the code refers to")."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _exit_without_teardown()
