"""Run an unchanged HF Trainer script with Ulysses sequence parallelism.

    torchrun --nproc_per_node 4 -m ulysses_attn.launch --sp-size 4 train.py --my-args ...
    accelerate launch --num_processes 4 -m ulysses_attn.launch --sp-size 2 train.py ...
    python -m ulysses_attn.launch --sp-size 2 -m my_package.train ...

The script only has to load its model with ``attn_implementation="ulysses_flash"``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .integrations.trainer import enable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ulysses_attn.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sp-size", type=int, default=None,
                        help="sequence-parallel size (default: $ULYSSES_SP_SIZE or the DeepSpeed config's "
                             "sequence_parallel_size)")
    parser.add_argument("--kernel", default=None, help="force the inner attention kernel (see ulysses_attn.kernels)")
    parser.add_argument("-m", dest="module", default=None, help="run a module (like python -m) instead of a script")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="script.py [script args] (or module args with -m)")
    args = parser.parse_args(argv)
    if args.module is None and not args.target:
        parser.error("give a script to run (or -m module)")
    enable(args.sp_size, kernel=args.kernel)
    if args.module is not None:
        sys.argv = [args.module, *args.target]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args.target)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.target[0])))  # as `python script.py` does
        runpy.run_path(args.target[0], run_name="__main__")


if __name__ == "__main__":
    main()
