"""GPU tests: run tests/gpu/sp_checks.py on CUDA (one process, torchrun with 1, 2 and 4 GPUs), and
tests/gpu/transparent_checks.py (transparent mode in bf16, two ranks sharing GPU 0).

Skipped without CUDA (CPU CI) and when the machine has fewer GPUs than a test needs; SP = 2 also runs
with both ranks on one GPU (gloo). On the GPU
machine: ``pytest tests/gpu -v`` (each torchrun is one subprocess; its log is printed on failure
and its JSON records land in ``$SP_CHECKS_OUT`` when set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
]

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "sp_checks.py"
TRANSPARENT = HERE / "transparent_checks.py"
ROOT = HERE.parent.parent


def _run(cmd: list[str], tmp_path: Path, timeout: int = 900, **extra_env: str) -> None:
    out = Path(os.environ.get("SP_CHECKS_OUT", tmp_path))
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # keep NVLink multicast off
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.pop("SP_CHECKS_DEVICE", None)
    proc = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-20000:], file=sys.stderr)
    failures = []
    for f in sorted(out.glob("*.json")):
        failures += json.loads(f.read_text()).get("failures", [])
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}; failures: {failures}"


def test_kernels_against_reference(tmp_path):
    _run([sys.executable, str(SCRIPT), "kernels"], tmp_path)


@pytest.mark.parametrize("nproc", [2, 4])
def test_sequence_parallel_nccl(nproc, tmp_path):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs, found {torch.cuda.device_count()}")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT),
          "comm", "models", "memory"], tmp_path)


def test_sequence_parallel_ranks_sharing_one_gpu(tmp_path):
    # P = 2 on GPU 0 through gloo (NCCL refuses two ranks on one GPU): the CUDA kernels under SP on a
    # one-GPU machine; the NCCL transport itself is test_sequence_parallel_nccl's
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
          "models", "memory"], tmp_path, SP_CHECKS_BACKEND="gloo", CUDA_VISIBLE_DEVICES="0")


def test_models_on_one_gpu(tmp_path):
    # P = 1 under torchrun: every kernel in the real models; the one models check a 1-GPU machine runs
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(SCRIPT),
          "models"], tmp_path)


def test_transparent_bf16_ranks_sharing_one_gpu(tmp_path):
    # transparent mode (whole batch in, whole logits out) at SP = 2 with both ranks on GPU 0 through
    # gloo: losses computed from outputs.logits in bf16 against the same model without SP
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRANSPARENT)],
         tmp_path, SP_CHECKS_BACKEND="gloo", CUDA_VISIBLE_DEVICES="0")
